"""CheckpointManager with ``retention="daemon"``: trainers only write, the daemon finalizes.

``finalize_checkpoint`` writes the completion marker and nothing else (no rename, no delete, no
root lock); lookups finalize complete saves themselves so a resume never misses one.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import manager_config

import ckptkeeper.manager as manager_module
from ckptkeeper import RootLock
from ckptkeeper.manager import CheckpointManager


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path.resolve() / "checkpoints"


def make_manager(root: Path, retention: str = "daemon", **overrides: Any) -> CheckpointManager:
    return CheckpointManager(
        manager_config(root, **{"keep_top_k": 1, "retention": retention, **overrides})
    )


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != ".ckptkeeper")


def test_finalize_writes_only_the_marker(root: Path) -> None:
    mgr = make_manager(root)
    for step in range(1, 5):
        tmp = mgr.init_tmp_checkpoint(step, {"loss": 1.0 / step})
        mgr.finalize_checkpoint(tmp)
    assert names(root) == ["tmp_step_1", "tmp_step_2", "tmp_step_3", "tmp_step_4"]
    marker = json.loads((root / "tmp_step_4" / ".complete").read_text())
    assert marker["pid"] == os.getpid() and "host" in marker and "time" in marker
    assert not (root / ".ckptkeeper").exists()  # the root lock was never taken


def test_finalize_does_not_take_the_root_lock(root: Path) -> None:
    mgr = make_manager(root)
    tmp = mgr.init_tmp_checkpoint(1, {"loss": 0.5})
    with RootLock(root):  # held by "the daemon" for as long as the test likes
        started = time.monotonic()
        mgr.finalize_checkpoint(tmp)
        assert time.monotonic() - started < 0.5
    assert (tmp / ".complete").exists() and not (root / "step_1").exists()


def test_finalize_is_fast(root: Path) -> None:
    mgr = make_manager(root)
    durations = []
    for step in range(50):
        tmp = mgr.init_tmp_checkpoint(step, {"loss": 0.5})
        started = time.perf_counter()
        mgr.finalize_checkpoint(tmp)
        durations.append(time.perf_counter() - started)
    # Target is <= 1 ms median on a local disk; the bound leaves room for slow CI filesystems.
    assert statistics.median(durations) < 0.02


def test_custom_marker_name(root: Path) -> None:
    mgr = make_manager(root, complete_marker="DONE")
    tmp = mgr.init_tmp_checkpoint(1, {"loss": 0.5})
    mgr.finalize_checkpoint(tmp)
    assert (tmp / "DONE").exists() and not (tmp / ".complete").exists()
    latest = mgr.get_latest_checkpoint_path()
    assert latest is not None and Path(latest).name == "step_1"


def test_get_latest_finalizes_complete_saves_first(root: Path) -> None:
    mgr = make_manager(root)
    for step in (1, 2, 10):
        mgr.finalize_checkpoint(mgr.init_tmp_checkpoint(step, {"loss": 0.5}))
    in_flight = mgr.init_tmp_checkpoint(11, {"loss": 0.1})  # no marker: still being written
    latest = mgr.get_latest_checkpoint_path()
    assert latest is not None and Path(latest).name == "step_10"
    # Finalized, not pruned: retention is the daemon's job even though keep_top_k=1.
    assert names(root) == ["step_1", "step_10", "step_2", "tmp_step_11"]
    assert in_flight.exists() and not (in_flight / ".complete").exists()
    trash = root / ".ckptkeeper" / "trash"
    assert not trash.exists() or not any(trash.iterdir())


def test_get_latest_on_an_empty_or_missing_root(root: Path) -> None:
    mgr = make_manager(root)
    assert mgr.get_latest_checkpoint_path() is None
    assert mgr.get_best_checkpoint_path() is None
    root.mkdir()
    assert mgr.get_latest_checkpoint_path() is None
    assert not (root / ".ckptkeeper").exists()  # nothing to finalize: no lock taken


def test_get_latest_replaces_an_existing_step(root: Path) -> None:
    mgr = make_manager(root)
    mgr.finalize_checkpoint(mgr.init_tmp_checkpoint(3, {"loss": 0.9}))
    assert mgr.get_latest_checkpoint_path() is not None
    (root / "step_3" / "stale").touch()
    mgr.finalize_checkpoint(mgr.init_tmp_checkpoint(3, {"loss": 0.1}))
    latest = mgr.get_latest_checkpoint_path()
    assert latest is not None and mgr.load_training_info(latest) == {"loss": 0.1}
    assert names(root) == ["step_3"]
    assert list((root / ".ckptkeeper" / "trash").iterdir()) == []


def test_get_latest_finishes_or_undoes_an_interrupted_replace(root: Path) -> None:
    mgr = make_manager(root)
    for step in (1, 2):
        mgr.finalize_checkpoint(mgr.init_tmp_checkpoint(step, {"loss": 0.5, "v": 1}))
    assert mgr.get_latest_checkpoint_path() is not None
    # Step 2: crashed after step_2 -> old_step_2 with a complete new save: finish it.
    (root / "step_2").rename(root / "old_step_2")
    mgr.finalize_checkpoint(mgr.init_tmp_checkpoint(2, {"loss": 0.5, "v": 2}))
    # Step 1: crashed after step_1 -> old_step_1, new save incomplete: restore the old one.
    (root / "step_1").rename(root / "old_step_1")
    mgr.init_tmp_checkpoint(1, {"loss": 0.5, "v": 2})
    latest = mgr.get_latest_checkpoint_path()
    assert latest is not None and mgr.load_training_info(latest) == {"loss": 0.5, "v": 2}
    assert names(root) == ["step_1", "step_2", "tmp_step_1"]
    assert mgr.load_training_info(root / "step_1") == {"loss": 0.5, "v": 1}


def test_get_latest_with_a_held_lock_waits_boundedly_and_warns(root: Path) -> None:
    mgr = make_manager(root)
    mgr.resume_lock_timeout = 0.2
    mgr.finalize_checkpoint(mgr.init_tmp_checkpoint(1, {"loss": 0.5}))
    assert mgr.get_latest_checkpoint_path() is not None
    mgr.finalize_checkpoint(mgr.init_tmp_checkpoint(2, {"loss": 0.5}))
    with RootLock(root), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.monotonic()
        latest = mgr.get_latest_checkpoint_path()
        assert time.monotonic() - started < 5
    assert latest is not None and Path(latest).name == "step_1"
    assert len(caught) == 1 and "not finalized" in str(caught[0].message)
    assert (root / "tmp_step_2").exists()
    latest = mgr.get_latest_checkpoint_path()  # lock free again: finalized now
    assert latest is not None and Path(latest).name == "step_2"


def test_get_latest_waits_for_a_briefly_held_lock(root: Path) -> None:
    mgr = make_manager(root)
    mgr.finalize_checkpoint(mgr.init_tmp_checkpoint(1, {"loss": 0.5}))
    lock = RootLock(root)
    assert lock.acquire()
    timer = threading.Timer(0.2, lock.release)
    timer.start()
    try:
        latest = mgr.get_latest_checkpoint_path()
    finally:
        timer.join()
    assert latest is not None and Path(latest).name == "step_1"


def test_get_best_finalizes_first(root: Path) -> None:
    mgr = make_manager(root, keep_top_k=None)
    for step, loss in [(1, 0.4), (2, 0.2), (3, 0.3)]:
        mgr.finalize_checkpoint(mgr.init_tmp_checkpoint(step, {"loss": loss}))
    best = mgr.get_best_checkpoint_path()
    assert best is not None and Path(best).name == "step_2"


def test_begin_finalization_writes_the_marker_after_wait_fn(root: Path) -> None:
    mgr = make_manager(root)
    tmp = mgr.init_tmp_checkpoint(1, {"loss": 0.5})
    seen: list[bool] = []
    gate = threading.Event()

    def wait() -> None:
        gate.wait(5)
        seen.append((tmp / ".complete").exists())

    mgr.begin_finalization(tmp, wait_fn=wait)
    assert mgr.has_pending_finalization
    gate.set()
    mgr.finalize_pending()
    mgr.shutdown()
    assert seen == [False]
    assert (tmp / ".complete").exists() and not (root / "step_1").exists()


def test_inline_finalize_waits_for_a_held_lock(root: Path) -> None:
    mgr = make_manager(root, retention="inline")
    tmp = mgr.init_tmp_checkpoint(1, {"loss": 0.5})
    done = threading.Event()

    def finalize() -> None:
        mgr.finalize_checkpoint(tmp)
        done.set()

    with RootLock(root):
        worker = threading.Thread(target=finalize)
        worker.start()
        assert not done.wait(0.3)
        assert (tmp / ".complete").exists()  # marker first, then it queued for the lock
        assert not (root / "step_1").exists()
    worker.join(10)
    assert done.is_set() and (root / "step_1").exists() and not tmp.exists()


def test_both_modes_share_a_root(root: Path) -> None:
    writer = make_manager(root, retention="daemon", keep_top_k=2)
    inline = make_manager(root, retention="inline", keep_top_k=2)
    for step, loss in [(1, 0.1), (2, 0.2), (3, 0.3)]:
        writer.finalize_checkpoint(writer.init_tmp_checkpoint(step, {"loss": loss}))
    # Inline retention only ranks finalized step_N: complete tmp dirs are left to the daemon.
    inline.finalize_checkpoint(inline.init_tmp_checkpoint(4, {"loss": 0.9}))
    assert names(root) == ["step_4", "tmp_step_1", "tmp_step_2", "tmp_step_3"]
    latest = writer.get_latest_checkpoint_path()
    assert latest is not None and Path(latest).name == "step_4"
    assert names(root) == ["step_1", "step_2", "step_3", "step_4"]
    inline.remove_old_checkpoints()
    assert names(root) == ["step_1", "step_2", "step_4"]


def test_inline_finalize_after_the_daemon_won_the_race(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon_side = make_manager(root)
    mgr = make_manager(root, retention="inline", keep_top_k=None)
    tmp = mgr.init_tmp_checkpoint(5, {"loss": 0.5})
    real_write_marker = manager_module.write_marker

    def marker_then_daemon(directory: Path, name: str) -> Path:
        written = real_write_marker(directory, name)
        # The daemon sees the complete save between the marker and the inline rename.
        assert daemon_side.get_latest_checkpoint_path() is not None
        return written

    monkeypatch.setattr(manager_module, "write_marker", marker_then_daemon)
    mgr.finalize_checkpoint(tmp)  # a lost race is success
    assert names(root) == ["step_5"]
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):  # finalizing a save that never existed still fails
        mgr.finalize_checkpoint(root / "tmp_step_6")


def test_invalid_retention_names_the_key(root: Path) -> None:
    with pytest.raises(ValueError, match="retention"):
        make_manager(root, retention="background")
    assert make_manager(root, retention=None).retention == "inline"
