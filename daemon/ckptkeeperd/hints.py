"""What a filesystem event means for its root, and the debouncer that turns hints into passes.

Handlers only classify an event (`event_hint`) and trigger the `Debouncer`; the scheduled pass is
the truth. Events are watchdog's event classes, whichever source saw them: the polling of
`ckptkeeperd.poller`, or inotify (`from_inotify`, with the masks below that the watches ask for).
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path

from watchdog import events as ev

from ckptkeeper.layouts import NEMO_RL
from ckptkeeperd.config import RUN_FILE
from ckptkeeperd.inotify import (
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_ISDIR,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
)

__all__ = [
    "DEFAULT_MARKER",
    "OWN_AREA",
    "ROOT_MASK",
    "TMP_MASK",
    "Debouncer",
    "Hint",
    "event_hint",
    "from_inotify",
]

OWN_AREA = ".ckptkeeper"
DEFAULT_MARKER = NEMO_RL.default_marker
_logger = logging.getLogger(__name__)  # stdlib, only for exceptions raised by callbacks

# What a watch asks inotify for. Root: entries coming and going, itself deleted or renamed away,
# and the run's policy file closed after writing. Tmp dir: the marker arriving, itself deleted.
# Never reads, opens, attribute changes, or writes in progress: none of them is news.
ROOT_MASK = IN_CREATE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
ROOT_MASK |= IN_CLOSE_WRITE
TMP_MASK = IN_CREATE | IN_MOVED_TO | IN_DELETE_SELF
_NOT_NEWS: tuple[type[ev.FileSystemEvent], ...] = (ev.FileOpenedEvent, ev.FileClosedNoWriteEvent)
_NOT_NEWS += (ev.DirModifiedEvent, ev.FileAttribEvent, ev.DirAttribEvent)


class Debouncer:
    """One background thread; ``trigger(key)`` schedules ``callback(key)`` after ``delay`` s of
    quiet, but no later than ``max_delay`` s after the first trigger of a burst;
    ``trigger(key, now=True)`` makes it due at once. Thread-safe."""

    def __init__(
        self, callback: Callable[[Path], None], delay: float = 0.15, max_delay: float = 1.0
    ) -> None:
        if delay < 0 or max_delay < delay:
            raise ValueError(f"need 0 <= delay <= max_delay, got {delay=} {max_delay=}")
        self._callback = callback
        self._delay = delay
        self._max_delay = max_delay
        self._cond = threading.Condition()
        self._pending: dict[Path, tuple[float, float]] = {}  # key -> (first, last) trigger time
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="ckptkeeper-debounce", daemon=True)
        self._thread.start()

    def trigger(self, key: Path, *, now: bool = False) -> None:
        at = time.monotonic()
        with self._cond:
            if self._stopped:
                return
            if now or key not in self._pending:  # due before the thread would wake
                self._cond.notify()
            # "now": a burst that began max_delay ago is due at once, whatever follows it.
            first = at - self._max_delay if now else self._pending.get(key, (at, at))[0]
            self._pending[key] = (first, at)

    def stop(self) -> None:
        """Stop the thread and join it; pending triggers are dropped."""
        with self._cond:
            self._stopped = True
            self._pending.clear()
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _due(self, times: tuple[float, float]) -> float:
        first, last = times
        return min(last + self._delay, first + self._max_delay)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    now = time.monotonic()
                    due = [k for k, times in self._pending.items() if self._due(times) <= now]
                    if due:
                        break
                    wake = min(map(self._due, self._pending.values()), default=None)
                    self._cond.wait(None if wake is None else wake - now)
                for key in due:
                    del self._pending[key]
            for key in due:
                try:
                    self._callback(key)
                except Exception:
                    _logger.exception("debounced callback failed for %s", key)


class Hint(enum.Enum):
    """What an event means for its root."""

    NONE = "none"  # not news: reads, metadata, our own area, a save being written
    SOON = "soon"  # something changed: a debounced pass
    NOW = "now"  # the completion marker arrived in an in-flight tmp dir: a pass at once


def from_inotify(watched: Path, mask: int, name: str) -> ev.FileSystemEvent | None:
    """The event an inotify event on ``watched`` stands for; None: nothing `event_hint` reads.

    A rename is seen as its halves: the old name deleted (IN_MOVED_FROM), the new one created
    (IN_MOVED_TO); `event_hint` takes a move in a root as news whatever its names, and the marker
    renamed into place as its creation. The watched directory deleted, renamed away (its watch
    follows the inode elsewhere) or dropped by the kernel (IN_IGNORED: also after an unmount) is
    ``DirDeletedEvent(watched)``: its watch is dead."""
    if not name:
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
            return ev.DirDeletedEvent(os.fspath(watched))
        return None
    path = os.fspath(watched / name)
    is_dir = bool(mask & IN_ISDIR)
    if mask & (IN_CREATE | IN_MOVED_TO):
        return ev.DirCreatedEvent(path) if is_dir else ev.FileCreatedEvent(path)
    if mask & (IN_DELETE | IN_MOVED_FROM):
        return ev.DirDeletedEvent(path) if is_dir else ev.FileDeletedEvent(path)
    if mask & IN_CLOSE_WRITE and not is_dir:
        return ev.FileClosedEvent(path)
    return None


def _name(path: bytes | str) -> str:
    return os.path.basename(os.fsdecode(path))


def event_hint(
    root: Path,
    watched: Path,
    event: ev.FileSystemEvent,
    marker: str | None = DEFAULT_MARKER,
    commit: Collection[str] = (),
) -> Hint:
    """What ``event``, from the watch on ``watched`` (``root`` or one of its tmp dirs), means for
    ``root`` whose completion marker is named ``marker`` (None: not known, maybe any new file).
    ``commit``: the root's layout's commit files (`ckptkeeper.layouts.commit_files`): one arriving
    in a checkpoint written in place may make it count (once settled), so it is news (soon)."""
    if watched != root:  # only the marker's arrival is news (the root's watch sees this dir go)
        moved = isinstance(event, ev.FileMovedEvent)  # created: also an unpaired IN_MOVED_TO
        if not (moved or isinstance(event, ev.FileCreatedEvent)):
            return Hint.NONE
        name = _name(event.dest_path if moved else event.src_path)
        if name == (marker or DEFAULT_MARKER):
            return Hint.NOW
        return Hint.SOON if marker is None or name in commit else Hint.NONE
    if isinstance(event, _NOT_NEWS):
        return Hint.NONE
    if isinstance(event, ev.FileModifiedEvent | ev.FileClosedEvent):
        return Hint.SOON if _name(event.src_path) == RUN_FILE else Hint.NONE
    paths = [Path(os.fsdecode(event.src_path))]
    if event.dest_path:
        paths.append(Path(os.fsdecode(event.dest_path)))
    own = root / OWN_AREA
    return Hint.NONE if all(p == own or own in p.parents for p in paths) else Hint.SOON
