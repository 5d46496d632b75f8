"""One pass over one root, the same for every trigger (event, schedule, cron sweep, sidecar exit).

scan -> plan, without the lock; if that plan does nothing (no action, no trash to purge) the pass
ends there. Otherwise: lock (skip if busy) -> scan -> plan again -> apply (recover, finalize,
collect, delete into trash) -> unlock -> remove trash past ``trash_grace`` (outside the lock:
removal can take minutes and trash is ckptkeeper's own). Nothing is ever acted on from the
unlocked scan: it only decides whether the lock is worth taking, and it may reuse what the last
scan found in unchanged step directories (``scan_root(memo=True)``); the scan under the lock
reads every step in full. `preview` is the read-only half for ``status`` and ``--dry-run``.

A pass with nothing to do costs no lock, and with a cache a plan identical to the last one (same
policy, the very same step records, nothing in flight, no leftovers, no trash) is reused.

The policy may be given as a callable (the daemon and ``sweep`` resolve the root's settings with
it): it is called for the unlocked plan and again once the lock is held, so the plan acted on
uses the settings as they are then. Each plan uses one policy for its scan and its decisions.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptkeeper import (
    OS_FS,
    Action,
    FreeSpace,
    Fs,
    InfoCache,
    Outcome,
    Plan,
    Policy,
    Removal,
    RootScan,
    plan,
    scan_root,
)
from ckptkeeper.passes import locked_pass
from ckptkeeper.plan import Decision
from ckptkeeper.space import disk_facts

from .logs import ProblemLog, emit, get_logger
from .spacelog import space_problems

__all__ = ["EVENT_FOR", "PolicySource", "Report", "preview", "reconcile"]

#: A policy, or what resolves one (called once per plan).
PolicySource = Policy | Callable[[], Policy]

EVENT_FOR = {
    Action.FINALIZE: "finalized",
    Action.REPLACE: "replaced",
    Action.RESTORE: "recovered",
    Action.DISCARD: "recovered",
    Action.COLLECT: "garbage_collected",
    Action.DELETE: "deleted",
    Action.PURGE: "purged",
}


@dataclass
class Report:
    root: Path
    status: str = "ok"  # ok | busy (another actor holds the lock) | error (root unusable)
    plan: Plan | None = None
    scan: RootScan | None = None
    outcomes: list[Outcome] = field(default_factory=list)
    removed: list[tuple[Path, Removal]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    duration_ms: float = 0.0

    @property
    def errors(self) -> int:
        failed = sum(1 for o in self.outcomes if not o.ok)
        leftovers = sum(1 for _, r in self.removed if r.left)
        return failed + leftovers + (1 if self.status == "error" else 0)

    @property
    def in_flight(self) -> list[Path]:
        return [t.path for t in self.scan.in_flight] if self.scan is not None else []

    def count(self, action: Action) -> int:
        return sum(1 for o in self.outcomes if o.decision.action is action and o.status == "done")


def _check_root(root: Path) -> str | None:
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return "root does not exist"
    except OSError as exc:
        return f"cannot stat root: {errno.errorcode.get(exc.errno or 0, exc)}"
    if stat.S_ISLNK(st.st_mode):
        return "root is a symlink: not followed"
    if not stat.S_ISDIR(st.st_mode):
        return "root is not a directory"
    return None


def _plan_memoized(
    scan: RootScan, policy: Policy, now: float, cache: InfoCache, free: FreeSpace | None
) -> Plan:
    """`plan`, reusing the root's last decisions when the inputs are the same: the same policy
    over the very same (immutable) step records, the same anomalies, and nothing in flight, no
    leftovers, no trash (the only inputs whose decisions depend on ``now``), and no ``min_free``
    (its decisions depend on the free space). `plan` is pure, so the decisions are those it would
    make."""
    slot = cache.attached(scan.root)
    last: tuple[RootScan, Plan] | None = slot.get("plan")
    if last is not None and _same_inputs(last[0], last[1].policy, scan, policy):
        return Plan(scan.root, policy, now, last[1].decisions, free)
    fresh = plan(scan, policy, now, free)
    slot["plan"] = (scan, fresh) if _timeless(scan) and policy.min_free is None else None
    return fresh


def _timeless(scan: RootScan) -> bool:
    return not (scan.in_flight or scan.leftovers or scan.trash)


def _same_inputs(before: RootScan, was: Policy, scan: RootScan, policy: Policy) -> bool:
    if not _timeless(scan) or was != policy or before.root != scan.root:
        return False
    if before.anomalies != scan.anomalies or before.ambiguous_steps != scan.ambiguous_steps:
        return False
    old, new = before.steps, scan.steps
    return len(old) == len(new) and all(a is b for a, b in zip(old, new, strict=True))


def _scan_and_plan(
    root: Path,
    policy: Policy,
    cache: InfoCache | None,
    now: float,
    report: Report,
    *,
    memo: bool = False,
) -> bool:
    """Scan and plan into ``report``; False (and status "error") when the root cannot be listed.

    ``memo``: the scan may reuse the cache's memo of unchanged step directories and the plan the
    root's last decisions; only for a plan that decides whether to act, never for one that is
    acted on."""
    try:
        scan = scan_root(
            root,
            marker=policy.complete_marker,
            cache=cache,
            stale_before=now - policy.stale_after,
            memo=memo,
        )
    except OSError as exc:
        report.status = "error"
        report.problems.append(f"cannot list root: {errno.errorcode.get(exc.errno or 0, exc)}")
        return False
    report.scan = scan
    free = disk_facts(scan, policy, now, cache)  # statvfs; sizes only with min_free
    if memo and cache is not None:
        report.plan = _plan_memoized(scan, policy, now, cache, free)
    else:
        report.plan = plan(scan, policy, now, free)
    return True


def _report_problems(report: Report, log: Any, problems: ProblemLog | None) -> None:
    """Log what is wrong in the root. With a `ProblemLog` (the daemon) a problem that recurs on
    every pass is logged once, and again only after it went away and came back."""
    if report.status == "busy":
        return  # nothing was looked at: what was wrong before still is, as far as we know
    current: dict[tuple[str, str], dict[str, Any]] = {}
    if report.status == "error":
        for why in report.problems:
            current[(str(report.root), why)] = {"event": "root_problem", "reason": why}
    if report.scan is not None:
        for a in report.scan.anomalies:
            current[(str(a.path), a.reason)] = {
                "event": "ignored",
                "step": a.step,
                "path": str(a.path),
                "reason": a.reason,
            }
        for c in report.scan.steps:
            if c.info_error is not None:
                current[(str(c.path), c.info_error)] = {
                    "event": "unranked",
                    "step": c.step,
                    "path": str(c.path),
                    "reason": f"{c.info_error}; kept",
                }
    if report.plan is not None:  # held back until someone acts: keyed by the stable reasons[0]
        for d in report.plan.decisions:
            if d.blocked is not None:
                current[(str(d.path), d.reasons[0])] = {
                    "event": "skipped",
                    "action": d.blocked.value,
                    "step": d.step,
                    "path": str(d.path),
                    "reason": "; ".join(d.reasons),
                }
    if report.plan is not None and report.plan.policy.metric_name:
        for d in report.plan.by_action(Action.KEEP):
            if isinstance(d.metric, str) and (str(d.path), d.metric) not in current:
                current[(str(d.path), d.metric)] = {
                    "event": "unranked",
                    "step": d.step,
                    "path": str(d.path),
                    "reason": f"{d.metric}: ranked last; kept ({'; '.join(d.reasons)})",
                }
    if report.plan is not None:
        current.update(space_problems(report.plan))
    for o in report.outcomes:
        if not o.ok:
            d = o.decision
            current[(str(d.path), o.errno_name or o.detail)] = {
                "event": "action_failed",
                "level": "error",
                "action": d.action.value,
                "step": d.step,
                "path": str(d.path),
                "errno": o.errno_name,
                "error": o.detail,
                "reason": "; ".join(d.reasons),
            }
    for path, removal in report.removed:
        if removal.left:
            current[(str(path), removal.left[0][1])] = {
                "event": "removal_incomplete",
                "path": str(path),
                "left": len(removal.left),
                "reason": "; ".join(f"{p}: {why}" for p, why in removal.left[:5]),
                "bytes": removal.bytes,
            }
    if problems is None:
        for fields in current.values():
            emit(log, fields)
    else:
        problems.report(str(report.root), current, log)


def preview(
    root: Path,
    policy: Policy,
    *,
    cache: InfoCache | None = None,
    now: float | None = None,
    log: Any = None,
    problems: ProblemLog | None = None,
) -> Report:
    """Scan and plan only; never calls the executor (``status``, ``sweep --dry-run``)."""
    root = Path(root)
    log = log or get_logger(root=str(root))
    report = Report(root)
    started = time.perf_counter()
    if (why := _check_root(root)) is not None:
        report.status = "error"
        report.problems.append(why)
    else:
        _scan_and_plan(root, policy, cache, time.time() if now is None else now, report)
    _report_problems(report, log, problems)
    report.duration_ms = (time.perf_counter() - started) * 1000
    return report


def reconcile(
    root: Path,
    policy: PolicySource,
    *,
    cache: InfoCache | None = None,
    clock: Callable[[], float] = time.time,
    lock_timeout: float | None = 0.0,
    delete_workers: int = 8,
    fs: Fs = OS_FS,
    log: Any = None,
    problems: ProblemLog | None = None,
    cancel: threading.Event | None = None,
) -> Report:
    """One idempotent pass over ``root``. Never raises for a bad root or a bad checkpoint."""
    root = Path(root)
    log = log or get_logger(root=str(root))
    report = Report(root)
    started = time.perf_counter()
    try:
        _reconcile(
            root, policy, cache, clock, lock_timeout, delete_workers, fs, log, report, cancel
        )
    except OSError as exc:  # e.g. the root vanished or turned read-only mid-pass
        report.status = "error"
        name = errno.errorcode.get(exc.errno or 0, "OSError")
        report.problems.append(f"{name}: {exc.strerror or exc} ({exc.filename})")
    _report_problems(report, log, problems)
    report.duration_ms = (time.perf_counter() - started) * 1000
    return report


def _reconcile(
    root: Path,
    source: PolicySource,
    cache: InfoCache | None,
    clock: Callable[[], float],
    lock_timeout: float | None,
    delete_workers: int,
    fs: Fs,
    log: Any,
    report: Report,
    cancel: threading.Event | None,
) -> None:
    if (why := _check_root(root)) is not None:
        report.status = "error"
        report.problems.append(why)
        return
    # Without the lock: is there anything to do at all? (Most passes: no.)
    policy = source if isinstance(source, Policy) else source()
    if not _scan_and_plan(root, policy, cache, clock(), report, memo=True):
        return
    assert report.plan is not None
    if not report.plan.mutates:  # no action and no trash to purge: the lock is not needed
        return
    report.scan = report.plan = None  # decided on: nothing is acted on from an unlocked scan
    # Trashed steps are logged once removed (with their bytes) when there is no grace period.
    # The settings are resolved again under the lock (a ckptkeeper.toml edited since counts).
    deferred: list[bool] = []

    def resolved() -> Policy:
        now_policy = source if isinstance(source, Policy) else source()
        deferred.append(now_policy.trash_grace == 0)
        return now_policy

    def on_outcome(o: Outcome) -> None:
        if not (deferred[-1] and o.trash_path is not None):
            _log_outcome(o, log)

    def on_removed(cause: Outcome | Decision, removal: Removal, removed_ms: float) -> None:
        if isinstance(cause, Outcome):
            _log_outcome(cause, log, removal.bytes, cause.duration_ms + removed_ms)
        elif not removal.left:  # what is left is reported once as removal_incomplete
            log.info(
                "purged", path=str(cause.path), reason="; ".join(cause.reasons), bytes=removal.bytes
            )

    result = locked_pass(
        root,
        resolved,
        lock_timeout=lock_timeout,
        clock=clock,
        fs=fs,
        cache=cache,
        workers=delete_workers,
        cancel=cancel,
        on_outcome=on_outcome,
        on_removed=on_removed,
    )
    if result.status == "busy":
        report.status = "busy"
        log.info("skipped", reason="root locked by another actor")
        return
    report.scan, report.plan = result.scan, result.plan
    report.outcomes, report.removed = result.outcomes, result.removed


def _log_outcome(
    outcome: Outcome, log: Any, size: int | None = None, duration_ms: float | None = None
) -> None:
    d = outcome.decision
    fields: dict[str, Any] = {
        "step": d.step,
        "path": str(d.path),
        "reason": "; ".join(d.reasons),
        "bytes": size,
        "duration_ms": round(outcome.duration_ms if duration_ms is None else duration_ms, 3),
    }
    if outcome.status == "done":
        event = EVENT_FOR.get(d.action, d.action.value)
        if outcome.trash_path is not None:
            fields["trash_path"] = str(outcome.trash_path)
        log.info(event, action=d.action.value, **fields)
    elif outcome.status == "gone":
        log.info("skipped", action=d.action.value, **{**fields, "reason": outcome.detail})
    elif outcome.status == "skipped":
        log.warning("skipped", action=d.action.value, **{**fields, "reason": outcome.detail})
    # a failed action is reported once per (path, errno) by _report_problems
