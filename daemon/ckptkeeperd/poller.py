"""Polling any number of directories from one thread.

For roots whose filesystem inotify cannot see (NFS, Lustre, FUSE: other hosts' writes raise no
event here), and for in-flight saves past the inotify budget. watchdog's PollingObserver runs a
thread per watch; here one thread looks at every directory once per ``interval`` seconds.

A look at a directory (`look`) is cheap whatever it holds: either one ``lstat`` of a single name
(a tmp dir's marker; the directory itself is looked at only when it is added: its root's watch
sees it go), or ``lstat`` of the directory (its identity: gone or replaced ends the poll) and a
``scandir`` whose entries give name, inode and type without a ``stat`` each (d_ino, d_type);
only the names in ``stamp`` (the run's policy file) are ``lstat``-ed for mtime and size.
Consecutive looks are compared (`changes`) into watchdog events, the vocabulary
`ckptkeeperd.hints.event_hint` reads. A look that fails for another reason (EACCES, ESTALE, EIO)
is skipped and tried again at the next poll.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from watchdog import events as ev

__all__ = ["DirPoller", "DirState", "Polled", "changes", "look"]

_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})
_logger = logging.getLogger(__name__)  # stdlib, only for exceptions raised by callbacks


@dataclass(frozen=True)
class DirState:
    """What one look saw. ``identity`` None: the directory is gone (or is no directory now)."""

    identity: tuple[int, int] | None
    entries: Mapping[str, tuple[int, bool]] = field(default_factory=dict)  # name -> (ino, is dir)
    stamps: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # name -> (mtime_ns, size)


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError as exc:
        if exc.errno in _GONE:
            return None
        raise
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _one(path: str, name: str) -> dict[str, tuple[int, bool]]:
    try:
        st = os.lstat(os.path.join(path, name))
    except OSError as exc:
        if exc.errno not in _GONE:
            raise
        return {}
    return {name: (st.st_ino, stat.S_ISDIR(st.st_mode))}


def look(
    path: str,
    only: str | None = None,
    stamp: frozenset[str] = frozenset(),
    *,
    identity: tuple[int, int] | None = None,
) -> DirState:
    """Look at directory ``path``: only the name ``only`` if given, else every entry.

    With ``only`` and the directory's ``identity`` from an earlier look, the directory itself is
    not looked at again: one ``lstat`` a look (whoever watches its parent sees it go). Raises
    OSError for anything but the directory being gone."""
    if identity is None or only is None:
        identity = _identity(path)
        if identity is None:
            return DirState(None)
    if only is not None:
        return DirState(identity, _one(path, only))
    entries: dict[str, tuple[int, bool]] = {}
    stamps: dict[str, tuple[int, int]] = {}
    try:
        with os.scandir(path) as it:
            for entry in it:
                entries[entry.name] = (entry.inode(), entry.is_dir(follow_symlinks=False))
    except OSError as exc:
        if exc.errno in _GONE:
            return DirState(None)
        raise
    for name in stamp & entries.keys():
        try:
            st = os.lstat(os.path.join(path, name))
        except OSError:
            continue  # went since the listing: the next look sees it gone
        stamps[name] = (st.st_mtime_ns, st.st_size)
    return DirState(identity, entries, stamps)


def changes(path: str, old: DirState, new: DirState) -> list[ev.FileSystemEvent]:
    """Events that turn ``old`` into ``new``: created, deleted (a name whose inode changed is
    both), modified (a stamped file's mtime or size); the directory gone or replaced:
    ``DirDeletedEvent(path)`` alone."""
    if new.identity is None or new.identity != old.identity:
        return [ev.DirDeletedEvent(path)]
    found: list[ev.FileSystemEvent] = []
    for name, (ino, is_dir) in old.entries.items():
        now = new.entries.get(name)
        if now is None or now[0] != ino:
            gone = os.path.join(path, name)
            found.append(ev.DirDeletedEvent(gone) if is_dir else ev.FileDeletedEvent(gone))
    for name, (ino, is_dir) in new.entries.items():
        before = old.entries.get(name)
        if before is None or before[0] != ino:
            new_path = os.path.join(path, name)
            found.append(ev.DirCreatedEvent(new_path) if is_dir else ev.FileCreatedEvent(new_path))
        elif name in new.stamps and old.stamps.get(name) != new.stamps[name]:
            found.append(ev.FileModifiedEvent(os.path.join(path, name)))
    return found


@dataclass(eq=False)
class Polled:
    """One polled directory. ``only()`` is asked at every look (a root's marker name may change)."""

    path: str
    only: Callable[[], str | None]
    stamp: frozenset[str]
    callback: Callable[[Polled, list[ev.FileSystemEvent]], None] = field(repr=False)
    state: DirState = field(default_factory=lambda: DirState(None))
    alive: bool = True  # false once removed, or once the directory went


class DirPoller:
    """One thread looking at every ``add()``-ed directory, a round every ``interval`` seconds."""

    def __init__(self, interval: float, *, name: str = "ckptkeeper-poller") -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._dirs: dict[int, Polled] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(
        self,
        path: str,
        callback: Callable[[Polled, list[ev.FileSystemEvent]], None],
        *,
        only: Callable[[], str | None] = lambda: None,
        stamp: frozenset[str] = frozenset(),
    ) -> Polled:
        """Poll ``path``; its first look is taken now, so nothing after this call is missed.
        Raises OSError: ENOENT/ENOTDIR if it is not a directory (now), or why it cannot be read."""
        polled = Polled(path, only, stamp, callback)
        polled.state = look(path, only(), stamp)
        if polled.state.identity is None:
            raise OSError(errno.ENOENT, "not a directory", path)
        with self._lock:
            if self._stop.is_set():
                raise OSError(errno.EBADF, "poller stopped")
            self._dirs[id(polled)] = polled
        return polled

    def remove(self, polled: Polled) -> None:
        with self._lock:
            polled.alive = False
            self._dirs.pop(id(polled), None)

    def count(self) -> int:
        with self._lock:
            return len(self._dirs)

    def stop(self) -> None:
        """Stop the thread and join it (at most one look later)."""
        with self._lock:
            self._stop.set()
            for polled in self._dirs.values():
                polled.alive = False
            self._dirs.clear()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        # ``interval`` is the pause between rounds: however long a round takes (thousands of
        # dirs on a slow NFS server), this thread and the server get that much rest.
        while not self._stop.wait(self._interval):
            with self._lock:
                dirs = list(self._dirs.values())
            for polled in dirs:
                if self._stop.is_set():
                    return
                if polled.alive:
                    self._poll(polled)

    def _poll(self, polled: Polled) -> None:
        try:
            new = look(polled.path, polled.only(), polled.stamp, identity=polled.state.identity)
        except OSError:
            return  # EACCES, ESTALE, EIO...: look again at the next poll
        found = changes(polled.path, polled.state, new)
        gone = new.identity is None or new.identity != polled.state.identity
        polled.state = new
        if not found or not polled.alive:
            return
        if gone:
            self.remove(polled)  # the directory it looked at is gone: so is this poll
        try:
            polled.callback(polled, found)
        except Exception:
            _logger.exception("poll callback failed for %s", polled.path)
