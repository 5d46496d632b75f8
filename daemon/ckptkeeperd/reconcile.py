"""One pass over one root, the same for every trigger (event, schedule, cron sweep, sidecar exit).

scan -> plan, without the lock; if that plan does nothing (no action, no trash to purge) the pass
ends there. Otherwise: lock (skip if busy) -> scan -> plan again -> apply (recover, finalize,
collect, delete into trash) -> unlock -> remove trash past ``trash_grace`` (outside the lock:
removal can take minutes and trash is ckptkeeper's own). Nothing is ever acted on from the
unlocked scan: it only decides whether the lock is worth taking, and it may reuse what the last
scan found in unchanged step directories (``scan_root(memo=True)``); the scan under the lock
reads every step in full. `preview` is the read-only half for ``status`` and ``--dry-run``.

A pass with nothing to do costs no lock, and with a cache no JSON and no look inside an unchanged
step directory. A look at a root found as the last look left it (`ckptkeeper.settled`: the same
policy, every step and metrics file unchanged, nothing whose decision waits on time) makes no
records and no plan: its report is `Report.settled`, and its scan and plan are made only if asked
for; its problems are those the last look reported.

The policy may be given as a callable (the daemon and ``sweep`` resolve the root's settings with
it): it is called for the unlocked plan and again once the lock is held, so the plan acted on
uses the settings as they are then. Each plan uses one policy for its scan and its decisions.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckptkeeper import (
    OS_FS,
    Action,
    Fs,
    InfoCache,
    Outcome,
    Policy,
    Removal,
    plan,
)
from ckptkeeper.errors import errno_name, errno_text, strerror
from ckptkeeper.layouts import get_layout
from ckptkeeper.names import Kind
from ckptkeeper.passes import RECOVERY, locked_pass, one_save, store_facts
from ckptkeeper.plan import Decision
from ckptkeeper.settled import settled, verdict_of
from ckptkeeper.storage import POSIX, PosixStorage, Storage

from .logs import ProblemLog, emit, get_logger
from .problems import problems_of
from .report import Report, SettledReport

__all__ = ["EVENT_FOR", "PolicySource", "Report", "finalize_marked", "preview", "reconcile"]

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


def _scan_and_plan(
    root: Path,
    storage: Storage,
    policy: Policy,
    cache: InfoCache | None,
    now: float,
    report: Report,
    *,
    memo: bool = False,
) -> bool:
    """Scan and plan into ``report``; False (and status "error") when the root cannot be listed.

    ``memo``: the scan may reuse the cache's memo of unchanged step directories; only for a plan
    that decides whether to act, never for one that is acted on."""
    try:
        scan = storage.scan(
            root,
            layout=policy.scan_layout(),
            marker=policy.complete_marker,
            cache=cache,
            stale_before=now - policy.stale_after,
            memo=memo,
        )
    except OSError as exc:
        report.status = "error"
        report.problems.append(f"cannot list root: {errno_text(exc)}")
        return False
    report.scan = scan
    free = store_facts(storage, scan, policy, now, cache)  # statvfs; sizes only with min_free
    # Planned afresh (pure, ~2 us a step): keeping every root's last decisions to reuse them
    # would hold far more memory per checkpoint than the memoized scan (bench P9K).
    report.plan = plan(scan, policy, now, free)
    return True


def _report_problems(report: Report, log: Any, problems: ProblemLog | None) -> None:
    """Log what is wrong in the root. With a `ProblemLog` (the daemon) a problem that recurs on
    every pass is logged once, and again only after it went away and came back."""
    if report.status == "busy":
        return  # nothing was looked at: what was wrong before still is, as far as we know
    if report.settled is not None and problems is not None and problems is report.settled.who:
        return  # the root as the look that reported to ``problems`` left it: the same problems
    current = problems_of(report)
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
    storage: Storage = POSIX,
) -> Report:
    """Scan and plan only; never calls the executor (``status``, ``sweep --dry-run``).
    ``storage``: the root's (`stores.Root.storage`)."""
    root = Path(root)
    log = log or get_logger(root=str(root))
    report = Report(root, storage=storage)
    started = time.perf_counter()
    if (why := storage.check_root(root)) is not None:
        report.status = "error"
        report.problems.append(why)
    else:
        now = time.time() if now is None else now
        _scan_and_plan(root, storage, policy, cache, now, report)
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
    on_outcome: Callable[[Outcome], None] | None = None,
    storage: Storage | None = None,
) -> Report:
    """One idempotent pass over ``root``. Never raises for a bad root or a bad checkpoint.

    ``on_outcome`` sees each action's outcome as it happens, under the lock (metrics).
    ``storage``: the root's (`stores.Root.storage`); a filesystem through ``fs`` when None."""
    root = Path(root)
    log = log or get_logger(root=str(root))
    storage = storage if storage is not None else PosixStorage(fs)
    report = Report(root, storage=storage)
    started = time.perf_counter()
    try:
        report = _reconcile(
            root,
            storage,
            policy,
            cache,
            clock,
            lock_timeout,
            delete_workers,
            fs,
            log,
            report,
            cancel,
            on_outcome,
            problems,
        )
    except OSError as exc:  # e.g. the root vanished or turned read-only mid-pass
        report.status = "error"
        name = errno_name(exc)
        report.problems.append(f"{name}: {strerror(exc)} ({exc.filename})")
    _report_problems(report, log, problems)
    report.duration_ms = (time.perf_counter() - started) * 1000
    return report


def _reconcile(
    root: Path,
    storage: Storage,
    source: PolicySource,
    cache: InfoCache | None,
    clock: Callable[[], float],
    lock_timeout: float | None,
    delete_workers: int,
    fs: Fs,
    log: Any,
    report: Report,
    cancel: threading.Event | None,
    observe: Callable[[Outcome], None] | None = None,
    problems: ProblemLog | None = None,
) -> Report:
    """The pass into ``report``; a `Report.settled` in its place when the root is as the last
    look left it."""
    if (why := storage.check_root(root)) is not None:
        report.status = "error"
        report.problems.append(why)
        return report
    # Without the lock: is there anything to do at all? (Most passes: no.)
    policy = source if isinstance(source, Policy) else source()
    now = clock()
    posix = cache is not None and type(storage) is PosixStorage
    if posix and cache is not None and (verdict := settled(cache, str(root), policy, now)):
        make = functools.partial(_scan_and_plan, root, storage, policy, cache, now=now, memo=True)
        return SettledReport(root, storage, verdict, make)
    if not _scan_and_plan(root, storage, policy, cache, now, report, memo=True):
        return report
    assert report.plan is not None and report.scan is not None
    if not report.plan.mutates:  # no action and no trash to purge: the lock is not needed
        if posix and cache is not None:
            cache.keep_verdict(str(root), verdict_of(report.scan, report.plan, cache, problems))
        return report
    report.scan = report.plan = None  # decided on: nothing is acted on from an unlocked scan
    # Trashed steps are logged once removed (with their bytes) when there is no grace period.
    # The settings are resolved again under the lock (a ckptkeeper.toml edited since counts).
    deferred: list[bool] = []

    def resolved() -> Policy:
        now_policy = source if isinstance(source, Policy) else source()
        deferred.append(now_policy.trash_grace == 0)
        return now_policy

    def on_outcome(o: Outcome) -> None:
        if observe is not None:
            observe(o)
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
        storage=storage,
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
        return report
    report.scan, report.plan = result.scan, result.plan
    report.outcomes, report.removed = result.outcomes, result.removed
    return report


def finalize_marked(
    tmp: Path,
    policy: PolicySource,
    *,
    cache: InfoCache | None = None,
    clock: Callable[[], float] = time.time,
    fs: Fs = OS_FS,
    log: Any = None,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> Report | None:
    """The marker arrived in ``tmp`` (a ``tmp_step_N``): finalize that one save at once, in a
    locked pass limited to `RECOVERY` over a partial scan of step N (`scan_root(steps=...)`), so
    its cost does not grow with the root and the planner decides as in a full pass. The caller
    follows it with a full pass (debounced). None when the lock is busy or ``tmp`` is not a save
    of the root's layout: the full pass does it. Never raises for a bad root or checkpoint."""
    root = tmp.parent
    log = log or get_logger(root=str(root))
    report = Report(root)
    started = time.perf_counter()
    try:
        now_policy = policy if isinstance(policy, Policy) else policy()
        parsed = get_layout(now_policy.layout).parse(tmp.name)
        if parsed is None or parsed.kind is not Kind.TMP or POSIX.check_root(root) is not None:
            return None

        def observe(o: Outcome) -> None:
            if on_outcome is not None:
                on_outcome(o)
            _log_outcome(o, log)

        result = locked_pass(
            root,
            now_policy,
            actions=RECOVERY,
            select=one_save(tmp, parsed.step),
            steps={parsed.step},
            lock_timeout=0.0,
            clock=clock,
            fs=fs,
            cache=cache,
            on_outcome=observe,
        )
    except OSError as exc:  # the root went or turned unusable: the full pass reports it
        log.debug("finalize_marked_failed", path=str(tmp), error=errno_name(exc))
        return None
    if result.status == "busy":
        return None
    report.scan, report.plan, report.outcomes = result.scan, result.plan, result.outcomes
    report.duration_ms = (time.perf_counter() - started) * 1000
    return report


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
