"""Keepers on S3 as real processes: kill -9 mid-delete, two keepers racing, 10,000 objects, the
daemon on an ``s3://`` root."""

from __future__ import annotations

import json
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.helpers import CKPTKEEPER, Daemon, wait_until
from tests.s3.helpers import keys_under, put_checkpoint, sweep
from tests.s3server import S3Endpoint


def _committed_are_whole(s3: Any, bucket: str, manifests: dict[int, list[str]]) -> list[int]:
    """Steps whose marker exists; fails if one of them lacks any object of its manifest."""
    present = keys_under(s3, bucket, "r/")
    committed = []
    for step, keys in manifests.items():
        if f"r/step_{step}/.complete" in present:
            missing = set(keys) - present
            assert not missing, f"committed step_{step} lacks {sorted(missing)[:3]}"
            committed.append(step)
    return committed


def test_kill9_during_multibatch_delete_then_a_pass_finishes_it(
    endpoint: S3Endpoint, s3env: dict[str, str], bucket: str, s3: Any
) -> None:
    manifests = {1: put_checkpoint(s3, bucket, "r", 1, {"loss": 1.0}, files=3500)}
    manifests[2] = put_checkpoint(s3, bucket, "r", 2, {"loss": 1.0}, files=5)
    endpoint.proxy.hold_deletes_after = 1  # the first batch goes through, the others hang
    proc = subprocess.Popen(
        [CKPTKEEPER, "sweep", f"s3://{bucket}/r", "--keep-latest-n", "1"],
        env=s3env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: endpoint.proxy.held >= 1, timeout=60, what="a held batch")
        # Batches go in parallel: the first may still be in the store's hands (1,000 deletes,
        # 35 s seen on a loaded machine) when the second is held. The store serves this
        # process's listings too, under the same GIL: list twice a second, not 50 times.
        wait_until(
            lambda: len(keys_under(s3, bucket, "r/step_1/")) <= 3500 - 1000 + 1,
            timeout=60,
            interval=0.5,
            what="batch 1",
        )
        assert _committed_are_whole(s3, bucket, manifests) == [2]  # step_1 lost its marker first
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        proc.kill()
        endpoint.proxy.hold_deletes_after = None
        endpoint.proxy.release.set()
    left = keys_under(s3, bucket, "r/step_1/")
    assert left and "r/.ckptkeeper/tombstones/step_1" in keys_under(s3, bucket, "r/.ckptkeeper/")
    endpoint.proxy.release.clear()
    code, events, err = sweep(s3env, f"s3://{bucket}/r", "--keep-latest-n", "1")
    assert code == 0, err
    assert [e["event"] for e in events if e["event"] == "purged"] == ["purged"]
    assert keys_under(s3, bucket, "r/step_1/") == set()
    assert not keys_under(s3, bucket, "r/.ckptkeeper/tombstones/")
    assert _committed_are_whole(s3, bucket, manifests) == [2]


def test_two_keepers_racing_on_one_root_never_both_delete(
    endpoint: S3Endpoint, s3env: dict[str, str], bucket: str, s3: Any
) -> None:
    manifests = {
        s: put_checkpoint(s3, bucket, "r", s, {"loss": 1.0}, files=50) for s in range(1, 9)
    }

    def one(_: int) -> tuple[int, list[dict[str, Any]], str]:
        return sweep(s3env, f"s3://{bucket}/r", "--keep-latest-n", "2")

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert all(code in (0,) for code, _, _ in results), [err for _, _, err in results]
    deleted = [e["step"] for _, events, _ in results for e in events if e["event"] == "deleted"]
    assert sorted(deleted) == list(range(1, 7))  # each step deleted by exactly one keeper
    assert _committed_are_whole(s3, bucket, manifests) == [7, 8]
    assert {k for k in keys_under(s3, bucket, "r/") if "/step_" in k} == set(
        manifests[7] + manifests[8]
    )


def test_prefix_with_10000_objects(
    endpoint: S3Endpoint, s3env: dict[str, str], bucket: str, s3: Any
) -> None:
    put_checkpoint(s3, bucket, "r", 1, {"loss": 1.0}, files=10_000)
    keep = put_checkpoint(s3, bucket, "r", 2, {"loss": 1.0})
    code, events, err = sweep(s3env, f"s3://{bucket}/r", "--keep-latest-n", "1")
    assert code == 0, err
    [deleted] = [e for e in events if e["event"] == "deleted"]
    assert deleted["step"] == 1 and deleted["bytes"] > 0
    assert {k for k in keys_under(s3, bucket, "r/") if "/.ckptkeeper/" not in k} == set(keep)
    assert endpoint.proxy.count("DeleteObjects") == 11  # 10,001 keys in batches of <= 1,000


def test_daemon_keeps_an_s3_root_by_polling(
    endpoint: S3Endpoint, s3env: dict[str, str], bucket: str, s3: Any
) -> None:
    put_checkpoint(s3, bucket, "r", 1, {"loss": 1.0})
    keeper = Daemon(
        [f"s3://{bucket}/r", "--keep-latest-n", "1", "--sweep-interval", "1s"],
        env=s3env,
        metrics_address="",
    )
    try:
        keeper.wait_ready()
        [added] = keeper.wait_for("root_added")
        assert added["observer"] == "sweep" and added["root"] == f"s3:/{bucket}/r"
        put_checkpoint(s3, bucket, "r", 2, {"loss": 1.0})
        keeper.wait_for("deleted", step=1, timeout=30)
        assert keys_under(s3, bucket, "r/step_1/") == set()
        assert keeper.stop() == 0
    finally:
        keeper.kill()
    assert not [e for e in keeper.events if e.get("log_level") == "error"], json.dumps(
        keeper.events[-5:]
    )
