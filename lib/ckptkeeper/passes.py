"""The one locked pass: the only way anything changes a root.

lock -> scan -> plan -> apply -> unlock -> remove trash. The manager's inline finalize and prune,
its daemon-mode resume (`finalize_complete_saves`), the daemon's reconcile, the cron sweep and the
sidecar's final pass all call `locked_pass`; they differ only in which actions they let it carry
out (``actions``), which part of the root it considers (``select``), how long they wait for the
lock and what they log. Decisions are always the planner's, re-checked by the executor, so a rule
such as "a pin on a replaced step carries over" holds whoever finalizes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from .effects import OS_FS, Fs
from .execute import Outcome, apply_plan
from .plan import APPLIED, RECOVERY, Action, Decision, Plan, plan
from .policy import Policy
from .pressure import FreeSpace
from .records import RootScan
from .removal import Removal
from .scan import InfoCache
from .space import disk_facts
from .storage import PosixStorage, Storage

__all__ = [
    "EVERYTHING",
    "RECOVERY",
    "PassResult",
    "locked_pass",
    "one_save",
    "recovery_needed",
    "store_facts",
]

#: Every action a pass may take: everything the executor applies, and trash purges.
EVERYTHING: frozenset[Action] = APPLIED | {Action.PURGE}


@dataclass
class PassResult:
    root: Path
    status: str = "done"  # "done" | "busy" (the lock stayed taken for lock_timeout)
    scan: RootScan | None = None
    plan: Plan | None = None  # the whole plan (also the decisions outside ``actions``)
    outcomes: list[Outcome] = field(default_factory=list)
    removed: list[tuple[Path, Removal]] = field(default_factory=list)

    def outcome_for(self, path: Path) -> Outcome | None:
        return next((o for o in self.outcomes if o.decision.path == path), None)

    def decision_for(self, path: Path) -> Decision | None:
        decisions = self.plan.decisions if self.plan is not None else ()
        return next((d for d in decisions if d.path == path), None)


#: Called once a trashed entry was removed (or left), with the removal's wall time in ms: the
#: outcome that trashed it in this pass, or the PURGE decision of trash left by an earlier pass.
OnRemoved = Callable[[Outcome | Decision, Removal, float], None]


def locked_pass(
    root: Path,
    source: Policy | Callable[[], Policy],
    *,
    actions: Collection[Action] = EVERYTHING,
    select: Callable[[RootScan], RootScan] | None = None,
    steps: Collection[int] | None = None,
    lock_timeout: float | None = None,
    clock: Callable[[], float] = time.time,
    fs: Fs = OS_FS,
    storage: Storage | None = None,
    cache: InfoCache | None = None,
    workers: int = 8,
    cancel: threading.Event | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    on_removed: OnRemoved | None = None,
) -> PassResult:
    """One pass over ``root`` under its lock; carries out only the decisions in ``actions``.

    ``source`` is the policy, or a function giving it as it is once the lock is held (a run's
    settings file edited while the pass waited for the lock counts).

    ``select`` narrows the scan the planner sees (e.g. the manager's NeMo-RL prune considers only
    ``step_N`` with a training_info.json); ``steps`` makes the scan itself a partial one of those
    steps (`scan.scan_root`): for a ``select`` that keeps only them, at a cost that does not grow
    with the root. ``lock_timeout`` None waits for the lock, 0 tries once.
    What this pass trashed is removed after the unlock when ``policy.trash_grace`` is 0; trash
    past its grace is purged when ``actions`` holds PURGE. Raises OSError only when the root
    itself cannot be listed or locked.
    """
    root = Path(root)
    store: Storage = storage if storage is not None else PosixStorage(fs)
    result = PassResult(root)
    lock = store.lock(root, lock_timeout)
    if not lock.acquire():
        result.status = "busy"
        return result
    try:
        policy = source if isinstance(source, Policy) else source()
        now = clock()
        scan = store.scan(
            root,
            layout=policy.scan_layout(),
            marker=policy.complete_marker,
            cache=cache,
            stale_before=now - policy.stale_after,
            steps=steps,
        )
        result.scan = select(scan) if select is not None else scan
        free = store_facts(store, result.scan, policy, now, cache)
        result.plan = plan(result.scan, policy, now, free)
        chosen = result.plan.by_action(*(set(actions) & APPLIED))
        todo = Plan(root, policy, now, chosen, result.plan.layout)
        result.outcomes = apply_plan(todo, storage=store, on_outcome=on_outcome)
    finally:
        lock.release()
    _remove_trash(result, result.plan.policy, actions, store, workers, cancel, on_removed)
    return result


def _remove_trash(
    result: PassResult,
    policy: Policy,
    actions: Collection[Action],
    store: Storage,
    workers: int,
    cancel: threading.Event | None,
    on_removed: OnRemoved | None,
) -> None:
    """Outside the lock (trash is ckptkeeper's own; removal can take minutes)."""
    assert result.plan is not None
    todo: list[tuple[Path, Outcome | Decision]] = []
    if policy.trash_grace == 0:
        todo += [(o.trash_path, o) for o in result.outcomes if o.trash_path is not None]
    if Action.PURGE in actions:
        todo += [(d.path, d) for d in result.plan.by_action(Action.PURGE)]
    for path, cause in todo:
        started = time.perf_counter()
        [(_, removal)] = store.remove_trash(result.root, [path], workers=workers, cancel=cancel)
        result.removed.append((path, removal))
        if on_removed is not None:
            on_removed(cause, removal, (time.perf_counter() - started) * 1000)


def store_facts(
    store: Storage, scan: RootScan, policy: Policy, now: float, cache: InfoCache | None
) -> FreeSpace | None:
    """`space.disk_facts` of a root on a filesystem (statvfs; sizes only with ``min_free``);
    None where the storage has no local directory (an object store has no free-space figure)."""
    if store.local_dir(scan.root) is None:
        return None
    return disk_facts(scan, policy, now, cache)


def recovery_needed(scan: RootScan) -> bool:
    """True when a pass limited to `RECOVERY` could change something (an unlocked look)."""
    return bool(scan.leftovers) or any(t.complete for t in scan.in_flight)


def one_save(src: Path, step: int) -> Callable[[RootScan], RootScan]:
    """A ``select`` for `locked_pass` that keeps one save, ``src`` (``tmp_step_N`` of ``step``),
    and what else names its step: other complete saves are left to their writer or a full pass.
    With ``steps={step}`` the scan is a partial one and the pass's cost does not grow with the
    root (the manager's inline finalize, the daemon's marker event)."""

    def select(scan: RootScan) -> RootScan:
        return RootScan(
            scan.root,
            steps=tuple(c for c in scan.steps if c.step == step),
            in_flight=tuple(t for t in scan.in_flight if t.path == src),
            leftovers=tuple(o for o in scan.leftovers if o.step == step),
            # Its step's odd entries: two spellings of the save, or a step_N that is not a
            # directory standing where it would be finalized (the plan waits, as a full one).
            anomalies=tuple(a for a in scan.anomalies if a.step == step),
            ambiguous_steps=scan.ambiguous_steps & {step},
            layout=scan.layout,
        )

    return select
