"""The long-running keeper: `KeeperCore` (the roots and their passes) with its lifecycle.

Threads: the main thread waits for signals (``signals``: handlers only record them, the main
thread acts) and for the sidecar's process (``sidecar``); an apscheduler
BackgroundScheduler enqueues periodic sweeps, re-expands ``[[discover]]`` globs and pings the
systemd watchdog; watchdog observers + a debouncer enqueue event-driven passes; a bounded pool
runs passes, never two of one root at once (a request during a pass re-runs it once afterwards).
"""

from __future__ import annotations

import signal
import threading
import time

from .config import ConfigError
from .httpserver import open_endpoint
from .keeper import KeeperCore
from .sdnotify import watchdog_interval
from .sidecar import FinalPass

__all__ = ["FIRST_PASS_WAIT", "STOP_TIMEOUT", "Keeper"]

FIRST_PASS_WAIT = 60.0  # READY at the latest (systemd's default TimeoutStartSec is 90 s)
STOP_TIMEOUT = 8.0  # SIGTERM -> exit within 10 s (systemd's TimeoutStopSec gives us 15)


class Keeper(KeeperCore):
    """The daemon: start (first pass, READY), serve (signals, reload), stop (final pass)."""

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._open_http()
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
        watched = self._first_sweep()
        # READY=1 once every root is watched, its saves in flight too: the keeper serves (a
        # marker's save is finalized at once) while the first pass over the backlog goes on.
        # Bounded: a hung filesystem must not make systemd's start timeout kill us.
        all_watched = self._wait_serving(watched, FIRST_PASS_WAIT)
        self._update_status()
        self.notifier.ready(f"{len(self.roots)} roots watched")
        self.log.info(
            "ready",
            saves_watched=all_watched,
            first_pass_complete=self._first_pass_done,
            roots=len(self.roots),
            observer_kinds=sorted({s.observer for s in self.roots.values()}),
        )

    def request_stop(self) -> None:
        """Stop the daemon (any thread): ``serve`` returns."""
        self._stopping = True
        self._inbox.wake()

    def request_reload(self) -> None:
        """Reload the config in the main thread (any thread)."""
        self._reload_requested = True
        self._inbox.wake()

    def reload(self) -> None:
        if self._reload is None:
            self.log.warning("reload_ignored", reason="no config file to reload")
            return
        try:
            new = self._reload()
        except ConfigError as exc:
            self.log.error("config_reload_failed", reason=str(exc), kept="previous config")
            return
        old, self.config = self.config, new
        self.metrics.root_labels = new.daemon.root_labels
        if new.daemon.metrics_address != old.daemon.metrics_address:
            self._close_http()
            self._open_http()
        self._scheduler.reschedule_job(
            "refresh", trigger="interval", seconds=new.defaults.sweep_interval
        )
        self.refresh_roots()
        self.sweep_all()
        self.log.info("config_reloaded", roots=len(self.roots))

    def run(self) -> int:
        """The daemon from start to exit, in the main thread; returns the exit code (sidecar)."""
        self.install_signal_handlers()
        if self.sidecar is not None:
            self.log.info("sidecar", **self.sidecar.describe())
        try:
            self.start()
            self.serve()
        finally:
            # The followed process exited: one final pass (a stop signal cuts it short).
            final = self.sidecar is not None and self.sidecar.exited()
            complete = self.shutdown(final_pass=final)
        if self.sidecar is None:
            return 0
        self.sidecar.close()
        return self.sidecar.exit_code(complete)

    def serve(self) -> None:
        """Block until a stop is requested or the sidecar's process exits; reload on SIGHUP."""
        fds = [self.sidecar.fileno()] if self.sidecar is not None else []
        while True:
            self._take_signals()
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
            if self._stopping or (self.sidecar is not None and self.sidecar.exited()):
                return
            # Woken by a signal's byte; the timeout only bounds a signal whose handler ran late.
            self._inbox.wait(1.0, fds)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop (a sidecar forwards them to its running trainer); SIGHUP reloads.
        Main thread only; the handlers only record (``signals``), ``_take_signals`` acts."""
        self._inbox.install()

    def _take_signals(self) -> None:
        for signum in sorted(self._inbox.take()):
            if signum == signal.SIGHUP:
                self._reload_requested = True
            elif self.sidecar is not None and self.sidecar.forward(signum):
                name = signal.Signals(signum).name
                self.log.info("signal_forwarded", signal=name, pid=self.sidecar.pid)
            else:
                self._stopping = True

    def _wait_serving(self, event: threading.Event, timeout: float) -> bool:
        """Wait for ``event`` in the main thread, taking signals meanwhile; False on a stop."""
        deadline = time.monotonic() + timeout
        while not event.wait(0.2):
            self._take_signals()
            if self._stopping or time.monotonic() >= deadline:
                return False
        return True

    def _wait_idle_serving(self, timeout: float | None) -> bool:
        """``wait_idle`` in the main thread, taking signals meanwhile; False on a stop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.wait_idle(0.2):
            self._take_signals()
            if self._stopping or (deadline is not None and time.monotonic() >= deadline):
                return False
        return True

    def shutdown(self, *, final_pass: bool = False) -> bool:
        """Stop the triggers and passes; with ``final_pass`` pass every root once more first.

        Returns False when that final pass could not finish a root (logged as
        ``final_pass_incomplete``).
        """
        self.notifier.stopping()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        self._watcher.stop()
        complete = self._final_pass() if final_pass else True
        self._cancel.set()  # long removals stop early; the next pass finishes them
        self.wait_idle(STOP_TIMEOUT)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._close_http()
        self.log.info("stopped", errors=self.pass_errors)
        self.notifier.close()
        return complete

    def _open_http(self) -> None:
        address = self.config.daemon.metrics_address
        self._http = open_endpoint(address, self.metrics.render, self.page, self.log)

    def _close_http(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    # -- the sidecar's final pass -----------------------------------------------------------

    def _final_pass(self) -> bool:
        with self._state_lock:
            roots = sorted(self.roots)
        self.log.info("final_pass", roots=len(roots))
        self._wait_idle_serving(None)  # the passes in progress finish first
        if self._stopping:  # then only what needs no waiting: no lock wait, removals cut short
            self._cancel.set()
            self.wait_idle(STOP_TIMEOUT)
        final = FinalPass(self.run_once, self._cancel, self.log, stop_wait=STOP_TIMEOUT)
        return final.run(
            roots, self._pool, take_signals=self._take_signals, stopping=lambda: self._stopping
        )
