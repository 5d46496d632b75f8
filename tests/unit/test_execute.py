"""apply_plan / purge_trash on real directories: actions, re-checks, faults and crashes.

DESIGN.md section 3, invariants 1-5: every visible step_N is complete, deletes go through the
trash, kept steps survive any interrupted pass, and a later pass finishes what a crashed one began.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.helpers import wait_until

from ckptkeeper.effects import OS_FS, Fs, RootLock, write_marker, writer_lock
from ckptkeeper.execute import Outcome, apply_plan, purge_trash
from ckptkeeper.plan import Action, Plan, plan
from ckptkeeper.policy import Policy
from ckptkeeper.scan import INFO_FILE, scan_root, trash_dir

FILES = ("weights.bin", "policy/shard-0.bin", "policy/optim/state.bin")
MARKER = ".complete"


def payload(step: int, version: str, name: str) -> bytes:
    return f"{step}/{version}/{name}\n".encode() * (8 + step)


def write_ckpt(
    d: Path,
    step: int,
    version: str,
    metric: float | None = None,
    *,
    info: bool = True,
    marker: bool = False,
    pin: bool = False,
) -> Path:
    """A checkpoint: 3 files (one nested two deep) + training_info.json (+ marker, KEEP)."""
    d.mkdir(parents=True)
    for name in FILES:
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload(step, version, name))
    if info:
        (d / INFO_FILE).write_text(
            json.dumps({"step": step, "version": version, "val_loss": metric})
        )
    if pin:
        (d / "KEEP").touch()
    if marker:
        write_marker(d, MARKER)
    return d


def ckpt_version(d: Path, step: int, *, has_info: bool = True) -> str:
    """The version a checkpoint directory holds; fails if any file is missing or mixed."""
    first = (d / FILES[0]).read_bytes().split(b"\n", 1)[0].decode()
    s, version, _ = first.split("/", 2)
    assert int(s) == step, f"{d} holds step {s}"
    for name in FILES:
        assert (d / name).read_bytes() == payload(step, version, name), f"{d}/{name} differs"
    if has_info:
        info = json.loads((d / INFO_FILE).read_text())
        assert (info["step"], info["version"]) == (step, version), f"{d}: {info}"
    return version


def names(root: Path) -> set[str]:
    return {e.name for e in os.scandir(root)}


def trash_entries(root: Path) -> list[Path]:
    try:
        return sorted(Path(e.path) for e in os.scandir(trash_dir(root)))
    except FileNotFoundError:
        return []


def scan_and_plan(root: Path, policy: Policy, now: float | None = None) -> Plan:
    now = time.time() if now is None else now
    scan = scan_root(root, marker=policy.complete_marker, stale_before=now - policy.stale_after)
    return plan(scan, policy, now)


def run_pass(
    root: Path,
    policy: Policy,
    *,
    fs: Fs = OS_FS,
    workers: int = 4,
    now: float | None = None,
) -> list[Outcome]:
    """One pass as the daemon makes it: lock, scan, plan, apply, then purge the trash."""
    lock = RootLock(root, timeout=0, fs=fs)
    assert lock.acquire(), "root unexpectedly locked"
    try:
        outcomes = apply_plan(scan_and_plan(root, policy, now), fs=fs)
        purge_trash(root, trash_entries(root), fs=fs, workers=workers)
    finally:
        lock.release()
    return outcomes


def set_times(top: Path, when: float) -> None:
    """Set the atime and mtime of a whole tree (its ctime becomes now: it cannot be set)."""
    for dirpath, _, filenames in os.walk(top, topdown=False):
        for name in filenames:
            os.utime(Path(dirpath) / name, (when, when))
        os.utime(dirpath, (when, when))


# Staleness goes by the newest of mtime and ctime, and a test cannot set a ctime back: a save
# abandoned hours ago is planned with a clock that far ahead, and a save "being written" under
# that clock gets the clock's time as its mtime.
AHEAD = 2 * 3600.0


def by_action(outcomes: list[Outcome], action: Action) -> list[Outcome]:
    return [o for o in outcomes if o.decision.action is action]


NO_BOUND = Policy()
TOP1 = Policy(keep_top_k=1, metric_name="val_loss", keep_latest=False)


# -- each action on real directories ------------------------------------------------------------


def test_finalize_renames_a_complete_save_into_place(tmp_path: Path) -> None:
    write_ckpt(tmp_path / "step_1", 1, "v0", 0.5)
    write_ckpt(tmp_path / "tmp_step_2", 2, "v1", 0.4, marker=True)
    outcomes = apply_plan(scan_and_plan(tmp_path, NO_BOUND))
    (fin,) = outcomes
    assert (fin.decision.action, fin.status, fin.ok) == (Action.FINALIZE, "done", True)
    assert ckpt_version(tmp_path / "step_2", 2) == "v1"
    assert (tmp_path / "step_2" / MARKER).is_file()  # the marker is kept after finalize
    assert names(tmp_path) == {"step_1", "step_2"}
    assert fin.duration_ms >= 0


def test_replace_moves_the_old_copy_to_trash_and_shows_the_new_one(tmp_path: Path) -> None:
    write_ckpt(tmp_path / "step_2", 2, "v0", 0.5)
    write_ckpt(tmp_path / "tmp_step_2", 2, "v1", 0.4, marker=True)
    (rep,) = apply_plan(scan_and_plan(tmp_path, NO_BOUND))
    assert (rep.decision.action, rep.status) == (Action.REPLACE, "done")
    assert ckpt_version(tmp_path / "step_2", 2) == "v1"
    assert names(tmp_path) == {"step_2", ".ckptkeeper"}
    assert rep.trash_path is not None and rep.trash_path.parent == trash_dir(tmp_path)
    assert ckpt_version(rep.trash_path, 2) == "v0"  # intact until purged
    (removal,) = (r for _, r in purge_trash(tmp_path, [rep.trash_path]))
    assert removal.left == [] and removal.files == len(FILES) + 1
    assert trash_entries(tmp_path) == []


def test_restore_puts_the_old_copy_back(tmp_path: Path) -> None:
    write_ckpt(tmp_path / "old_step_3", 3, "v0", 0.5)
    write_ckpt(tmp_path / "tmp_step_3", 3, "v1", 0.4)  # never completed
    (res,) = apply_plan(scan_and_plan(tmp_path, NO_BOUND))
    assert (res.decision.action, res.status) == (Action.RESTORE, "done")
    assert ckpt_version(tmp_path / "step_3", 3) == "v0"
    assert names(tmp_path) == {"step_3", "tmp_step_3"}


def test_interrupted_replace_with_a_complete_save_is_finished(tmp_path: Path) -> None:
    write_ckpt(tmp_path / "old_step_3", 3, "v0", 0.5)
    write_ckpt(tmp_path / "tmp_step_3", 3, "v1", 0.4, marker=True)
    outcomes = run_pass(tmp_path, NO_BOUND)
    assert {o.decision.action: o.status for o in outcomes}[Action.FINALIZE] == "done"
    assert ckpt_version(tmp_path / "step_3", 3) == "v1"
    assert names(tmp_path) == {"step_3", ".ckptkeeper"}
    assert trash_entries(tmp_path) == []


def test_old_step_beside_its_step_is_discarded(tmp_path: Path) -> None:
    write_ckpt(tmp_path / "step_3", 3, "v1", 0.5)
    write_ckpt(tmp_path / "old_step_3", 3, "v0", 0.4)
    outcomes = run_pass(tmp_path, NO_BOUND)
    assert [(o.decision.action, o.status) for o in outcomes] == [(Action.DISCARD, "done")]
    assert ckpt_version(tmp_path / "step_3", 3) == "v1"
    assert names(tmp_path) == {"step_3", ".ckptkeeper"}


def test_stale_save_is_collected_and_a_fresh_one_waits(tmp_path: Path) -> None:
    stale = write_ckpt(tmp_path / "tmp_step_4", 4, "v0", info=False)
    set_times(stale, 1)
    now = time.time() + AHEAD
    fresh = write_ckpt(tmp_path / "tmp_step_5", 5, "v0", info=False)
    set_times(fresh, now - 1)  # written a second before the plan's clock
    outcomes = run_pass(tmp_path, Policy(stale_after=3600), now=now)
    assert [(o.decision.action, o.status) for o in outcomes] == [(Action.COLLECT, "done")]
    assert names(tmp_path) == {"tmp_step_5", ".ckptkeeper"}


def test_a_save_copied_with_preserved_mtimes_is_not_collected(tmp_path: Path) -> None:
    """``cp -a`` (like ``rsync -a``, ``tar x``) fills tmp_step_4 with 3-day-old mtimes, no marker
    yet: its ctimes say it was written just now, so it waits. Only a clock an hour past the
    copy finds it stale (a ctime cannot be set back to make a really old one)."""
    source = write_ckpt(tmp_path / "source", 4, "v0", info=False)
    set_times(source, time.time() - 3 * 86400)
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["cp", "-a", str(source), str(root / "tmp_step_4")], check=True)
    policy = Policy(stale_after=3600)
    assert os.lstat(root / "tmp_step_4" / FILES[1]).st_mtime < time.time() - 2 * 86400

    assert run_pass(root, policy) == []
    (wait,) = scan_and_plan(root, policy)
    assert wait.action is Action.WAIT and wait.reasons[0].startswith("in flight: last write")
    assert ckpt_version(root / "tmp_step_4", 4, has_info=False) == "v0"

    outcomes = run_pass(root, policy, now=time.time() + 3601)
    assert [(o.decision.action, o.status) for o in outcomes] == [(Action.COLLECT, "done")]


def test_a_future_mtime_waits_and_says_so(tmp_path: Path) -> None:
    """A writer whose clock is ahead: its save is never stale, and the plan says why."""
    save = write_ckpt(tmp_path / "tmp_step_4", 4, "v0", info=False)
    ahead = time.time() + 3 * 3600 + 60
    os.utime(save / FILES[1], (ahead, ahead))
    (wait,) = scan_and_plan(tmp_path, Policy(stale_after=0))
    assert wait.action is Action.WAIT
    assert wait.reasons == ("in flight: last write 3.0h in the future (writer clock ahead?)",)
    assert run_pass(tmp_path, Policy(stale_after=0)) == []


def test_collect_skips_a_save_written_since_the_plan(tmp_path: Path) -> None:
    """The re-check under the lock looks at the save's last change again (mtime or ctime)."""
    save = write_ckpt(tmp_path / "tmp_step_4", 4, "v0", info=False)
    last = max(max(os.lstat(p).st_mtime, os.lstat(p).st_ctime) for p in [save, *save.rglob("*")])
    policy = Policy(stale_after=3600)
    p = scan_and_plan(tmp_path, policy, now=last + 3600 + 0.001)  # stale by a millisecond
    assert [d.action for d in p] == [Action.COLLECT]
    wait_until(lambda: time.time() > last + 0.05, what="the clock to pass the plan's threshold")
    (save / "policy" / "late.bin").write_bytes(b"late")  # old mtime: its ctime is now
    os.utime(save / "policy" / "late.bin", (1, 1))
    (out,) = apply_plan(p)
    assert (out.status, out.detail) == ("skipped", "written since the plan: no longer stale")
    assert (save / "policy" / "late.bin").exists()


def test_delete_moves_to_trash_then_purge_removes(tmp_path: Path) -> None:
    for s, m in ((1, 0.5), (2, 0.1), (3, 0.7)):
        write_ckpt(tmp_path / f"step_{s}", s, "v0", m)
    outcomes = apply_plan(scan_and_plan(tmp_path, TOP1))
    assert sorted((o.decision.step, o.status) for o in outcomes) == [(1, "done"), (3, "done")]
    assert names(tmp_path) == {"step_2", ".ckptkeeper"}
    trashed = [o.trash_path for o in outcomes]
    assert all(p is not None and p.parent == trash_dir(tmp_path) for p in trashed)
    assert sorted(trash_entries(tmp_path)) == sorted(p for p in trashed if p is not None)
    results = purge_trash(tmp_path, trash_entries(tmp_path), workers=2)
    assert all(r.left == [] for _, r in results)
    assert trash_entries(tmp_path) == []


# -- re-checks before acting -------------------------------------------------------------------


def _delete_one_setup(root: Path) -> Plan:
    write_ckpt(root / "step_1", 1, "v0", 0.9)
    write_ckpt(root / "step_2", 2, "v0", 0.1)
    p = scan_and_plan(root, TOP1)
    assert p.deleted_steps == {1}
    return p


def test_delete_skips_a_step_pinned_after_planning(tmp_path: Path) -> None:
    p = _delete_one_setup(tmp_path)
    (tmp_path / "step_1" / "KEEP").touch()
    (out,) = apply_plan(p)
    assert (out.status, out.ok) == ("skipped", True)
    assert "pinned" in out.detail
    assert ckpt_version(tmp_path / "step_1", 1) == "v0"


def test_delete_skips_a_directory_replaced_after_planning(tmp_path: Path) -> None:
    p = _delete_one_setup(tmp_path)
    (tmp_path / "step_1").rename(tmp_path / "parked")  # keeps its inode busy
    write_ckpt(tmp_path / "step_1", 1, "v1", 0.9)
    (out,) = apply_plan(p)
    assert out.status == "skipped"
    assert "replaced" in out.detail
    assert ckpt_version(tmp_path / "step_1", 1) == "v1"


def test_delete_skips_a_directory_swapped_for_a_symlink(tmp_path: Path) -> None:
    root = tmp_path / "root"
    p = _delete_one_setup(root)
    outside = write_ckpt(tmp_path / "outside", 1, "v9", 0.1)
    (root / "step_1").rename(tmp_path / "parked")
    (root / "step_1").symlink_to(outside)
    (out,) = apply_plan(p)
    assert out.status == "skipped"
    assert "no longer a directory" in out.detail
    assert (root / "step_1").is_symlink()
    assert ckpt_version(outside, 1) == "v9"


def test_delete_of_a_step_already_gone_is_success(tmp_path: Path) -> None:
    p = _delete_one_setup(tmp_path)
    (tmp_path / "step_1").rename(tmp_path / "elsewhere")  # another actor got there first
    (out,) = apply_plan(p)
    assert (out.status, out.ok, out.errno_name) == ("gone", True, "ENOENT")


def test_collect_skips_when_the_marker_or_a_writer_lock_appears(tmp_path: Path) -> None:
    for s in (4, 5):
        set_times(write_ckpt(tmp_path / f"tmp_step_{s}", s, "v0", info=False), 1)
    p = scan_and_plan(tmp_path, Policy(stale_after=60), time.time() + AHEAD)
    assert len(p.by_action(Action.COLLECT)) == 2
    write_marker(tmp_path / "tmp_step_4", MARKER)
    with writer_lock(tmp_path / "tmp_step_5"):
        outcomes = apply_plan(p)
    details = {o.decision.step: (o.status, o.detail) for o in outcomes}
    assert details[4][0] == "skipped" and "marker appeared" in details[4][1]
    assert details[5][0] == "skipped" and "writer lock" in details[5][1]
    assert names(tmp_path) == {"tmp_step_4", "tmp_step_5"}


def test_restore_skips_when_the_step_exists_again(tmp_path: Path) -> None:
    write_ckpt(tmp_path / "old_step_3", 3, "v0", 0.5)
    p = scan_and_plan(tmp_path, NO_BOUND)
    write_ckpt(tmp_path / "step_3", 3, "v1", 0.5)
    outcomes = apply_plan(p)
    assert [(o.decision.action, o.status) for o in outcomes] == [(Action.RESTORE, "skipped")]
    assert ckpt_version(tmp_path / "step_3", 3) == "v1"
    assert ckpt_version(tmp_path / "old_step_3", 3) == "v0"


def test_finalize_skips_when_the_marker_vanished(tmp_path: Path) -> None:
    write_ckpt(tmp_path / "tmp_step_2", 2, "v1", 0.4, marker=True)
    p = scan_and_plan(tmp_path, NO_BOUND)
    (tmp_path / "tmp_step_2" / MARKER).unlink()
    (out,) = apply_plan(p)
    assert out.status == "skipped" and "marker vanished" in out.detail
    assert names(tmp_path) == {"tmp_step_2"}


def test_finalize_never_replaces_a_symlink_named_like_the_step(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_ckpt(root / "tmp_step_2", 2, "v1", 0.4, marker=True)
    outside = write_ckpt(tmp_path / "outside", 2, "v9", 0.1)
    p = scan_and_plan(root, NO_BOUND)
    (root / "step_2").symlink_to(outside)  # after the plan: the executor's re-check sees it
    outcomes = {o.decision.action: o for o in apply_plan(p)}
    assert outcomes[Action.FINALIZE].status == "skipped"
    assert "step_2 appeared since the plan" in outcomes[Action.FINALIZE].detail
    assert (root / "step_2").is_symlink()
    assert ckpt_version(outside, 2) == "v9"
    assert ckpt_version(root / "tmp_step_2", 2) == "v1"


def test_a_symlink_named_like_the_step_holds_back_its_finalize_in_the_plan(
    tmp_path: Path,
) -> None:
    """Already there when planned: the plan waits and says why (not "appeared since the plan"
    on every pass); nothing is renamed."""
    root = tmp_path / "root"
    write_ckpt(root / "tmp_step_2", 2, "v1", 0.4, marker=True)
    outside = write_ckpt(tmp_path / "outside", 2, "v9", 0.1)
    (root / "step_2").symlink_to(outside)
    p = scan_and_plan(root, NO_BOUND)
    (wait,) = (d for d in p if d.path == root / "tmp_step_2")
    assert (wait.action, wait.blocked) == (Action.WAIT, Action.FINALIZE)
    assert wait.reasons == ("step_2 is in the way (symlink: not followed): not finalized over it",)
    assert not p.mutates
    assert apply_plan(p) == []
    assert (root / "step_2").is_symlink()
    assert ckpt_version(outside, 2) == "v9"
    assert ckpt_version(root / "tmp_step_2", 2) == "v1"


def test_one_failing_decision_does_not_stop_the_others(tmp_path: Path) -> None:
    for s, m in ((1, 0.5), (2, 0.1), (3, 0.7), (4, 0.8)):
        write_ckpt(tmp_path / f"step_{s}", s, "v0", m)

    class FailFirstRename(Fs):
        failed = False

        def rename(self, src: Path, dst: Path) -> None:
            if not self.failed:
                self.failed = True
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
            super().rename(src, dst)

    outcomes = apply_plan(scan_and_plan(tmp_path, TOP1), fs=FailFirstRename())
    assert sorted(o.status for o in outcomes) == ["done", "done", "failed"]
    (failed,) = (o for o in outcomes if o.status == "failed")
    assert (failed.errno_name, failed.ok) == ("EIO", False)
    assert len(names(tmp_path) - {".ckptkeeper"}) == 2


def test_enoent_while_the_directory_still_exists_is_a_failure(tmp_path: Path) -> None:
    p = _delete_one_setup(tmp_path)

    class EnoentRename(Fs):
        def rename(self, src: Path, dst: Path) -> None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(dst))

    (out,) = apply_plan(p, fs=EnoentRename())
    assert (tmp_path / "step_1").is_dir()
    assert out.status == "failed"


def test_ambiguous_step_survives_a_complete_save_of_the_same_step(tmp_path: Path) -> None:
    write_ckpt(tmp_path / "step_7", 7, "v0", 0.5)
    write_ckpt(tmp_path / "step_07", 7, "v0b", 0.5)
    write_ckpt(tmp_path / "tmp_step_7", 7, "v1", 0.4, marker=True)
    run_pass(tmp_path, Policy(keep_top_k=0, metric_name="val_loss"))
    assert ckpt_version(tmp_path / "step_7", 7) == "v0"
    assert ckpt_version(tmp_path / "step_07", 7) == "v0b"


def test_pinned_step_survives_being_replaced(tmp_path: Path) -> None:
    write_ckpt(tmp_path / "step_1", 1, "v0", 0.1)
    write_ckpt(tmp_path / "step_2", 2, "v0", 0.5, pin=True)
    write_ckpt(tmp_path / "step_3", 3, "v0", 0.2)
    write_ckpt(tmp_path / "tmp_step_2", 2, "v1", 0.9, marker=True)
    run_pass(tmp_path, Policy(keep_top_k=1, metric_name="val_loss"))
    assert (tmp_path / "step_2").is_dir()
    assert (tmp_path / "step_2" / "KEEP").exists()


def test_replacing_a_non_canonical_step_leaves_one_name(tmp_path: Path) -> None:
    write_ckpt(tmp_path / "step_07", 7, "v0", 0.5)
    write_ckpt(tmp_path / "tmp_step_7", 7, "v1", 0.4, marker=True)
    run_pass(tmp_path, NO_BOUND)
    assert names(tmp_path) - {".ckptkeeper"} == {"step_7"}
    assert ckpt_version(tmp_path / "step_7", 7) == "v1"


# -- a scenario with every kind of work, for faults and crashes ---------------------------------

SCENARIO_POLICY = Policy(keep_top_k=2, metric_name="val_loss", stale_after=3600.0)
# Planned from the initial state: top-2 by val_loss {3 (replaced, 0.10), 9 (restored, 0.15)},
# latest 10 (finalized), pinned 4 and 7 (7's complete save holds KEEP), 6 has no training_info.
KEPT = {3: "v1", 4: "v0", 6: "v0", 7: "v1", 9: "v0", 10: "v1"}
DELETED = {1, 2, 5}
# Any step_N visible at any instant must be complete in one of these versions.
ALLOWED = {1: {"v0"}, 2: {"v0"}, 3: {"v0", "v1"}, 4: {"v0"}, 5: {"v0"}, 6: {"v0"}, 7: {"v1"},
           9: {"v0"}, 10: {"v1"}}  # fmt: skip
NOT_OURS = {"step_1-hf", "notes.txt", "step_12", "ckptkeeper.toml"}


@dataclass
class Scenario:
    root: Path
    outside: Path

    def outside_snapshot(self) -> dict[str, bytes]:
        return {
            str(p.relative_to(self.outside)): p.read_bytes()
            for p in sorted(self.outside.rglob("*"))
            if p.is_file()
        }


def build_scenario(base: Path) -> Scenario:
    root = base / "root"
    outside = base / "outside"
    write_ckpt(outside, 12, "v9", 0.0)
    write_ckpt(root / "step_1", 1, "v0", 0.50)
    write_ckpt(root / "step_2", 2, "v0", 0.20)
    write_ckpt(root / "step_3", 3, "v0", 0.60)
    write_ckpt(root / "tmp_step_3", 3, "v1", 0.10, marker=True)  # replace
    write_ckpt(root / "step_4", 4, "v0", 0.70, pin=True)
    write_ckpt(root / "step_5", 5, "v0", 0.40)
    write_ckpt(root / "step_6", 6, "v0", info=False)
    write_ckpt(root / "old_step_7", 7, "v0", 0.30)  # interrupted replace, new save complete
    write_ckpt(root / "tmp_step_7", 7, "v1", 0.35, marker=True, pin=True)
    write_ckpt(root / "old_step_9", 9, "v0", 0.15)  # interrupted replace, new save abandoned
    stale = write_ckpt(root / "tmp_step_9", 9, "v1", 0.05)
    write_ckpt(root / "tmp_step_10", 10, "v1", 0.90, marker=True)  # finalize, the latest
    busy = write_ckpt(root / "tmp_step_11", 11, "v1", 0.01)  # being written right now
    write_ckpt(trash_dir(root) / "1000-step_0", 0, "v0", 0.1)  # an earlier pass's leftover
    write_ckpt(root / "step_1-hf", 1, "hf", 0.0)
    (root / "notes.txt").write_text("not a checkpoint")
    (root / "ckptkeeper.toml").write_text("keep_top_k = 2\n")
    (root / "step_12").symlink_to(outside)
    set_times(stale, time.time() - 10 * 3600)  # abandoned (planned with the clock AHEAD)
    set_times(busy, time.time() + AHEAD)  # its last write: "now" on the scenario's clock
    return Scenario(root, outside)


def scenario_reference(tmp_path: Path) -> dict[str, bytes]:
    return build_scenario(tmp_path / "reference").outside_snapshot()


def assert_every_visible_step_is_complete(root: Path) -> None:
    for name in names(root):
        if name.startswith("step_") and name[5:].isdigit() and not (root / name).is_symlink():
            step = int(name[5:])
            version = ckpt_version(root / name, step, has_info=step != 6)
            assert version in ALLOWED[step], f"{name} holds {version}"


def assert_kept_steps_recoverable(root: Path) -> None:
    present = names(root)
    for step in KEPT:
        tmp_done = f"tmp_step_{step}" in present and (root / f"tmp_step_{step}" / MARKER).exists()
        assert f"step_{step}" in present or tmp_done or f"old_step_{step}" in present, (
            f"kept step {step} lost: {sorted(present)}"
        )


def assert_untouched(sc: Scenario, reference: dict[str, bytes]) -> None:
    assert sc.outside_snapshot() == reference
    assert ckpt_version(sc.root / "step_1-hf", 1) == "hf"
    assert (sc.root / "notes.txt").read_text() == "not a checkpoint"
    assert (sc.root / "step_12").is_symlink()
    assert os.readlink(sc.root / "step_12") == str(sc.outside)
    assert ckpt_version(sc.root / "tmp_step_11", 11) == "v1"


def assert_planned_state(sc: Scenario, reference: dict[str, bytes]) -> None:
    root = sc.root
    expected = {f"step_{s}" for s in KEPT} | NOT_OURS | {"tmp_step_11", ".ckptkeeper"}
    assert names(root) == expected
    for step, version in KEPT.items():
        assert ckpt_version(root / f"step_{step}", step, has_info=step != 6) == version
    assert (root / "step_4" / "KEEP").exists() and (root / "step_7" / "KEEP").exists()
    assert trash_entries(root) == []
    assert_untouched(sc, reference)
    # Idempotent: nothing more to do.
    again = scan_and_plan(root, SCENARIO_POLICY, time.time() + AHEAD)
    assert not again.mutates, [d for d in again if d.action not in (Action.KEEP, Action.WAIT)]


def test_scenario_plan_is_what_the_tests_expect(tmp_path: Path) -> None:
    sc = build_scenario(tmp_path)
    p = scan_and_plan(sc.root, SCENARIO_POLICY, time.time() + AHEAD)
    assert p.kept_steps == set(KEPT)
    assert p.deleted_steps == DELETED
    actions = {(d.action, d.step) for d in p if d.action not in (Action.KEEP, Action.DELETE)}
    assert actions == {
        (Action.REPLACE, 3),
        (Action.DISCARD, 7),
        (Action.FINALIZE, 7),
        (Action.RESTORE, 9),
        (Action.COLLECT, 9),
        (Action.FINALIZE, 10),
        (Action.WAIT, 11),
        (Action.IGNORE, 12),
        (Action.PURGE, None),
    }
    run_pass(sc.root, SCENARIO_POLICY, now=time.time() + AHEAD)
    assert_planned_state(sc, scenario_reference(tmp_path))


# -- fault injection -------------------------------------------------------------------------------


class FaultFs(Fs):
    """Raises OSError(err) on the k-th call of one operation (thread-safe count)."""

    def __init__(self, op: str, err: int, k: int) -> None:
        self.op, self.err, self.k = op, err, k
        self.calls = 0
        self.fired = False
        self._lock = threading.Lock()

    def _tick(self, op: str, path: object) -> None:
        if op != self.op:
            return
        with self._lock:
            self.calls += 1
            hit = self.calls == self.k
        if hit:
            self.fired = True
            raise OSError(self.err, os.strerror(self.err), str(path))

    def rename(self, src: Path, dst: Path) -> None:
        self._tick("rename", src)
        super().rename(src, dst)

    def unlink(self, path: str | Path, dir_fd: int | None = None) -> None:
        self._tick("unlink", path)
        super().unlink(path, dir_fd=dir_fd)

    def rmdir(self, path: str | Path, dir_fd: int | None = None) -> None:
        self._tick("rmdir", path)
        super().rmdir(path, dir_fd=dir_fd)

    def mkdir(self, path: str | Path, mode: int = 0o755, dir_fd: int | None = None) -> None:
        self._tick("mkdir", path)
        super().mkdir(path, mode, dir_fd=dir_fd)

    def open(
        self, path: str | Path, flags: int, mode: int = 0o644, dir_fd: int | None = None
    ) -> int:
        self._tick("open", path)
        return super().open(path, flags, mode, dir_fd)

    def write(self, fd: int, data: bytes) -> int:
        self._tick("write", fd)
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._tick("fsync", fd)
        super().fsync(fd)


ERRNOS = ["EIO", "ENOSPC", "EACCES", "EROFS", "EBUSY", "ENOENT"]
# Which k-th calls to break, per operation. A pass makes 11 renames (restore, replace x3,
# finalize x2 + trash of the old copy, collect, 3 deletes), 13 mkdirs (lock area, trash dirs),
# 4 fsyncs, one open (the root lock), dozens of unlinks/rmdirs in the purge, and no write.
KTH = {
    "rename": list(range(1, 12)),
    "mkdir": [1, 2, 3, 4, 6, 9],
    "open": [1],
    "write": [1],
    "fsync": [1, 2, 3, 4],
    "unlink": [1, 2, 7, 20],
    "rmdir": [1, 2, 5, 9],
}
FAULT_CASES = [
    pytest.param(op, name, k, id=f"{op}-{name}-{k}")
    for name in ERRNOS
    for op, ks in KTH.items()
    for k in ks
]


@pytest.fixture
def fast_tmp(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs directory when the machine has one, else ``tmp_path``.

    The fault table and the crash loop build ~250 scenarios of ~70 files; on the disk-backed
    /tmp that alone takes ~20 s, on tmpfs well under a second. rename/flock/O_NOFOLLOW behave
    the same on both, which is all these tests depend on.
    """
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="ckptkeeper-test-", dir=shm))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return scenario_reference(tmp_path_factory.mktemp("ref"))


@pytest.mark.parametrize(("op", "err_name", "k"), FAULT_CASES)
def test_a_fault_leaves_a_safe_state_and_a_clean_pass_reaches_the_plan(
    fast_tmp: Path, reference: dict[str, bytes], op: str, err_name: str, k: int
) -> None:
    sc = build_scenario(fast_tmp)
    fs = FaultFs(op, getattr(errno, err_name), k)

    try:
        run_pass(sc.root, SCENARIO_POLICY, fs=fs, now=time.time() + AHEAD)
    except OSError as exc:  # only the root lock may stop a whole pass
        # (EACCES on opening the lock for writing: a read-only open is tried, and finds none)
        retried = op == "open" and err_name == "EACCES"
        assert op in ("open", "mkdir") and fs.calls == (2 if retried else 1), exc

    assert fs.fired or op == "write"
    assert_every_visible_step_is_complete(sc.root)
    assert_kept_steps_recoverable(sc.root)
    assert_untouched(sc, reference)

    run_pass(sc.root, SCENARIO_POLICY, now=time.time() + AHEAD)
    assert_planned_state(sc, reference)


# -- crash at every mutating call (SIGKILL-like os._exit) ----------------------------------------


class CrashFs(Fs):
    """Exits the process abruptly at the k-th mutating call (rename/unlink/rmdir/mkdir)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.calls = 0
        self._lock = threading.Lock()

    def _tick(self) -> None:
        with self._lock:
            self.calls += 1
            if self.calls == self.k:
                os._exit(137)

    def rename(self, src: Path, dst: Path) -> None:
        self._tick()
        super().rename(src, dst)

    def unlink(self, path: str | Path, dir_fd: int | None = None) -> None:
        self._tick()
        super().unlink(path, dir_fd=dir_fd)

    def rmdir(self, path: str | Path, dir_fd: int | None = None) -> None:
        self._tick()
        super().rmdir(path, dir_fd=dir_fd)

    def mkdir(self, path: str | Path, mode: int = 0o755, dir_fd: int | None = None) -> None:
        self._tick()
        super().mkdir(path, mode, dir_fd=dir_fd)


def run_in_child(fn: Callable[[], None]) -> int:
    """Run ``fn`` in a forked child; its exit status (0 done, 137 crashed, 1 raised)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_pass_killed_at_any_mutating_call_is_recovered_by_the_next(
    fast_tmp: Path, reference: dict[str, bytes]
) -> None:
    crashes = 0
    for k in range(1, 1000):
        sc = build_scenario(fast_tmp / f"k{k}")
        code = run_in_child(functools.partial(_crashing_pass, sc.root, k))
        assert code in (0, 137), f"k={k}: the pass raised (exit {code})"

        # Invariants 1-4 hold at the instant of the crash.
        assert_every_visible_step_is_complete(sc.root)
        assert_kept_steps_recoverable(sc.root)
        assert_untouched(sc, reference)
        probe = RootLock(sc.root, timeout=0)
        assert probe.acquire(), "the dead pass still holds the lock"
        probe.release()

        # Invariant 5: a clean pass finishes or undoes what the crashed pass began.
        run_pass(sc.root, SCENARIO_POLICY, now=time.time() + AHEAD)
        assert_planned_state(sc, reference)
        if code == 0:
            break
        crashes += 1
    else:
        pytest.fail("the pass never completed")
    assert crashes >= 50  # every rename, mkdir, unlink and rmdir of the pass was a crash point


def _crashing_pass(root: Path, k: int) -> None:
    run_pass(root, SCENARIO_POLICY, fs=CrashFs(k), workers=4, now=time.time() + AHEAD)
