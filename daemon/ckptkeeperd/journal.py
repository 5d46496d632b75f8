"""What a root's inotify watch saw created in it: the names a marker's partial scan would
otherwise list the root for (`ckptkeeper.info.Journal`: `Journals`, a `RootWatcher`'s).

A full scan takes a mark just before it lists the root; the marker's pass asks for the names
created since that mark and looks at those of its step (with the layout's own spellings and
those the listing found), so it lists nothing. That is as complete as a listing only while the
watch saw every event since the mark, so a journal is one watch's: it starts with the watch (on
the directory of one (st_dev, st_ino)) and ends for good when the watch ends, when the watched
directory is deleted, renamed or unmounted, or when the kernel's queue overflows (events lost).
Events still queued when the names are asked for are read first (`InotifyReader.barrier`): a
name created before the question is in the answer, as it would be in a listing made then.
An ended journal answers None, and so does a mark older than what the journal still holds:
the caller lists the root, as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ckptkeeperd.inotify import (
    IN_CREATE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MOVE_SELF,
    IN_MOVED_TO,
    IN_UNMOUNT,
)

__all__ = ["JOURNAL_WAIT", "MAX_NAMES", "Journals", "RootJournal"]

#: Names kept per root at most between two full listings (a burst beyond: the oldest half goes
#: and a mark older than that is answered None).
MAX_NAMES = 4096
JOURNAL_WAIT = 0.5  # s for the queued events to be read; longer: the root is listed instead
_ROOT_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED | IN_UNMOUNT


class RootJournal:
    """The names created in one watched root, numbered in the order the reader thread saw them.
    ``record`` and ``end`` are called from the reader thread, ``mark`` and ``since`` from passes."""

    def __init__(self, identity: tuple[int, int], barrier: Callable[[float], bool]) -> None:
        self.identity = identity
        self._barrier = barrier
        self._lock = threading.Lock()
        self._names: list[str] = []
        self._base = 0  # how many names were dropped from the front
        self._marks = (0, 0)  # the last two marks: names before the older are not needed
        self.ended = False

    def saw(self, mask: int, name: str) -> None:
        """An event of the root's watch (``name`` "" for the root itself)."""
        if mask & (IN_CREATE | IN_MOVED_TO) and name:
            self.record(name)
        elif mask & _ROOT_GONE:
            self.end()

    def record(self, name: str) -> None:
        with self._lock:
            self._names.append(name)
            if len(self._names) > MAX_NAMES:
                half = len(self._names) // 2
                del self._names[:half]
                self._base += half

    def restart(self) -> None:
        """Events were lost: every earlier mark is answered None from now on."""
        with self._lock:
            self._base += len(self._names) + 1
            self._names = []

    def end(self) -> None:
        with self._lock:
            self.ended = True
            self._names = []

    def mark(self, identity: tuple[int, int]) -> int | None:
        """Now, in names seen; None when this journal cannot answer for ``identity``."""
        with self._lock:
            if self.ended or identity != self.identity:
                return None
            now = self._base + len(self._names)
            older = self._marks[1]
            self._marks = (older, now)
            if older > self._base:  # the last listing but one began there: keep from it
                del self._names[: older - self._base]
                self._base = older
            return now

    def since(self, mark: int, identity: tuple[int, int], timeout: float) -> list[str] | None:
        """The names seen after ``mark`` up to now (queued events read first); None if not all
        of them are known."""
        if identity != self.identity or not self._barrier(timeout):
            return None
        with self._lock:
            if self.ended or mark < self._base:
                return None
            return self._names[mark - self._base :]


class Journals:
    """The journal of each root watched by inotify (`RootWatcher.journals`): the cache's
    `ckptkeeper.info.Journal`. ``start``, ``end``, ``restart_all`` are the watcher's."""

    def __init__(self) -> None:
        self._by_root: dict[str, RootJournal] = {}  # replaced entries: read without a lock

    def start(self, root: str, journal: RootJournal) -> None:
        old = self._by_root.get(root)
        self._by_root[root] = journal
        if old is not None:
            old.end()

    def end(self, root: str) -> None:
        journal = self._by_root.pop(root, None)
        if journal is not None:
            journal.end()

    def end_all(self) -> None:
        for root in list(self._by_root):
            self.end(root)

    def restart_all(self) -> None:
        for journal in list(self._by_root.values()):
            journal.restart()

    def mark(self, root: str, identity: tuple[int, int]) -> object | None:
        """`ckptkeeper.info.Journal.mark`: before a full listing of ``root``."""
        journal = self._by_root.get(root)
        at = None if journal is None else journal.mark(identity)
        return None if at is None else (journal, at)

    def since(self, root: str, mark: object, identity: tuple[int, int]) -> list[str] | None:
        """`ckptkeeper.info.Journal.since`: the names created in ``root`` since ``mark``."""
        if not isinstance(mark, tuple) or len(mark) != 2:
            return None
        journal, at = mark
        if not isinstance(journal, RootJournal) or not isinstance(at, int):
            return None
        if self._by_root.get(root) is not journal:
            return None  # the watch it was taken on ended (or another watcher's mark)
        return journal.since(at, identity, JOURNAL_WAIT)
