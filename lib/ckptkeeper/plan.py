"""The pure planner: ``plan(scan, policy, now, free) -> Plan``. No I/O: time and free space are
inputs.

It decides, with reasons, what happens to every checkpoint-named entry of one root: finalize
complete saves, finish or undo interrupted replaces, collect stale saves, keep or delete each
step, purge trash, and under disk pressure (``min_free``, `ckptkeeper.pressure`) delete beyond
the other rules. ``status`` and ``--dry-run`` print a plan; `execute.apply_plan` carries it out.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from .decisions import APPLIED, RECOVERY, Action, Decision, Timing, first
from .layouts import NEMO_RL, Layout
from .names import Kind
from .policy import Policy, metric_value, rules_for
from .pressure import FreeSpace, Pressure, pressure_order, protected_steps
from .records import Checkpoint, InFlight, Leftover, RootScan

__all__ = ["APPLIED", "RECOVERY", "Action", "Decision", "FreeSpace", "Plan", "Pressure", "plan"]


@dataclass(frozen=True, slots=True)
class Plan:
    root: Path
    policy: Policy
    now: float
    decisions: tuple[Decision, ...]
    layout: Layout = NEMO_RL  # the scan's: how the executor names what it renames
    free: FreeSpace | None = None  # what the pass measured (None: not measured)
    pressure: Pressure | None = None  # set while free space is below min_free
    next_save_may_not_fit: bool = False  # the newest checkpoint is larger than the free space

    def __iter__(self) -> Iterator[Decision]:
        return iter(self.decisions)

    def by_action(self, *actions: Action) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.action in actions)

    @property
    def kept_steps(self) -> frozenset[int]:
        return frozenset(d.step for d in self.by_action(Action.KEEP) if d.step is not None)

    @property
    def deleted_steps(self) -> frozenset[int]:
        return frozenset(d.step for d in self.by_action(Action.DELETE) if d.step is not None)

    @property
    def revisit_at(self) -> float | None:
        """The earliest time at which a decision of this plan changes with no new event: a save
        settles or turns stale, trash outlives its grace (`Decision.until`); None: only a change
        on disk changes the plan. A keeper passes the root again then (`next_visit`)."""
        return first(*(d.until for d in self.decisions))

    @property
    def timing(self) -> Timing:
        return Timing(self.now, self.revisit_at)

    def next_visit(self, before: float) -> float | None:
        """When a keeper should pass the root again for `revisit_at` (`Timing.next_visit`)."""
        return self.timing.next_visit(before)

    @property
    def mutates(self) -> bool:
        """Does carrying out this plan change anything on disk (applied actions or purges)?"""
        return any(d.action in APPLIED or d.action is Action.PURGE for d in self.decisions)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def _since(idle: float) -> str:
    """``idle`` seconds since the last write, which is in the future when the writer's clock
    (or the file server's) is ahead of ours."""
    if idle <= -0.5:  # rounds to at least 1s
        return f"{_age(-idle)} in the future (writer clock ahead?)"
    return f"{_age(idle)} ago"


def plan(scan: RootScan, policy: Policy, now: float, free: FreeSpace | None = None) -> Plan:
    """Decide every entry of one root. Pure: the same inputs give the same plan.

    ``free``: the root's filesystem as the pass measured it; with ``min_free`` in the policy it
    turns on disk-pressure deletions, and with sizes in it ``next_save_may_not_fit``."""
    root = scan.root
    step_name = functools.partial(scan.layout.format, Kind.STEP)
    decisions: list[Decision] = []
    steps = {c.step: c for c in scan.steps}
    tmps = {t.step: t for t in scan.in_flight}

    for a in scan.anomalies:
        decisions.append(Decision(a.step, a.path, Action.IGNORE, (a.reason,)))

    # What the step set will be once saves are finalized and interrupted replaces are resolved.
    projected: dict[int, Checkpoint] = dict(steps)
    finalizing: list[int] = []
    olds = {o.step: o for o in scan.leftovers}
    # A step_N that is not a directory (a symlink, a file) stands where a save would be
    # finalized or restored: nothing is renamed over it; the plan says so, every pass alike.
    in_the_way = {a.path.name: a.reason for a in scan.anomalies if a.path.parent == root}
    for old in scan.leftovers:
        tmp = tmps.get(old.step)
        decision = _leftover(old, tmp, scan, steps, in_the_way)
        decisions.append(decision)
        if decision.action is Action.RESTORE:
            projected[old.step] = Checkpoint(
                old.step,
                root / step_name(old.step),
                old.info,
                old.info_error,
                old.pinned,
                old.identity,
            )

    for tmp in scan.in_flight:
        if tmp.step in scan.pointers and not tmp.complete:
            why = f"{scan.pointers[tmp.step]}: never collected"
            reasons = (tmp.waiting, why) if tmp.waiting else (why,)
            until = tmp.settles_at  # then it counts (and ranks) as a checkpoint
            decisions.append(Decision(tmp.step, tmp.path, Action.WAIT, reasons, until=until))
        elif tmp.step in scan.ambiguous_steps:
            why = f"step {tmp.step} is ambiguous (two names): not finalized over"
            decisions.append(Decision(tmp.step, tmp.path, Action.WAIT, (why,)))
        elif tmp.complete and (what := in_the_way.get(step_name(tmp.step))) is not None:
            why = f"{step_name(tmp.step)} is in the way ({what}): not finalized over it"
            decisions.append(
                Decision(tmp.step, tmp.path, Action.WAIT, (why,), blocked=Action.FINALIZE)
            )
        elif tmp.complete:
            decision, projected[tmp.step] = _finalize(
                tmp, policy, steps, olds, root / step_name(tmp.step)
            )
            decisions.append(decision)
            finalizing.append(tmp.step)
        else:
            decisions.append(_unmarked(tmp, policy, now))

    decisions.extend(_retention(list(projected.values()), policy, scan.layout, scan.pointers))

    for entry in scan.trash:
        trashed = min(entry.trashed_at, now)  # a skewed clock on another host: not in the future
        age, purge_at = now - trashed, trashed + policy.trash_grace
        if now >= purge_at:
            why = "in trash" + (f" for {_age(age)}" if policy.trash_grace else "")
            decisions.append(Decision(None, entry.path, Action.PURGE, (why,)))
        else:
            why = f"in trash for {_age(age)}, grace {_age(policy.trash_grace)}"
            decisions.append(Decision(None, entry.path, Action.HOLD, (why,), until=purge_at))

    pressure = None
    if free is not None and policy.min_free is not None:
        protect = [*finalizing, *scan.pointers]  # a pointed step is never deleted, as a save
        pressure = _relieve(decisions, list(projected.values()), protect, policy, free)
    decisions.sort(key=lambda d: (d.step is None, d.step or 0, str(d.path)))
    tight = free is not None and _next_save_may_not_fit(decisions, projected, free)
    return Plan(
        root,
        policy,
        now,
        tuple(decisions),
        scan.layout,
        free=free,
        pressure=pressure,
        next_save_may_not_fit=tight,
    )


def _finalize(
    tmp: InFlight,
    policy: Policy,
    steps: dict[int, Checkpoint],
    olds: dict[int, Leftover],
    target: Path,
) -> tuple[Decision, Checkpoint]:
    """A complete ``tmp_step_N``: finalized (or replacing its step); the step it becomes."""
    existing = steps.get(tmp.step)
    previous = olds.get(tmp.step) if existing is None else None
    # A pin on the step being replaced carries over to its new contents.
    pinned = tmp.pinned or any(p is not None and p.pinned for p in (existing, previous))
    why = f"{policy.complete_marker} present"
    if existing is not None:
        why += f"; replaces {existing.path.name}"
    decision = Decision(
        tmp.step,
        tmp.path,
        Action.FINALIZE if existing is None else Action.REPLACE,
        (why,),
        tmp.identity,
        replaces=None if existing is None else existing.path,
        carry_pin=pinned and not tmp.pinned,
    )
    step = Checkpoint(tmp.step, target, tmp.info, tmp.info_error, pinned, tmp.identity)
    return decision, step


def _leftover(
    old: Leftover,
    tmp: InFlight | None,
    scan: RootScan,
    steps: dict[int, Checkpoint],
    in_the_way: dict[str, str],
) -> Decision:
    """An ``old_step_N``: garbage beside its step, or half of an interrupted replace."""
    name = scan.layout.format(Kind.STEP, old.step)
    if old.step in scan.ambiguous_steps:
        why = f"step {old.step} is ambiguous (two names): left alone"
        return Decision(old.step, old.path, Action.WAIT, (why,))
    if old.step in steps:
        why = f"{old.path.name} beside {name}: leftover of a replace"
        return Decision(old.step, old.path, Action.DISCARD, (why,), old.identity)
    if (what := in_the_way.get(name)) is not None:
        # Neither finishing the replace (the new save cannot be finalized) nor restoring.
        why = f"{name} is in the way ({what}): interrupted replace left as it is"
        blocked = Action.DISCARD if tmp is not None and tmp.complete else Action.RESTORE
        return Decision(old.step, old.path, Action.WAIT, (why,), blocked=blocked)
    if tmp is not None and tmp.complete:
        why = "interrupted replace: the new save is complete, finishing it"
        return Decision(old.step, old.path, Action.DISCARD, (why,), old.identity)
    why = "interrupted replace: the new save is not complete, restoring the previous step"
    return Decision(old.step, old.path, Action.RESTORE, (why,), old.identity)


def _unmarked(tmp: InFlight, policy: Policy, now: float) -> Decision:
    """A ``tmp_step_N`` without its marker: a save in progress, or abandoned (stale)."""
    if not tmp.collectable:  # a layout without temporaries: in flight until it is complete
        why = tmp.waiting or "not complete"
        return Decision(tmp.step, tmp.path, Action.WAIT, (why,), until=tmp.settles_at)
    if tmp.waiting:
        return _incomplete(tmp, policy, now)
    idle = None if tmp.newest_mtime is None else now - tmp.newest_mtime
    stale_at = _stale_at(tmp, policy)
    stale = stale_at is not None and now >= stale_at
    if tmp.writer_lock_unreadable is not None:
        why = f"writer lock unreadable ({tmp.writer_lock_unreadable}): treated as held"
        if idle is None:
            return Decision(tmp.step, tmp.path, Action.WAIT, (why,))
        if not stale:  # then it is reported as blocked (once)
            reasons = (why, f"last write {_since(idle)}")
            return Decision(tmp.step, tmp.path, Action.WAIT, reasons, until=stale_at)
        # Stale but for the lock: this is when it matters, and stays so: report it (once).
        reasons = (why, f"no marker, untouched for {_age(idle)}")
        return Decision(tmp.step, tmp.path, Action.WAIT, reasons, blocked=Action.COLLECT)
    if tmp.writer_locked:
        return Decision(tmp.step, tmp.path, Action.WAIT, ("writer lock held",))
    if idle is None:
        return Decision(tmp.step, tmp.path, Action.WAIT, ("in flight: no marker yet",))
    if stale:
        why = f"stale: no marker, no writer lock, untouched for {_age(idle)}"
        return Decision(tmp.step, tmp.path, Action.COLLECT, (why,), tmp.identity)
    why = f"in flight: last write {_since(idle)}"
    return Decision(tmp.step, tmp.path, Action.WAIT, (why,), until=stale_at)


def _stale_at(tmp: InFlight, policy: Policy) -> float | None:
    """When a save not complete and not written to since its last change seen turns stale
    (None: its last change is not known, e.g. its writer lock is held)."""
    return None if tmp.newest_mtime is None else tmp.newest_mtime + policy.stale_after


def _incomplete(tmp: InFlight, policy: Policy, now: float) -> Decision:
    """A layout's save without its commit signal (``tmp.waiting`` says which): garbage once
    untouched for ``stale_after`` with no writer lock, else in flight."""
    idle = None if tmp.newest_mtime is None else now - tmp.newest_mtime
    if tmp.writer_lock_unreadable is not None:
        why = f"writer lock unreadable ({tmp.writer_lock_unreadable}): treated as held"
        return Decision(tmp.step, tmp.path, Action.WAIT, (tmp.waiting, why))
    if tmp.writer_locked:
        return Decision(tmp.step, tmp.path, Action.WAIT, (tmp.waiting, "writer lock held"))
    if idle is None:
        return Decision(tmp.step, tmp.path, Action.WAIT, (tmp.waiting, "in flight"))
    stale_at = _stale_at(tmp, policy)
    if stale_at is not None and now >= stale_at:
        why = f"stale: {tmp.waiting}, no writer lock, untouched for {_age(idle)}"
        return Decision(tmp.step, tmp.path, Action.COLLECT, (why,), tmp.identity)
    why = f"in flight: last write {_since(idle)}"
    until = first(stale_at, tmp.settles_at)
    return Decision(tmp.step, tmp.path, Action.WAIT, (tmp.waiting, why), until=until)


def _retention(
    checkpoints: list[Checkpoint],
    policy: Policy,
    layout: Layout,
    pointers: Mapping[int, str] | None = None,
) -> list[Decision]:
    pointed = pointers or {}
    participants = [c for c in checkpoints if c.info is not None]
    out: list[Decision] = []
    for c in checkpoints:
        if c.info is None:
            unusable = (
                c.info_error or "metrics file unusable",
                "kept: not ranked without it",
            )
            reasons = ((f"pinned ({layout.pin_file} file)",) if c.pinned else ()) + unusable
            if c.step in pointed:
                reasons = (pointed[c.step], *reasons)
            out.append(Decision(c.step, c.path, Action.KEEP, reasons, c.identity))

    kept: dict[int, list[str]] = {c.step: [] for c in participants}
    dropped: dict[int, list[str]] = {c.step: [] for c in participants}
    for rule in rules_for(policy, layout):
        verdicts = rule(participants)
        for step, why in verdicts.kept.items():
            kept[step].append(why)
        for step, why in verdicts.dropped.items():
            dropped[step].append(why)
    for step, why in pointed.items():
        if step in kept:
            kept[step].append(why)

    for c in participants:
        metric = metric_value(c.info, policy.metric_name) if policy.metric_name else None
        if kept[c.step]:
            out.append(
                Decision(c.step, c.path, Action.KEEP, tuple(kept[c.step]), c.identity, metric)
            )
        elif not policy.bounded:
            why = "no keep_top_k or keep_latest_n: nothing is deleted"
            if policy.min_free is not None:
                why = "no keep_top_k or keep_latest_n: deleted only under disk pressure"
            out.append(Decision(c.step, c.path, Action.KEEP, (why,), c.identity, metric))
        else:
            reasons = tuple(dropped[c.step]) or ("no rule keeps it",)
            out.append(Decision(c.step, c.path, Action.DELETE, reasons, c.identity, metric))
    return out


_FREEING = (Action.DELETE, Action.COLLECT, Action.DISCARD)


def _expected_free(decisions: list[Decision], free: FreeSpace) -> int:
    """Free space once this plan is carried out, counting only the sizes the pass measured."""
    freed = sum(free.sizes.get(d.identity, 0) for d in decisions if d.action in _FREEING)
    held = any(d.action is Action.HOLD for d in decisions)
    return free.free_bytes + freed + (0 if held else free.trash_bytes)


def _next_save_may_not_fit(
    decisions: list[Decision], projected: dict[int, Checkpoint], free: FreeSpace
) -> bool:
    if not projected:
        return False
    size = free.sizes.get(projected[max(projected)].identity)
    return size is not None and size > _expected_free(decisions, free)


def _relieve(
    decisions: list[Decision],
    checkpoints: list[Checkpoint],
    finalizing: list[int],
    policy: Policy,
    free: FreeSpace,
) -> Pressure | None:
    """Below ``min_free``: purge trash within its grace, then turn the worst unprotected KEEP
    decisions into DELETE (in place) until the expected free space reaches ``min_free``."""
    threshold = policy.pressure_threshold
    assert threshold is not None
    target = threshold.bytes_for(free.total_bytes)
    if free.free_bytes >= target or free.total_bytes <= 0:  # no size reported: nothing judged
        return None
    why = f"disk pressure: {threshold.describe(free.free_bytes, free.total_bytes)}"
    for i, d in enumerate(decisions):
        if d.action is Action.HOLD:
            cut = f"{why}: trash grace cut short"
            decisions[i] = replace(d, action=Action.PURGE, reasons=(*d.reasons, cut), until=None)
    expected = _expected_free(decisions, free)
    at = {d.step: i for i, d in enumerate(decisions) if d.action in (Action.KEEP, Action.DELETE)}
    remaining = sum(1 for i in at.values() if decisions[i].action is Action.KEEP)
    protected = protected_steps(checkpoints, policy, finalizing)
    candidates = [
        c
        for c in checkpoints
        if c.step not in protected and decisions[at[c.step]].action is Action.KEEP
    ]
    deleted: list[int] = []
    unsized = None
    for c in pressure_order(candidates, policy):
        if expected >= target or remaining <= policy.min_keep:
            break
        d = decisions[at[c.step]]
        was = tuple(f"otherwise kept: {r}" for r in d.reasons)
        decisions[at[c.step]] = replace(d, action=Action.DELETE, reasons=(why, *was))
        deleted.append(c.step)
        remaining -= 1
        size = free.sizes.get(c.identity)
        if size is None:  # unknown: this one alone; the next pass measures the free space again
            unsized = c.step
            break
        expected += size
    return Pressure(why, target, expected, tuple(deleted), unsized)
