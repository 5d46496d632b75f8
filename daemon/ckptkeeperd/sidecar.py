"""The process a sidecar keeper follows: a trainer it starts (``run ... -- CMD``) or any process
(``--watch-pid``). The keeper serves until it exits, runs one final pass and exits with:

- the trainer's exit code (128 + N when signal N killed it), as a shell would;
- ``FINAL_PASS_INCOMPLETE`` (75, ``EX_TEMPFAIL``) when the trainer succeeded (or, with
  ``--watch-pid``, always) but the final pass could not finish a root (still locked by another
  actor after ``FINAL_LOCK_WAIT`` s, unusable, an action failed, or stopped by a signal); a
  failing trainer's own code wins, the incomplete pass is in the log either way;
- 127 / 126 when the trainer command is not found / not executable (nothing else is started);
- 2 when ``--watch-pid`` names no process.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, wait
from pathlib import Path
from typing import Any

from ckptkeeper.errors import strerror

from .reconcile import Report

__all__ = ["FINAL_LOCK_WAIT", "FINAL_PASS_INCOMPLETE", "FinalPass", "Sidecar", "SidecarError"]

FINAL_PASS_INCOMPLETE = 75  # sysexits EX_TEMPFAIL: training went fine, retry `ckptkeeper sweep`
FINAL_LOCK_WAIT = 30.0  # the final pass waits this long for a root another actor has locked
LOCK_SLICE = 3.0  # ... in attempts this long, so that a stop signal is heard in between


class SidecarError(Exception):
    """The followed process could not be started or found; ``code`` is the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Sidecar:
    """A process followed through a pidfd (readable once it has exited)."""

    def __init__(self, pid: int, pidfd: int, trainer: subprocess.Popen[bytes] | None) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self.trainer = trainer

    def describe(self) -> dict[str, Any]:
        """Log fields: what is followed."""
        if self.trainer is None:
            return {"watch_pid": self.pid}
        return {"trainer_pid": self.pid, "cmd": self.trainer.args}

    @classmethod
    def spawn(cls, cmd: Sequence[str]) -> Sidecar:
        """Start the trainer; a command that cannot run is a `SidecarError` with a shell's code."""
        try:
            trainer = subprocess.Popen(list(cmd))
        except FileNotFoundError as exc:
            why = "No such file or directory" if os.sep in cmd[0] else "command not found"
            raise SidecarError(f"{cmd[0]}: {why}", 127) from exc
        except OSError as exc:  # EACCES (no x bit, a directory), ENOEXEC, ...
            raise SidecarError(f"{cmd[0]}: {strerror(exc)}", 126) from exc
        # Our unreaped child: its pid cannot be reused before we wait for it.
        return cls(trainer.pid, os.pidfd_open(trainer.pid), trainer)

    @classmethod
    def watch(cls, pid: int) -> Sidecar:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise SidecarError(f"--watch-pid {pid}: no such process", 2) from None
        except OSError as exc:
            raise SidecarError(f"--watch-pid {pid}: {strerror(exc)}", 2) from None
        return cls(pid, pidfd, None)

    def fileno(self) -> int:
        """Readable once the process has exited (for ``select``)."""
        return self._pidfd

    def exited(self) -> bool:
        readable, _, _ = select.select([self._pidfd], [], [], 0)
        return bool(readable)

    def forward(self, signum: int) -> bool:
        """Send ``signum`` to a running trainer (the sidecar stops when its trainer does).

        False when there is none to send it to: no trainer (``--watch-pid``) or it has exited.
        """
        if self.trainer is None or self.trainer.poll() is not None:
            return False
        self.trainer.send_signal(signum)
        return True

    def exit_code(self, final_pass_complete: bool) -> int:
        code = 0
        if self.trainer is not None:
            code = self.trainer.wait()
            code = 128 - code if code < 0 else code
        if code == 0 and not final_pass_complete:
            return FINAL_PASS_INCOMPLETE
        return code

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._pidfd)


class FinalPass:
    """Every root once more after the followed process exited, the roots in parallel.

    A root another actor holds locked is retried until ``FINAL_LOCK_WAIT`` s have passed; a stop
    signal cuts the wait short. What could not be finished is logged (``final_pass_incomplete``).
    """

    def __init__(
        self,
        run_once: Callable[..., Report],
        cancel: threading.Event,
        log: Any,
        *,
        stop_wait: float,
    ) -> None:
        self._run_once = run_once
        self._cancel = cancel  # set on a stop: removals stop early, no more lock waits
        self._log = log
        self._stop_wait = stop_wait  # after a stop, what still runs gets this long

    def run(
        self,
        roots: Sequence[Path],
        pool: Executor,
        *,
        take_signals: Callable[[], None],
        stopping: Callable[[], bool],
    ) -> bool:
        """True when every root was finished. Waits in the caller's (main) thread, taking
        signals meanwhile; ``stopping()`` turning true cancels what is still running."""
        futures: dict[Future[Report], Path] = {pool.submit(self.one, root): root for root in roots}
        pending = set(futures)
        while pending and not stopping():
            pending = wait(pending, timeout=0.2).not_done
            take_signals()
        if pending:
            self._cancel.set()
            pending = wait(pending, timeout=self._stop_wait).not_done
        reports = {root: f.result() for f, root in futures.items() if f not in pending}
        complete = True
        for root in roots:
            why = unfinished(reports.get(root))
            if why is not None:
                complete = False
                self._log.error(
                    "final_pass_incomplete", root=str(root), status=why[0], reason=why[1]
                )
        return complete

    def one(self, root: Path) -> Report:
        deadline = time.monotonic() + FINAL_LOCK_WAIT
        while True:
            left = 0.0 if self._cancel.is_set() else max(deadline - time.monotonic(), 0.0)
            try:
                report = self._run_once(root, lock_timeout=min(left, LOCK_SLICE))
            except Exception as exc:  # a bug: reported as this root's failure
                self._log.exception("pass_crashed", root=str(root), error=repr(exc))
                return Report(root, status="error", problems=[repr(exc)])
            if report.status != "busy" or self._cancel.is_set() or left <= LOCK_SLICE:
                return report


def unfinished(report: Report | None) -> tuple[str, str] | None:
    """(status, reason) when a final pass did not finish its root; None when it did."""
    if report is None:
        return "stopped", "stopped before the final pass finished"
    if report.status == "busy":
        return "busy", f"root locked by another actor (waited up to {FINAL_LOCK_WAIT:g}s)"
    if report.status != "ok":
        return report.status, "; ".join(report.problems)
    if report.errors:
        return "errors", f"{report.errors} action(s) failed or left files behind"
    return None
