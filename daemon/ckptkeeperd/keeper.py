"""The keeper's root set and its passes (`KeeperCore`); `service.Keeper` adds the lifecycle.

Triggers (watch events, schedule, sidecar exit) -> one `reconcile` of a root: a bounded pool
runs passes, never two of one root at once (a request during a pass re-runs it once afterwards);
a marker's event finalizes its save at once in a pass of its own (`finalize_marked`), the full
pass follows debounced. Passes of one root that follow from a pass (a retry when the lock was
busy, a relist, a revisit when a decision changes with no event) are scheduled by `_pass_at`.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from ckptkeeper import InfoCache, Policy
from ckptkeeper.decisions import Timing
from ckptkeeper.info import MEMO_TRUST_S
from ckptkeeper.layouts import commit_files, get_layout
from ckptkeeper.storage import POSIX, Storage
from ckptkeeper.stores import Root

from .config import DaemonConfig, Resolved, Settings
from .fstype import ObserverChooser
from .httpserver import Endpoint
from .lockscope import LockScopeWarner
from .logs import ProblemLog, get_logger
from .metrics import KeeperMetrics, deletions_paused
from .page import page_for
from .reconcile import Report, finalize_marked, reconcile
from .resolver import SettingsResolver
from .roots import expand
from .sdnotify import Notifier
from .sidecar import Sidecar
from .signals import process_inbox
from .startup import in_flight_saves, run_phases
from .watch import RootWatcher

__all__ = ["START_WORKERS", "KeeperCore"]


START_WORKERS = 12  # first passes in flight at start (at least ``[daemon] workers``), bench P9K


@dataclass
class _RootState:
    overrides: Mapping[str, Any]
    settings: Settings
    observer: str
    problems: tuple[str, ...] = ()
    storage: Storage = POSIX  # where the root lives (`ckptkeeper.stores.Root`)


class KeeperCore:
    """The roots, their settings and watches, and the passes that keep them (no lifecycle)."""

    def __init__(
        self,
        config: DaemonConfig,
        *,
        reload: Callable[[], DaemonConfig] | None = None,
        notifier: Notifier | None = None,
        sidecar: Sidecar | None = None,
    ) -> None:
        self.config = config
        self._reload = reload
        self.sidecar = sidecar
        self._inbox = process_inbox()
        self.log = get_logger()
        self.notifier = notifier or Notifier()
        self.cache = InfoCache()
        self.observers = ObserverChooser()  # each root's observer, mountinfo read once per mount
        self.settings = SettingsResolver()  # resolved again in every pass (memoized)
        self.problems = ProblemLog()
        self.roots: dict[Path, _RootState] = {}
        self._state_lock = threading.Lock()
        self._running: set[Path] = set()
        self._pending: set[Path] = set()
        # Roots whose first pass waits behind the start's backlog: a trigger's request (a save's
        # marker the lock kept from finalizing, a root's events) runs it at once instead.
        self._unstarted: set[Path] = set()
        self._cancel = threading.Event()
        self._stopping = False
        self._reload_requested = False
        self._pool = ThreadPoolExecutor(
            max(1, config.daemon.workers), thread_name_prefix="ckptkeeper-pass"
        )
        self._scheduler = BackgroundScheduler(
            timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1}
        )
        self._watcher = RootWatcher(
            self.request,
            on_problem=self._watch_problem,
            max_tmp_watches=config.daemon.max_tmp_watches,
            on_marker=self.finalize_now,
        )
        self.cache.journal = self._watcher.journals  # a marker's pass lists no root it watches
        self._idle = threading.Condition(self._state_lock)
        self._last_action = "none yet"
        self._checkpoints: dict[Path, int] = {}
        self._first_pass_done = False
        self.pass_errors = 0
        self.metrics = KeeperMetrics(root_labels=config.daemon.root_labels)
        # GET / on the metrics address: the status page of every root, rendered per request.
        self.page: Callable[[], bytes] | None = functools.partial(page_for, self)
        self._http: Endpoint | None = None
        self._lock_scope = LockScopeWarner()  # warns once per root where flock is node-local

    # -- root set ---------------------------------------------------------------------------

    def refresh_roots(self) -> None:
        """Re-expand configured and discovered roots, resolve each root's settings, sync watches."""
        found: dict[Path, _RootState] = {}
        for where, overrides in expand(self.config):
            root = where.path
            # Watching and scheduling need no config.yaml (a walk over every root's newest
            # steps was most of a 1 M-checkpoint keeper's start); each pass resolves in full
            # and reports the root's config problems.
            resolved = self.settings.resolve_unranked(self.config, where, overrides)
            local = where.local_dir  # None: an object store, no events, its sweeps are its polls
            observer = resolved.settings.observer
            try:
                kind = "sweep" if local is None else self.observers(local, observer)
            except OSError:
                kind = "polling"
            found[where.path] = _RootState(
                overrides, resolved.settings, kind, tuple(resolved.problems), where.storage
            )
        with self._state_lock:
            previous = self.roots
            added = set(found) - set(previous)
            removed = set(previous) - set(found)
            self.roots = found
        for root in sorted(added):
            self.log.info("root_added", root=str(root), observer=found[root].observer)
            if (local := found[root].storage.local_dir(root)) is not None:
                self._lock_scope.check(local, self.log)
            if self._scheduler.running:  # found by a later refresh: its first pass now
                self.request(root)
        for root in sorted(removed):
            self.log.info("root_removed", root=str(root))
            self.cache.drop_root(root)
            self.metrics.forget_root(root)
            self._scheduler_remove(f"sweep:{root}")
        self._watcher.set_roots(
            {r: s.observer for r, s in found.items() if s.observer != "sweep"},
            markers={r: s.settings.policy.complete_marker for r, s in found.items()},
            commit_files={r: _commit_files(s.settings.policy) for r, s in found.items()},
        )
        for root, state in found.items():
            # (Re)scheduled only when new or when its interval changed: re-adding a job restarts
            # its interval, and a refresh that runs more often than the sweep would starve it.
            before = previous.get(root)
            job = self._scheduler.get_job(f"sweep:{root}")
            if (
                job is not None
                and before is not None
                and before.settings.sweep_interval == state.settings.sweep_interval
            ):
                continue
            self._scheduler.add_job(
                self.request,
                "interval",
                args=[root],
                id=f"sweep:{root}",
                seconds=state.settings.sweep_interval,
                replace_existing=True,
            )

    def _resolve(self, where: Root, overrides: Mapping[str, Any]) -> Resolved:
        """The root's settings now (memoized by file identity); problems logged once."""
        root = where.path
        resolved = self.settings.resolve(self.config, where, overrides)
        current = {
            (str(root), p): {"event": "config_problem", "reason": p} for p in resolved.problems
        }
        self.problems.report(f"config:{root}", current, self.log.bind(root=str(root)))
        return resolved

    def _scheduler_remove(self, job_id: str) -> None:
        if self._scheduler.get_job(job_id) is not None:
            self._scheduler.remove_job(job_id)

    def _watch_problem(self, root: Path, reason: str) -> None:
        self.log.warning("watch_problem", root=str(root), reason=reason)

    # -- passes -----------------------------------------------------------------------------

    def request(self, root: Path) -> None:
        """Enqueue a pass of ``root`` (coalesced: at most one running and one pending per root)."""
        with self._state_lock:
            if self._cancel.is_set():
                return
            if root not in self.roots:
                return
            if root in self._running and root not in self._unstarted:
                self._pending.add(root)
                return
            self._unstarted.discard(root)  # its first pass not begun: this one is it, now
            self._running.add(root)
        try:
            self._pool.submit(self._run_pass, root)
        except RuntimeError:  # pool shut down during stop
            with self._state_lock:
                self._running.discard(root)
                self._idle.notify_all()

    def finalize_now(self, root: Path, tmp: Path) -> None:
        """The marker arrived in ``tmp``: finalize that save in a pass of its own, at once (the
        watcher follows it with a debounced full pass). Called from the watch threads."""
        with self._state_lock:
            if self._cancel.is_set() or root not in self.roots:
                return
        try:
            self._pool.submit(self._run_finalize, root, tmp)
        except RuntimeError:  # pool shut down during stop
            return

    def _run_finalize(self, root: Path, tmp: Path) -> None:
        with self._state_lock:
            state = self.roots.get(root)
        if state is None:
            return
        try:
            # Recovery ranks nothing: no config.yaml walk over the root's newest steps.
            where = Root(root, state.storage)
            policy = self.settings.recovery_policy(self.config, where, state.overrides)
            report = finalize_marked(
                tmp,
                policy,
                cache=self.cache,
                log=self.log.bind(root=str(root)),
                on_outcome=self.metrics.finalize_hook(root, lambda: policy.complete_marker),
            )
        except Exception as exc:  # a bug must not kill the worker: the full pass follows
            self.log.exception("pass_crashed", root=str(root), error=repr(exc))
            report = None
        if report is None:  # lock busy, or not a save: a full pass at once does it
            self.request(root)
            return
        self.metrics.observe_actions(report)
        self.pass_errors += report.errors
        done = [o for o in report.outcomes if o.status == "done"]
        if done:
            with self._state_lock:
                last = done[-1].decision
                self._last_action = f"{last.action.value} {last.path.name} in {root}"

    def _first_sweep(self) -> threading.Event:
        """Every root's saves in flight watched, then its first pass, ``START_WORKERS`` roots at
        a time on threads that end with it (`startup`). A trigger's request for a root whose
        first pass has not begun runs it at once on the pool; for one being passed, once more
        afterwards, as usual. The event is set once every root is watched."""
        with self._state_lock:
            roots = [r for r in self.roots if r not in self._running]
            self._running.update(roots)
            self._unstarted.update(roots)
        watched, started = threading.Event(), time.monotonic()

        def phase_done(phase: int) -> None:  # phase 1: every root passed or being passed
            if phase == 0:
                watched.set()
                return
            self._first_pass_done = True
            took = round(time.monotonic() - started, 3)
            self.log.info("first_pass_done", roots=len(roots), duration_s=took)
            self._update_status()

        workers = max(START_WORKERS, self.config.daemon.workers)
        phases = [self._watch_saves, self._run_first_pass]
        left = run_phases(
            roots, phases, workers, name="ckptkeeper-start", log=self.log, on_phase=phase_done
        )
        for root in left:  # not one thread could be started: the keeper's pool runs them
            self._watch_saves(root)
        with self._state_lock:
            self._running.difference_update(left)
            self._unstarted.difference_update(left)
        for root in left:
            self.request(root)
        if left:
            watched.set()
        return watched

    def _watch_saves(self, root: Path) -> None:
        """Watch the saves in flight in ``root`` (one listing): their markers are seen from now
        on, not only once the root's first pass has listed it."""
        with self._state_lock:
            state = self.roots.get(root)
        if state is None or state.observer == "sweep" or self._cancel.is_set():
            return
        try:
            saves = in_flight_saves(root, state.settings.policy.layout)
        except OSError:  # the root's first pass reports it
            return
        self._watcher.set_in_flight(root, saves)

    def _run_first_pass(self, root: Path) -> None:
        with self._state_lock:
            taken = root not in self._unstarted  # a trigger's request ran it on the pool
            self._unstarted.discard(root)
        if taken:
            return
        if self._cancel.is_set():  # stopping: a start-up pass not begun yet is dropped
            with self._state_lock:
                self._running.discard(root)
                self._pending.discard(root)
                self._idle.notify_all()
            return
        self._run_pass(root)

    def _run_pass(self, root: Path) -> None:
        while True:
            try:
                report = self.run_once(root)
                if report.status == "busy" and not self._cancel.is_set():
                    self._pass_at(root, "retry", time.time() + 1.0)
            except Exception as exc:  # a bug must not kill the worker or the daemon
                self.log.exception("pass_crashed", root=str(root), error=repr(exc))
            with self._state_lock:
                if root in self._pending and not self._cancel.is_set():
                    self._pending.discard(root)
                    continue
                self._running.discard(root)
                self._idle.notify_all()
                return

    def _pass_at(self, root: Path, kind: str, when: float | None) -> bool:
        """A pass of ``root`` at ``when`` (epoch seconds; at once if past), replacing the
        root's earlier one of this ``kind`` (``retry``, ``relist``, ``revisit``); None removes
        it. False when it could not be scheduled (the scheduler stopping: the periodic sweep,
        or a later pass, comes anyway)."""
        job_id = f"{kind}:{root}"
        try:
            if when is None:
                self._scheduler_remove(job_id)
                return True
            self._scheduler.add_job(
                self.request,
                "date",
                args=[root],
                id=job_id,
                replace_existing=True,
                run_date=datetime.fromtimestamp(max(when, time.time()), UTC),
            )
        except Exception as exc:
            self.log.debug(f"{kind}_not_scheduled", root=str(root), error=repr(exc))
            return False
        return True

    def _relist_later(self, root: Path) -> None:
        """A listing made too soon after the root's last change cannot be trusted by the
        marker's partial scan (`ckptkeeper.info.Listing`): list it again once it can be, so the
        next save's marker costs no listing of the root. Not for a root whose watch journals
        the names created in it since the listing (``listing.mark``): its marker's pass takes
        them from there, trusted or not."""
        listing = self.cache.listing(str(root))
        if listing is None or listing.trusted or self._cancel.is_set():
            return
        if listing.mark is not None:
            return
        self._pass_at(root, "relist", time.time() + MEMO_TRUST_S + 0.1)

    def _revisit_later(self, root: Path, plan: Timing, sweep_interval: float) -> None:
        """One pass of ``root`` when a decision of ``plan`` changes with no new event (a save
        settles or turns stale: `Plan.revisit_at`), replacing the root's earlier revisit; none
        when the periodic pass comes first."""
        sweep = self._scheduler.get_job(f"sweep:{root}")
        due = getattr(sweep, "next_run_time", None)
        before = due.timestamp() if due is not None else plan.now + sweep_interval
        at = plan.next_visit(before)
        if self._pass_at(root, "revisit", at) and at is not None:
            self.log.debug("revisit_scheduled", root=str(root), at=round(at, 3))

    def run_once(self, root: Path, *, lock_timeout: float = 0.0) -> Report:
        with self._state_lock:
            state = self.roots.get(root)
        if state is None:
            return Report(root, status="error", problems=["not a configured root"])
        log = self.log.bind(root=str(root))

        seen: list[Resolved] = []

        def policy() -> Policy:  # each plan of the pass resolves afresh: an edit applies at once
            seen.append(self._resolve(Root(root, state.storage), state.overrides))
            return seen[-1].settings.policy

        report = reconcile(
            root,
            policy,
            cache=self.cache,
            log=log,
            problems=self.problems,
            delete_workers=self.config.daemon.delete_workers,
            cancel=self._cancel,
            lock_timeout=lock_timeout,
            storage=state.storage,
            on_outcome=self.metrics.finalize_hook(
                root, lambda: seen[-1].settings.policy.complete_marker
            ),
        )
        problems = seen[-1].problems if seen else state.problems
        self.metrics.observe_pass(report, paused=deletions_paused(problems))
        self.pass_errors += report.errors
        done = [o for o in report.outcomes if o.status == "done"]
        if (count := report.checkpoint_count) is not None:
            with self._state_lock:
                self._checkpoints[root] = count
        if done:
            last = done[-1].decision
            self._last_action = f"{last.action.value} {last.path.name} in {root}"
            self._update_status()
        if report.status == "ok":
            self._watcher.set_in_flight(root, report.in_flight)
            self._relist_later(root)
            if (timing := report.timing) is not None:
                self._revisit_later(root, timing, state.settings.sweep_interval)
        log.debug(
            "pass_done",
            status=report.status,
            errors=report.errors,
            duration_ms=round(report.duration_ms, 3),
        )
        return report

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no pass runs (False after ``timeout`` s)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._state_lock:
            while self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(0.2 if left is None else min(left, 0.2))
        return True

    def sweep_all(self) -> None:
        for root in list(self.roots):
            self.request(root)

    def _tick(self) -> None:
        try:
            self.refresh_roots()
        except Exception as exc:  # discovery must never take the daemon down
            self.log.exception("refresh_failed", error=repr(exc))
        self._update_status()

    def _update_status(self) -> None:
        with self._state_lock:
            count = len(self.roots)
            checkpoints = sum(n for r, n in self._checkpoints.items() if r in self.roots)
        self.notifier.status(
            f"{count} roots, {checkpoints} checkpoints; last action: {self._last_action}"
        )


@functools.lru_cache(maxsize=64)
def _layout_commit_files(layout: str) -> tuple[str, ...]:
    return commit_files(get_layout(layout))


def _commit_files(policy: Policy) -> tuple[str, ...]:
    """The files whose arrival in a checkpoint of ``policy``'s layout may make it count."""
    try:
        return _layout_commit_files(policy.layout)
    except Exception:  # a layout that cannot be loaded: its passes report it
        return ()
