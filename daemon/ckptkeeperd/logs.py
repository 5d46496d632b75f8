"""structlog setup: JSON lines when stdout is not a terminal, readable console lines when it is.

Event names and keys are stable (tests assert them): ``finalized``, ``replaced``, ``recovered``,
``garbage_collected``, ``deleted``, ``purged``, ``skipped``, ``action_failed``, ``would_<action>``,
``root_problem``, ``pass_done`` ... with ``root``, ``step``, ``path``, ``reason``, ``bytes``,
``duration_ms``.

structlog (with rich and asyncio, about a third of a cold ``sweep``'s start) is imported when
something is first logged, not before: a cron sweep with nothing to report never imports it.
Once it is imported (the daemon, or a test capturing logs) everything is as it always was.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, TextIO

__all__ = ["LEVELS", "ProblemLog", "configure_logging", "emit", "get_logger"]

LEVELS = ("debug", "info", "warning", "error")

# The configuration asked for before structlog was imported: applied on first use.
_pending: dict[str, Any] | None = None
_pending_lock = threading.Lock()


def configure_logging(
    level: str = "info", *, json_output: bool | None = None, stream: TextIO | None = None
) -> None:
    global _pending
    out = stream if stream is not None else sys.stdout
    if json_output is None:
        json_output = not out.isatty()
    inotify_logger = logging.getLogger("watchdog.observers.inotify")
    if not any(isinstance(f, _DropStopRace) for f in inotify_logger.filters):
        inotify_logger.addFilter(_DropStopRace())
    with _pending_lock:
        _pending = {"level": level, "json_output": json_output, "out": out}
    if "structlog" in sys.modules:
        _structlog()  # otherwise applied by the first logger that is used


def _structlog() -> Any:
    """The structlog module, configured as last asked (`configure_logging`). A logger made
    while another thread applies the configuration waits for it (the lock is held throughout)."""
    global _pending
    import structlog

    if _pending is not None:
        with _pending_lock:
            if _pending is not None:
                _apply(structlog, **_pending)
                _pending = None
    return structlog


def _apply(structlog: Any, level: str, json_output: bool, out: TextIO) -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if json_output
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


class _DropStopRace(logging.Filter):
    """watchdog logs an error when an inotify emitter is read while it stops (a benign race
    during our own shutdown); keep it out of the logs so an error line always means an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


def get_logger(**bind: Any) -> Any:
    """A structlog logger bound to ``bind``; before structlog is imported, a stand-in that
    imports it (and applies `configure_logging`) when first used."""
    if "structlog" in sys.modules and _pending is None:
        return sys.modules["structlog"].get_logger("ckptkeeper").bind(**bind)
    return _Deferred(bind)


class _Deferred:
    """A logger not made yet: the first attribute asked for (``info``, ``bind``...) makes it."""

    __slots__ = ("_bind", "_made")

    def __init__(self, bind: dict[str, Any]) -> None:
        self._bind = bind
        self._made: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._made is None:
            self._made = _structlog().get_logger("ckptkeeper").bind(**self._bind)
        return getattr(self._made, name)


def emit(log: Any, fields: dict[str, Any]) -> None:
    """Log one problem described as fields: ``event`` names it, ``level`` (default warning)."""
    shown = dict(fields)
    level = shown.pop("level", "warning")
    getattr(log, level)(shown.pop("event", "checkpoint_problem"), **shown)


class ProblemLog:
    """Logs a recurring problem (a bad checkpoint, an unreadable root) once, not on every pass.

    A problem that goes away and comes back is logged again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[str, set[tuple[str, str]]] = {}

    def report(self, scope: str, current: dict[tuple[str, str], dict[str, Any]], log: Any) -> None:
        """``current``: problems seen in ``scope`` now, keyed by (path, reason), with log fields."""
        with self._lock:
            before = self._active.get(scope, set())
            self._active[scope] = set(current)
        for key, fields in current.items():
            if key not in before:
                emit(log, fields)
