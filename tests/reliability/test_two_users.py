"""Trainer and keeper as two users sharing a group, in both orders (issue: "trainer and keeper as
different users lock each other out").

The README's setup: the keeper's user is in the group owning the checkpoints, the root is
group-owned, setgid and group-writable (2775), and both sides run with umask 002. The trainer
(uid 40001) saves inline and in daemon mode and resumes (``get_latest_checkpoint_path()``, which
finalizes under the root lock in daemon mode); the keeper (uid 40002) runs ``ckptkeeper sweep``.
Whoever creates ``.ckptkeeper/`` first, the other must be able to take the lock, move steps into
the trash and remove them: every pass and save succeeds, and everything created is
group-owned and group-writable.

Not a hostile-layouts case: that harness builds a static layout as root and runs one keeper
(as root or as ``nobody`` without groups) over it, while here two users must act in turns.
Each side runs in a forked child (`tests.helpers.run_as`): the keeper runs the real command line
in-process (``ckptkeeperd.cli.main``) because this venv's interpreter lives below a directory
other uids cannot enter.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import run_as

import ckptkeeperd.render  # noqa: F401 - imported lazily by `sweep --json`: loaded before the fork
from ckptkeeper import CheckpointManager
from ckptkeeperd import cli

TRAINER, KEEPER, GID = 40001, 40002, 40000


@pytest.fixture
def root() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("not root: cannot run the trainer and the keeper as two other users")
    base = Path(tempfile.mkdtemp(prefix="ckptkeeper-two-users-"))
    try:
        base.chmod(0o755)
        run = base / "run"
        run.mkdir()
        os.chown(run, 0, GID)
        run.chmod(0o2775)
        yield run
    finally:
        shutil.rmtree(base)


def _manager(root: Path, retention: str) -> CheckpointManager:
    config = {
        "enabled": True,
        "checkpoint_dir": root,
        "metric_name": "val",
        "higher_is_better": True,
        "keep_top_k": 1,
        "save_period": 1,
        "retention": retention,
    }
    return CheckpointManager(config)


def _save(root: Path, step: int, val: float, retention: str) -> list[str]:
    """One save as a trainer makes it; returns the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mgr = _manager(root, retention)
        tmp = mgr.init_tmp_checkpoint(step, {"val": val, "step": step})
        (tmp / "policy").mkdir()
        (tmp / "policy" / "shard_0.bin").write_bytes(b"w" * 4096)
        mgr.finalize_checkpoint(tmp)
    return [str(w.message) for w in caught]


def _resume(root: Path) -> str | None:
    return _manager(root, "daemon").get_latest_checkpoint_path()


def _sweep(root: Path) -> dict[str, Any]:
    out, err = io.StringIO(), io.StringIO()
    args = ["sweep", str(root), "--keep-top-k", "1", "--metric", "val", "--higher-is-better"]
    code: Any = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main([*args, "--json"])
        except SystemExit as exc:
            code = exc.code
    return {"rc": code, "report": json.loads(out.getvalue() or "{}"), "logs": err.getvalue()}


def as_trainer(fn: Any) -> Any:
    result = run_as(TRAINER, GID, fn)
    assert result["ok"], f"trainer (uid {TRAINER}): {result.get('traceback') or result}"
    return result["value"]


def keeper_sweeps(root: Path) -> None:
    result = run_as(KEEPER, GID, lambda: _sweep(root))
    assert result["ok"], f"keeper (uid {KEEPER}): {result.get('traceback') or result}"
    swept = result["value"]
    assert swept["rc"] == 0, f"sweep as uid {KEEPER} exit {swept['rc']}: {swept['logs'][-3000:]}"


def assert_shared(root: Path, area_owner: int) -> None:
    """Everything below the root belongs to the group and is group-writable; the area is owned
    by whoever made it first."""
    assert os.lstat(root / ".ckptkeeper").st_uid == area_owner
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["", *dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            assert st.st_gid == GID, f"{path}: group {st.st_gid}"
            wanted = stat.S_IWGRP | stat.S_IRGRP
            if stat.S_ISDIR(st.st_mode):
                wanted |= stat.S_ISGID | stat.S_IXGRP
            assert st.st_mode & wanted == wanted, f"{path}: mode {stat.S_IMODE(st.st_mode):o}"


def on_disk(root: Path) -> tuple[list[str], list[str]]:
    steps = sorted(n for n in os.listdir(root) if n != ".ckptkeeper")
    return steps, os.listdir(root / ".ckptkeeper" / "trash")


def test_keeper_first_then_the_trainer_saves_and_resumes(root: Path) -> None:
    assert as_trainer(lambda: _save(root, 1, 0.1, "daemon") + _save(root, 2, 0.2, "daemon")) == []
    keeper_sweeps(root)  # finalizes both, deletes step_1: creates .ckptkeeper as the keeper
    assert on_disk(root) == (["step_2"], [])

    assert as_trainer(lambda: _save(root, 3, 0.3, "daemon")) == []
    assert as_trainer(lambda: _resume(root)) == str(root / "step_3")  # finalized under the lock
    assert_shared(root, KEEPER)
    assert as_trainer(lambda: _save(root, 4, 0.9, "inline")) == []  # renames and prunes
    keeper_sweeps(root)
    assert on_disk(root) == (["step_4"], [])
    assert_shared(root, KEEPER)


def test_trainer_first_then_the_keeper_finalizes_and_prunes(root: Path) -> None:
    saves = [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert as_trainer(lambda: [w for s, v in saves for w in _save(root, s, v, "inline")]) == []
    assert on_disk(root) == (["step_3"], [])  # pruned inline: .ckptkeeper made by the trainer
    assert as_trainer(lambda: _save(root, 4, 0.9, "daemon")) == []

    keeper_sweeps(root)  # finalizes step_4, deletes step_3 through the trainer's trash
    assert on_disk(root) == (["step_4"], [])
    assert_shared(root, TRAINER)

    assert as_trainer(lambda: _resume(root)) == str(root / "step_4")
    assert as_trainer(lambda: _save(root, 5, 0.5, "inline")) == []  # keeps 4 (best), 5 (latest)
    keeper_sweeps(root)
    assert on_disk(root) == (["step_4", "step_5"], [])
    assert_shared(root, TRAINER)
