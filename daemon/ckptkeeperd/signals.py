"""Signals for the daemon's main thread: a handler only records, the main thread acts.

A Python signal handler runs in the main thread between two bytecodes, wherever it happens to
be, even inside a lock a handler would need (``Event.set()`` while the main thread waits on the
same Event deadlocks; handlers nested under a storm of signals overflow the stack). So the handler
here adds the signal number to a set and does nothing else, and ``signal.set_wakeup_fd`` writes
a byte to a pipe the main thread waits on with ``select``; the main thread then takes the recorded
signals and reloads, stops or forwards them itself.

Imports only the standard library: the ``ckptkeeper`` entry point installs this before the heavy
imports, so a SIGTERM during start-up stops the daemon cleanly and a SIGHUP does not kill it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
from collections.abc import Iterable, Sequence
from types import FrameType

__all__ = ["HANDLED", "SignalInbox", "process_inbox"]

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class SignalInbox:
    """Signals received and not yet taken, and the pipe that wakes the main thread for them."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._received: set[int] = set()
        self.installed = False

    def install(self, signums: Sequence[int] = HANDLED) -> None:
        """Route ``signums`` here (main thread only; idempotent)."""
        if self.installed:
            return
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in signums:
            signal.signal(signum, self._record)
        self.installed = True

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self._received.add(signum)  # nothing else: see the module docstring

    def wake(self) -> None:
        """Wake a ``wait`` from another thread (e.g. after setting a flag the main thread reads)."""
        with contextlib.suppress(BlockingIOError):  # a full pipe: a wake-up is pending anyway
            os.write(self._write_fd, b"\0")

    def wait(self, timeout: float | None, fds: Iterable[int] = ()) -> list[int]:
        """Block until a signal (or ``wake``), one of ``fds`` is readable, or ``timeout`` s.

        Returns the readable ``fds``. The pipe is drained: bytes are only wake-ups, what arrived
        is in ``take()`` (a full pipe drops bytes, never a recorded signal).
        """
        watched = [self._read_fd, *fds]
        readable, _, _ = select.select(watched, [], [], timeout)
        if self._read_fd in readable:
            self._drain()
        return [fd for fd in readable if fd != self._read_fd]

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):  # empty
            while os.read(self._read_fd, 4096):
                pass

    def take(self) -> set[int]:
        """The signals recorded since the last ``take``, each once (repeats coalesce)."""
        # Main thread only. A handler that runs between reading and replacing the set adds to the
        # one returned here, so nothing is lost.
        taken, self._received = self._received, set()
        return taken

    def fileno(self) -> int:
        return self._read_fd


_PROCESS: SignalInbox | None = None
_PROCESS_LOCK = threading.Lock()


def process_inbox() -> SignalInbox:
    """The process's inbox (signal dispositions are per process, so there is one)."""
    global _PROCESS
    with _PROCESS_LOCK:
        if _PROCESS is None:
            _PROCESS = SignalInbox()
        return _PROCESS
