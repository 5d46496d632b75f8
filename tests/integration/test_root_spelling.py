"""A root is an object store only when the user spells it ``s3://``: a local directory named
``s3:`` is a directory (DESIGN section 10, README "S3 roots")."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.helpers import CKPTKEEPER, Daemon, step_names, wait_until, write_checkpoint

from ckptkeeper.storage import PosixStorage
from ckptkeeperd.config import load_config
from ckptkeeperd.roots import expand


def _env(tmp_path: Path) -> dict[str, str]:
    """Any S3 request would go to a closed port on loopback and fail (never to the network)."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(
        AWS_ENDPOINT_URL="http://127.0.0.1:9",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",  # noqa: S106 - dummy credentials
        AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    return env


def _run(tmp_path: Path) -> Path:
    """``<tmp>/s3:/<name>``: a run with steps 1..3 finalized by a trainer."""
    root = tmp_path / "s3:" / "run"
    for step in (1, 2, 3):
        write_checkpoint(root, step, final=True)
    return root


def _sweep(cwd: Path, *args: str) -> tuple[int, list[dict[str, object]], str]:
    out = subprocess.run(
        [CKPTKEEPER, "sweep", "--keep-latest-n", "1", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(cwd),
    )
    events = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return out.returncode, events, out.stderr


def test_relative_root_under_a_directory_named_s3_is_swept_as_a_directory(
    tmp_path: Path,
) -> None:
    root = _run(tmp_path)
    for spelling in ("s3:/run", "./s3:/run"):
        write_checkpoint(root, 1, final=True)  # the pass before took it
        code, events, err = _sweep(tmp_path, spelling)
        assert code == 0, (spelling, err, events)
        assert step_names(root) == {"step_3"}, spelling
        deleted = [e for e in events if e["event"] == "deleted"]
        assert {e["step"] for e in deleted} >= {1}
        assert all(str(e["path"]).startswith(str(root) + "/") for e in deleted)


def test_config_root_spelled_s3_colon_single_slash_is_a_local_directory(tmp_path: Path) -> None:
    root = _run(tmp_path)
    config = tmp_path / "keeper.toml"
    config.write_text('[[root]]\npath = "s3:/run"\n')
    [(where, _)] = expand(load_config(config))
    assert where.path == root and where.local_dir == root
    assert isinstance(where.storage, PosixStorage)
    code, events, err = _sweep(tmp_path / "s3:", "--config", str(config))  # cwd: no help
    assert code == 0, (err, events)
    assert step_names(root) == {"step_3"}
    assert sorted(e["step"] for e in events if e["event"] == "deleted") == [1, 2]


def test_daemon_watches_a_root_spelled_s3_colon_single_slash_as_a_directory(
    tmp_path: Path,
) -> None:
    """The daemon's observer choice: a local directory gets events (inotify), not S3 polling;
    a new save there is finalized and the older step pruned by the event-driven pass."""
    root = _run(tmp_path)
    keeper = Daemon(
        ["s3:/run", "--keep-latest-n", "1", "--sweep-interval", "1h"],
        env=_env(tmp_path),
        cwd=tmp_path,
        metrics_address="",
    )
    try:
        keeper.wait_ready()
        [added] = keeper.wait_for("root_added")
        assert added["root"] == str(root) and added["observer"] == "inotify", added
        write_checkpoint(root, 4)  # tmp_step_4 with its marker: an event, not a poll
        keeper.wait_for("finalized", step=4, timeout=30)
        wait_until(lambda: step_names(root) == {"step_4"}, timeout=30)
        assert keeper.stop() == 0
    finally:
        keeper.kill()
