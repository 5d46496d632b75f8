"""The long-running keeper: triggers (watch events, schedule, sidecar exit) -> one `reconcile`.

Threads: the main thread waits for signals and the sidecar's trainer; an apscheduler
BackgroundScheduler enqueues periodic sweeps, re-expands ``[[discover]]`` globs and pings the
systemd watchdog; watchdog observers + a debouncer enqueue event-driven passes; a bounded pool
runs passes, never two of one root at once (a request during a pass re-runs it once afterwards).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from ckptkeeper import InfoCache

from .config import ConfigError, DaemonConfig, Settings
from .logs import ProblemLog, get_logger
from .reconcile import Report, reconcile
from .roots import expand_roots, resolve_settings
from .sdnotify import Notifier, watchdog_interval
from .watch import RootWatcher, resolve_observer

__all__ = ["Keeper"]

FIRST_PASS_WAIT = 60.0  # systemd's default TimeoutStartSec is 90 s
STOP_TIMEOUT = 8.0  # SIGTERM -> exit within 10 s (systemd's TimeoutStopSec gives us 15)


@dataclass
class _RootState:
    overrides: Mapping[str, Any]
    settings: Settings
    observer: str
    problems: tuple[str, ...] = ()


class Keeper:
    def __init__(
        self,
        config: DaemonConfig,
        *,
        reload: Callable[[], DaemonConfig] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self._reload = reload
        self.log = get_logger()
        self.notifier = notifier or Notifier()
        self.cache = InfoCache()
        self.problems = ProblemLog()
        self.roots: dict[Path, _RootState] = {}
        self._state_lock = threading.Lock()
        self._running: set[Path] = set()
        self._pending: set[Path] = set()
        self._cancel = threading.Event()
        self._wake = threading.Event()
        self._stop_requested = False
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
        )
        self._idle = threading.Condition(self._state_lock)
        self._last_action = "none yet"
        self._checkpoints: dict[Path, int] = {}
        self.pass_errors = 0

    # -- root set ---------------------------------------------------------------------------

    def refresh_roots(self) -> None:
        """Re-expand configured and discovered roots, resolve each root's settings, sync watches."""
        found: dict[Path, _RootState] = {}
        for root, overrides in expand_roots(self.config):
            resolved = resolve_settings(self.config, root, overrides)
            try:
                kind = resolve_observer(root, resolved.settings.observer)
            except OSError:
                kind = "polling"
            found[root] = _RootState(overrides, resolved.settings, kind, tuple(resolved.problems))
            current = {
                (str(root), p): {"event": "config_problem", "reason": p} for p in resolved.problems
            }
            self.problems.report(f"config:{root}", current, self.log.bind(root=str(root)))
        with self._state_lock:
            previous = self.roots
            added = set(found) - set(previous)
            removed = set(previous) - set(found)
            self.roots = found
        for root in sorted(added):
            self.log.info("root_added", root=str(root), observer=found[root].observer)
        for root in sorted(removed):
            self.log.info("root_removed", root=str(root))
            self.cache.drop_root(root)
            self._scheduler_remove(f"sweep:{root}")
        self._watcher.set_roots(
            {r: s.observer for r, s in found.items()},
            markers={r: s.settings.policy.complete_marker for r, s in found.items()},
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
            if root in self._running:
                self._pending.add(root)
                return
            self._running.add(root)
        try:
            self._pool.submit(self._run_pass, root)
        except RuntimeError:  # pool shut down during stop
            with self._state_lock:
                self._running.discard(root)
                self._idle.notify_all()

    def _run_pass(self, root: Path) -> None:
        while True:
            try:
                report = self.run_once(root)
                if report.status == "busy" and not self._cancel.is_set():
                    self._retry_later(root)
            except Exception as exc:  # a bug must not kill the worker or the daemon
                self.log.exception("pass_crashed", root=str(root), error=repr(exc))
            with self._state_lock:
                if root in self._pending and not self._cancel.is_set():
                    self._pending.discard(root)
                    continue
                self._running.discard(root)
                self._idle.notify_all()
                return

    def _retry_later(self, root: Path) -> None:
        try:
            self._scheduler.add_job(
                self.request,
                "date",
                args=[root],
                id=f"retry:{root}",
                replace_existing=True,
                run_date=datetime.now(UTC) + timedelta(seconds=1.0),
            )
        except Exception as exc:  # scheduler stopping: the periodic sweep retries anyway
            self.log.debug("retry_not_scheduled", root=str(root), error=repr(exc))

    def run_once(self, root: Path) -> Report:
        with self._state_lock:
            state = self.roots.get(root)
        if state is None:
            return Report(root, status="error", problems=["not a configured root"])
        log = self.log.bind(root=str(root))
        report = reconcile(
            root,
            state.settings.policy,
            cache=self.cache,
            log=log,
            problems=self.problems,
            delete_workers=self.config.daemon.delete_workers,
            cancel=self._cancel,
        )
        self.pass_errors += report.errors
        done = [o for o in report.outcomes if o.status == "done"]
        if report.scan is not None:
            with self._state_lock:
                self._checkpoints[root] = len(report.scan.steps)
        if done:
            last = done[-1].decision
            self._last_action = f"{last.action.value} {last.path.name} in {root}"
            self._update_status()
        if report.status == "ok":
            self._watcher.set_in_flight(root, report.in_flight)
        log.debug(
            "pass_done",
            status=report.status,
            errors=report.errors,
            duration_ms=round(report.duration_ms, 3),
        )
        return report

    def wait_idle(self, timeout: float | None = None, *, until_stop: bool = False) -> bool:
        """Wait until no pass runs; with ``until_stop``, also return early on a stop request."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._state_lock:
            while self._running:
                if until_stop and self._stop_requested:
                    return False
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

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self.refresh_roots()
        self._scheduler.add_job(
            self._tick,
            "interval",
            id="refresh",
            seconds=self.config.defaults.sweep_interval,
            replace_existing=True,
        )
        interval = watchdog_interval()
        if interval is not None and self.notifier.enabled:
            self._scheduler.add_job(
                self.notifier.watchdog, "interval", id="watchdog", seconds=interval
            )
        self._scheduler.start()
        self.sweep_all()
        # READY=1 after the first pass; a first pass still removing terabytes after
        # FIRST_PASS_WAIT must not make systemd's start timeout kill us: ready anyway, it goes on.
        complete = self.wait_idle(FIRST_PASS_WAIT, until_stop=True)
        self._update_status()
        self.notifier.ready(f"{len(self.roots)} roots; first pass done")
        self.log.info(
            "ready",
            first_pass_complete=complete,
            roots=len(self.roots),
            observer_kinds=sorted({s.observer for s in self.roots.values()}),
        )

    def request_stop(self) -> None:
        self._stop_requested = True
        self._wake.set()

    def request_reload(self) -> None:
        self._reload_requested = True
        self._wake.set()

    def reload(self) -> None:
        if self._reload is None:
            self.log.warning("reload_ignored", reason="no config file to reload")
            return
        try:
            new = self._reload()
        except ConfigError as exc:
            self.log.error("config_reload_failed", reason=str(exc), kept="previous config")
            return
        self.config = new
        self._scheduler.reschedule_job(
            "refresh", trigger="interval", seconds=new.defaults.sweep_interval
        )
        self.refresh_roots()
        self.sweep_all()
        self.log.info("config_reloaded", roots=len(self.roots))

    def serve(self, until: Callable[[], bool] | None = None) -> None:
        """Block until a stop is requested (signal) or ``until()`` turns true."""
        while True:
            self._wake.wait(0.5 if until is not None else None)
            self._wake.clear()
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
            if self._stop_requested or (until is not None and until()):
                return

    def shutdown(self, *, final_pass: bool = False) -> None:
        self.notifier.stopping()
        self._scheduler.shutdown(wait=False)
        self._watcher.stop()
        if final_pass:
            self.wait_idle(STOP_TIMEOUT)
            self.sweep_all()
            self.wait_idle()
        else:
            self._cancel.set()  # long removals stop early; the next pass finishes them
            self.wait_idle(STOP_TIMEOUT)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.log.info("stopped", errors=self.pass_errors)
        self.notifier.close()

    def install_signal_handlers(self, forward_to: subprocess.Popen[bytes] | None = None) -> None:
        def on_stop(signum: int, _frame: FrameType | None) -> None:
            if forward_to is not None and forward_to.poll() is None:
                forward_to.send_signal(signum)  # the sidecar stops when its trainer does
            else:
                self.request_stop()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, lambda _s, _f: self.request_reload())


def wait_for_pid(pid: int, stop: threading.Event) -> None:
    """Block until process ``pid`` (not our child) exits or ``stop`` is set."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not stop.is_set():
            if poller.poll(200):
                return
    finally:
        os.close(fd)


def run_trainer(cmd: Sequence[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(list(cmd))
