"""The executor: carries out a `plan.Plan` on disk. The caller holds the root lock.

Each decision is re-checked just before it is acted on (the directory may have been pinned,
replaced, swapped for a symlink or removed since the plan); a decision that no longer holds is
skipped and reported, never forced. One failing decision never stops the others.
"""

from __future__ import annotations

import contextlib
import errno
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .effects import OS_FS, Fs
from .errors import errno_name, strerror
from .layouts import file_checkpoints, pin_paths
from .names import Kind
from .plan import APPLIED, Action, Decision, Plan
from .storage import PosixStorage, Storage, purge_trash

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
    storage: Storage | None = None,
    fs: Fs = OS_FS,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Apply every mutating decision of ``plan`` except trash purges (`Storage.remove_trash`),
    through ``storage`` (POSIX over ``fs`` when not given)."""
    store: Storage = storage if storage is not None else PosixStorage(fs)
    outcomes: list[Outcome] = []
    todo = sorted(
        (d for d in plan.decisions if d.action in _ORDER),
        key=lambda d: (_ORDER[d.action], d.step or 0),
    )
    for decision in todo:
        started = time.perf_counter()
        moved: list[bool] = []  # set once this action has renamed decision.path itself
        try:
            trash_path = _Executor(plan, store).apply(decision, moved)
            outcome = Outcome(decision, "done", trash_path=trash_path)
        except _Skip as skip:
            outcome = Outcome(decision, "skipped", str(skip))
        except FileNotFoundError as exc:
            if moved or store.lstat(decision.path) is not None:  # ENOENT for something else
                outcome = Outcome(decision, "failed", f"{strerror(exc)} ({exc.filename})", "ENOENT")
            else:  # someone else already did it: a lost race is success
                outcome = Outcome(decision, "gone", f"already gone: {exc.filename}", "ENOENT")
        except OSError as exc:
            detail = f"{strerror(exc)} ({exc.filename})"
            outcome = Outcome(decision, "failed", detail, errno_name(exc))
        outcome = _timed(outcome, started)
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    return outcomes


def _timed(outcome: Outcome, started: float) -> Outcome:
    return replace(outcome, duration_ms=(time.perf_counter() - started) * 1000)


class _Executor:
    """Carries out one decision of ``plan`` through ``storage``, re-checking it first."""

    def __init__(self, plan: Plan, storage: Storage) -> None:
        self.plan, self.storage, self.layout = plan, storage, plan.layout

    def apply(self, d: Decision, moved: list[bool]) -> Path | None:
        store, root = self.storage, self.plan.root
        if d.action is Action.DELETE:
            self.check_same_dir(d)
            if self.pinned(d.path):
                raise _Skip(f"pinned since the plan ({self.layout.pin_file} file)")
            return store.trash(root, d.path)
        if d.action is Action.DISCARD:
            self.check_same_dir(d)
            return store.trash(root, d.path)
        if d.action is Action.COLLECT:
            self.check_still_stale(d)
            return store.trash(root, d.path)
        if d.action is Action.RESTORE:
            self.restore(d, moved)
            return None
        return self.finalize(d, moved)  # FINALIZE / REPLACE of a complete save

    def pinned(self, path: Path) -> bool:
        """A pin file is there (inside a directory checkpoint, or beside a file one)."""
        for pin in pin_paths(self.layout, path):
            try:
                if self.storage.lstat(pin) is not None:
                    return True
            except NotADirectoryError:  # inside a checkpoint that is a file: no such pin
                continue
        return False

    def name(self, kind: Kind, d: Decision) -> Path:
        assert d.step is not None
        return self.plan.root / self.layout.format(kind, d.step)

    def check_same_dir(self, d: Decision) -> None:
        st = self.storage.lstat(d.path)
        if st is None:
            raise FileNotFoundError(errno.ENOENT, "gone", str(d.path))
        if not stat.S_ISDIR(st.st_mode) and not (
            stat.S_ISREG(st.st_mode) and file_checkpoints(self.layout)
        ):
            raise _Skip("changed since the plan: no longer a directory")
        if d.identity != (0, 0) and (st.st_dev, st.st_ino) != d.identity:
            raise _Skip("changed since the plan: replaced by another directory")

    def check_still_stale(self, d: Decision) -> None:
        """A save to collect is still abandoned: no marker, no writer lock (nor one we cannot
        probe), nothing changed in it since the plan's ``now - stale_after`` (mtime or ctime)."""
        plan, store = self.plan, self.storage
        self.check_same_dir(d)
        look = store.look(self.layout, d.path, plan.now)
        if look is not None and (look.complete or not look.collectable):
            raise _Skip(f"no longer garbage since the plan: {look.waiting or 'complete'}")
        if store.lstat(d.path / plan.policy.complete_marker) is not None:
            raise _Skip("completion marker appeared since the plan")
        lock = store.writer_lock(d.path, self.layout.writer_lock)
        if lock.unreadable is not None:
            raise _Skip(f"writer lock unreadable ({lock.unreadable}): treated as held")
        if lock.held:
            raise _Skip("writer lock taken since the plan")
        threshold = plan.now - plan.policy.stale_after
        if store.last_change(d.path, threshold) > threshold:
            raise _Skip("written since the plan: no longer stale")

    def restore(self, d: Decision, moved: list[bool]) -> None:
        self.check_same_dir(d)
        target = self.name(Kind.STEP, d)
        if self.storage.lstat(target) is not None:
            raise _Skip(f"{target.name} exists again: the old copy is left for the next pass")
        self.storage.rename(d.path, target)
        moved.append(True)
        self.storage.sync(self.plan.root)

    def finalize(self, d: Decision, moved: list[bool]) -> Path | None:
        store, root = self.storage, self.plan.root
        self.check_same_dir(d)
        if store.lstat(d.path / self.plan.policy.complete_marker) is None:
            raise _Skip("completion marker vanished since the plan")
        target, old = self.name(Kind.STEP, d), self.name(Kind.OLD, d)
        current = d.replaces if d.action is Action.REPLACE else None
        existing = store.lstat(current) if current is not None else None
        if store.lstat(target) is not None and (current is None or current != target):
            raise _Skip(f"{target.name} appeared since the plan: not finalized over it")
        if existing is not None and current is not None:
            if not stat.S_ISDIR(existing.st_mode):
                raise _Skip(f"{current.name} is not a directory any more: not replaced")
            if d.carry_pin or store.lstat(current / self.layout.pin_file) is not None:
                store.pin(d.path, self.layout.pin_file)  # the replaced step was pinned: so is this
            self.replace(d.path, current, target, old)
        else:
            if d.carry_pin:
                store.pin(d.path, self.layout.pin_file)
            store.rename(d.path, target)
        moved.append(True)
        store.sync(root)
        if current is not None and store.lstat(old) is not None:
            return store.trash(root, old)
        return None

    def replace(self, src: Path, current: Path, target: Path, old: Path) -> None:
        """``current`` aside as ``old``, then ``src`` in as ``target``."""
        store, root = self.storage, self.plan.root
        if store.lstat(old) is not None:
            store.trash(root, old)  # garbage beside a live step
        store.rename(current, old)
        try:
            store.rename(src, target)
        except BaseException:
            # Put the live step back so it never goes missing between passes (best effort: if
            # this fails too, the old copy is restored by the next pass, invariant 5).
            if store.lstat(current) is None:
                with contextlib.suppress(OSError):
                    store.rename(old, current)
            raise
