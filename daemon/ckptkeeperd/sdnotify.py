"""A minimal ``sd_notify(3)`` client: readiness, watchdog pings and status for systemd.

systemd passes the socket in ``NOTIFY_SOCKET``: a filesystem path (``/run/systemd/notify``) or,
with a leading ``@``, a Linux abstract socket. Each message is one datagram of newline-separated
``KEY=VALUE`` assignments. Without ``NOTIFY_SOCKET`` (not run by systemd, or ``Type=simple``)
every call is a no-op. Sending never raises: the daemon must not die because systemd went away.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Mapping
from types import TracebackType

__all__ = ["Notifier", "watchdog_interval"]


def _socket_address(raw: str | None) -> str | None:
    """The ``AF_UNIX`` address for a ``NOTIFY_SOCKET`` value, or None if unusable."""
    if not raw:
        return None
    if raw.startswith("/"):
        return raw
    if raw.startswith("@") and len(raw) > 1:
        return "\0" + raw[1:]
    return None  # vsock: and other transports are not supported


class Notifier:
    """Sends notifications to the socket named by ``NOTIFY_SOCKET``.

    ``environ`` defaults to ``os.environ``; tests pass a mapping instead. The socket is created
    on first use and reused; methods are safe to call from several threads.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._raw_address = env.get("NOTIFY_SOCKET") or None
        self._address = _socket_address(self._raw_address)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """True if ``NOTIFY_SOCKET`` names a socket this client can send to."""
        return self._address is not None

    @property
    def address(self) -> str | None:
        """``NOTIFY_SOCKET`` as given (``@`` form for abstract sockets), or None."""
        return self._raw_address if self._address is not None else None

    def send(self, text: str) -> bool:
        """Send ``text`` as one datagram. True if it was sent; False if disabled or on error."""
        address = self._address
        if address is None:
            return False
        payload = text.encode("utf-8", errors="surrogateescape")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                sent = self._sock.sendto(payload, address)
            except OSError:
                return False
        return sent == len(payload)

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines, e.g. ``notify(READY=1, STATUS="watching 3 roots")``.

        Newlines inside values would split the assignment, so they become spaces.
        """
        if not fields:
            return False
        lines = [f"{key}={_one_line(value)}" for key, value in fields.items()]
        return self.send("\n".join(lines))

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``, with an optional status line."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the keep-alive ping for ``WatchdogSec=``."""
        return self.notify(WATCHDOG=1)

    def status(self, text: str) -> bool:
        """``STATUS=...``: free-form text shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def stopping(self) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        return self.notify(STOPPING=1)

    def close(self) -> None:
        """Close the socket; a later send opens a new one."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _one_line(value: str | int) -> str:
    return str(value).replace("\r", " ").replace("\n", " ")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, or None if not asked.

    None when ``WATCHDOG_USEC`` is unset, not a positive integer, or when ``WATCHDOG_PID`` is set
    to a process other than this one (the watchdog is meant for another process).
    """
    env = os.environ if environ is None else environ
    raw_usec = env.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid:
        try:
            pid = int(raw_pid)
        except ValueError:
            return None
        if pid != os.getpid():
            return None
    return usec / 2 / 1_000_000
