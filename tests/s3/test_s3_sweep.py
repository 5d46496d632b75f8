"""`ckptkeeper sweep s3://...` as a real process against moto on 127.0.0.1."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from tests.helpers import CKPTKEEPER, step_names, write_checkpoint
from tests.s3.helpers import keys_under, put_checkpoint, sweep
from tests.s3server import S3Endpoint


def test_sweep_prunes_an_s3_root_by_policy(
    endpoint: S3Endpoint, s3env: dict[str, str], bucket: str, s3: Any
) -> None:
    manifests = {
        step: put_checkpoint(s3, bucket, "runs/a", step, {"val_reward": r})
        for step, r in [(1, 0.9), (2, 0.1), (3, 0.5), (4, 0.2)]
    }
    code, events, err = sweep(
        s3env, f"s3://{bucket}/runs/a", "--keep-top-k", "1", "--metric", "val_reward",
        "--higher-is-better",
    )  # fmt: skip
    assert code == 0, err
    left = keys_under(s3, bucket, "runs/a/")
    # top-1 by val_reward (step 1) and the latest (step 4) are kept, whole
    assert set(manifests[1]) | set(manifests[4]) <= left
    assert not (set(manifests[2]) | set(manifests[3])) & left
    assert not {k for k in left if "/.ckptkeeper/tombstones/" in k}  # finished
    deleted = sorted(e["step"] for e in events if e["event"] == "deleted")
    assert deleted == [2, 3]
    assert all(e["bytes"] > 0 for e in events if e["event"] == "deleted")


def test_config_roots_and_discover_glob_over_prefixes(
    endpoint: S3Endpoint, s3env: dict[str, str], bucket: str, s3: Any, tmp_path: Path
) -> None:
    for run in ("runs/a", "runs/b", "runs/a/step_1/nested", "other/c", "runs/empty-x"):
        for step in (1, 2):
            put_checkpoint(s3, bucket, run, step, {"loss": 1.0}) if "empty" not in run else None
    s3.put_object(Bucket=bucket, Key="runs/empty-x/readme.txt", Body=b"no checkpoints")
    config = tmp_path / "ckptkeeper.toml"
    config.write_text(
        f'[defaults]\nkeep_latest_n = 1\n[[root]]\npath = "s3://{bucket}/other/c"\n'
        f'[[discover]]\nglob = "s3://{bucket}/runs/*"\n'
    )
    code, events, err = sweep(s3env, "--config", str(config))
    assert code == 0, err
    roots = sorted({e["root"] for e in events if e["event"] == "deleted"})
    assert roots == [f"s3:/{bucket}/other/c", f"s3:/{bucket}/runs/a", f"s3:/{bucket}/runs/b"]
    assert "runs/empty-x/readme.txt" in keys_under(s3, bucket, "runs/empty-x/")


def test_s3_root_never_takes_a_local_directory_of_the_same_spelling_for_itself(
    endpoint: S3Endpoint, s3env: dict[str, str], bucket: str, s3: Any, tmp_path: Path
) -> None:
    """A local ``s3:/<bucket>/r`` under the keeper's working directory is not the S3 root
    ``s3://<bucket>/r``: not pruned, and not measured for the root's free-space metric."""
    for step in (1, 2, 3):
        put_checkpoint(s3, bucket, "r", step, {"loss": 1.0})
    local = tmp_path / "s3:" / bucket / "r"
    for step in (1, 2, 3):
        write_checkpoint(local, step, final=True)
    prom = tmp_path / "keeper.prom"
    args = ["sweep", f"s3://{bucket}/r", "--keep-latest-n", "1", "--metrics-file", str(prom)]
    out = subprocess.run(
        [CKPTKEEPER, *args], capture_output=True, text=True, timeout=120, env=dict(s3env),
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert {k.split("/")[1] for k in keys_under(s3, bucket, "r/")} == {"step_3", ".ckptkeeper"}
    assert step_names(local) == {"step_1", "step_2", "step_3"}  # untouched
    text = prom.read_text()
    assert 'ckptkeeper_checkpoints{root="s3:/' in text  # the root is in the file...
    assert "ckptkeeper_filesystem_free_bytes{" not in text  # ...with no filesystem of its own
