"""The executor: carries out a `plan.Plan` on disk. The caller holds the root lock.

Each decision is re-checked just before it is acted on (the directory may have been pinned,
replaced, swapped for a symlink or removed since the plan); a decision that no longer holds is
skipped and reported, never forced. One failing decision never stops the others.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .effects import OS_FS, Fs, fsync_dir, move_to_trash, open_area
from .names import old_name, step_name
from .plan import APPLIED, Action, Decision, Plan
from .removal import Removal, remove_tree
from .scan import CKPTKEEPER_DIR, PIN_FILE, newest_mtime, probe_writer_lock, trash_dir

__all__ = ["Outcome", "apply_plan", "purge_trash"]


@dataclass(frozen=True, slots=True)
class Outcome:
    decision: Decision
    status: str  # "done" | "skipped" | "failed" | "gone" (a lost race: someone else already did it)
    detail: str = ""
    errno_name: str | None = None
    bytes: int = 0
    duration_ms: float = 0.0
    trash_path: Path | None = None

    @property
    def ok(self) -> bool:
        return self.status != "failed"


class _Skip(Exception):
    pass


# Order matters: resolve interrupted replaces, then finalize, then collect and delete.
_ORDER = {
    Action.RESTORE: 0,
    Action.FINALIZE: 1,
    Action.REPLACE: 1,
    Action.DISCARD: 2,
    Action.COLLECT: 3,
    Action.DELETE: 4,
}
assert set(_ORDER) == APPLIED


def apply_plan(
    plan: Plan,
    *,
    fs: Fs = OS_FS,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Apply every mutating decision of ``plan`` except trash purges (see `purge_trash`)."""
    outcomes: list[Outcome] = []
    todo = sorted(
        (d for d in plan.decisions if d.action in _ORDER),
        key=lambda d: (_ORDER[d.action], d.step or 0),
    )
    for decision in todo:
        started = time.perf_counter()
        moved: list[bool] = []  # set once this action has renamed decision.path itself
        try:
            trash_path = _apply_one(plan, decision, fs, moved)
            outcome = Outcome(decision, "done", trash_path=trash_path)
        except _Skip as skip:
            outcome = Outcome(decision, "skipped", str(skip))
        except FileNotFoundError as exc:
            if moved or os.path.lexists(decision.path):  # ENOENT for something else: a failure
                outcome = Outcome(decision, "failed", f"{exc.strerror} ({exc.filename})", "ENOENT")
            else:  # someone else already did it: a lost race is success
                outcome = Outcome(decision, "gone", f"already gone: {exc.filename}", "ENOENT")
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, "OSError")
            outcome = Outcome(decision, "failed", f"{exc.strerror or exc} ({exc.filename})", name)
        outcome = _timed(outcome, started)
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    return outcomes


def _timed(outcome: Outcome, started: float) -> Outcome:
    return replace(outcome, duration_ms=(time.perf_counter() - started) * 1000)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _check_same_dir(path: Path, identity: tuple[int, int]) -> None:
    st = _lstat(path)
    if st is None:
        raise FileNotFoundError(errno.ENOENT, "gone", str(path))
    if not stat.S_ISDIR(st.st_mode):
        raise _Skip("changed since the plan: no longer a directory")
    if identity != (0, 0) and (st.st_dev, st.st_ino) != identity:
        raise _Skip("changed since the plan: replaced by another directory")


def _check_still_stale(plan: Plan, d: Decision) -> None:
    """A save to collect is still abandoned: no marker, no writer lock (nor one we cannot
    probe), and nothing changed in it since the plan's ``now - stale_after`` (mtime or ctime)."""
    _check_same_dir(d.path, d.identity)
    if _lstat(d.path / plan.policy.complete_marker) is not None:
        raise _Skip("completion marker appeared since the plan")
    lock = probe_writer_lock(d.path)
    if lock.unreadable is not None:
        raise _Skip(f"writer lock unreadable ({lock.unreadable}): treated as held")
    if lock.held:
        raise _Skip("writer lock taken since the plan")
    threshold = plan.now - plan.policy.stale_after
    if newest_mtime(d.path, stop_above=threshold) > threshold:
        raise _Skip("written since the plan: no longer stale")


def _apply_one(plan: Plan, d: Decision, fs: Fs, moved: list[bool]) -> Path | None:
    root = plan.root
    assert d.step is not None
    target = root / step_name(d.step)
    if d.action is Action.DELETE:
        _check_same_dir(d.path, d.identity)
        if _lstat(d.path / PIN_FILE) is not None:
            raise _Skip("pinned since the plan (KEEP file)")
        return move_to_trash(root, d.path, fs)
    if d.action is Action.DISCARD:
        _check_same_dir(d.path, d.identity)
        return move_to_trash(root, d.path, fs)
    if d.action is Action.COLLECT:
        _check_still_stale(plan, d)
        return move_to_trash(root, d.path, fs)
    if d.action is Action.RESTORE:
        _check_same_dir(d.path, d.identity)
        if _lstat(target) is not None:
            raise _Skip(f"{target.name} exists again: the old copy is left for the next pass")
        fs.rename(d.path, target)
        moved.append(True)
        fsync_dir(root, fs)
        return None
    # FINALIZE / REPLACE of a complete tmp_step_N.
    _check_same_dir(d.path, d.identity)
    if _lstat(d.path / plan.policy.complete_marker) is None:
        raise _Skip("completion marker vanished since the plan")
    old = root / old_name(d.step)
    current = d.replaces if d.action is Action.REPLACE else None
    existing = _lstat(current) if current is not None else None
    if _lstat(target) is not None and (current is None or current != target):
        raise _Skip(f"{target.name} appeared since the plan: not finalized over it")
    if existing is not None and current is not None:
        if not stat.S_ISDIR(existing.st_mode):
            raise _Skip(f"{current.name} is not a directory any more: not replaced")
        if d.carry_pin or _lstat(current / PIN_FILE) is not None:
            _pin(d.path, fs)  # the replaced step was pinned: so is its new content
        if _lstat(old) is not None:
            move_to_trash(root, old, fs)  # garbage beside a live step_N
        fs.rename(current, old)
        try:
            fs.rename(d.path, target)
        except BaseException:
            # Put the live step back so it never goes missing between passes (best effort: if
            # this fails too, old_step_N is restored by the next pass, invariant 5).
            if _lstat(current) is None:
                with contextlib.suppress(OSError):
                    fs.rename(old, current)
            raise
    else:
        if d.carry_pin:
            _pin(d.path, fs)
        fs.rename(d.path, target)
    moved.append(True)
    fsync_dir(root, fs)
    if current is not None and _lstat(old) is not None:
        return move_to_trash(root, old, fs)
    return None


def _pin(directory: Path, fs: Fs) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = fs.open(directory / PIN_FILE, flags, 0o666)  # less the umask
    os.close(fd)


def purge_trash(
    root: Path,
    entries: list[Path],
    *,
    workers: int = 8,
    fs: Fs = OS_FS,
    cancel: threading.Event | None = None,
) -> list[tuple[Path, Removal]]:
    """Remove trash entries. No root lock needed: trash is ckptkeeper's own, removal idempotent.

    The trash directory is reached through descriptors opened without following symlinks, so a
    ``.ckptkeeper`` or ``trash`` swapped for a symlink makes the removal refuse, never reach
    outside the root.
    """
    trash = trash_dir(root)
    try:
        trash_fd = open_area(root, CKPTKEEPER_DIR, trash.name)
    except FileNotFoundError:
        return [(e, Removal()) for e in entries]  # no trash: nothing to remove
    except OSError as exc:
        return [(e, _refused(trash, exc)) for e in entries]
    try:
        out: list[tuple[Path, Removal]] = []
        for e in entries:
            if Path(e).parent != trash:
                refused = Removal()
                refused.leave(str(e), "not an entry of this root's trash: not removed")
                out.append((e, refused))
                continue
            removal = remove_tree(e, workers=workers, fs=fs, cancel=cancel, parent_fd=trash_fd)
            out.append((e, removal))
        return out
    finally:
        os.close(trash_fd)


def _refused(trash: Path, exc: OSError) -> Removal:
    refused = Removal()
    name = errno.errorcode.get(exc.errno or 0, "OSError")
    refused.leave(str(trash), f"{name}: {exc.strerror or exc}")
    return refused
