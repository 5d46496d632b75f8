"""Filesystem watches on checkpoint roots: events are hints that enqueue a reconcile of a root.

Watched: each root non-recursively, plus each in-flight ``tmp_step_N`` non-recursively while it
exists (so its marker is seen); never a checkpoint tree. inotify watches, watchdog emitter threads
(one per watch) and polling cost are O(roots + in-flight saves), not O(files). The completion
marker arriving in a tmp dir (created, or renamed into place) makes its root's pass due at once;
other changes in a root are debounced; anything else in a tmp dir is a save being written (no
hint, once ``set_roots`` is told the root's marker name).

watchdog 7.1, as read in its installed source:

* Handlers run in an observer's dispatcher thread *holding the observer's lock*: ours takes no
  lock of ours, it triggers the debouncer and posts watch changes to our worker thread.
* On a running observer ``schedule()`` adds the inotify watch, or takes the first snapshot, before
  it returns: ENOENT/ENOSPC raise there, and a look right after it misses nothing.
  ``event_filter`` sets the inotify mask (IN_DELETE_SELF always on): no opens, reads, writes.
* A watched dir deleted, or gone at a poll: the emitter queues ``DirDeletedEvent(dir)`` and ends
  its thread (poll errors such as ESTALE are logged by watchdog and retried). A renamed dir
  (IN_MOVE_SELF) emits nothing and the inotify watch follows the inode: hence the
  (st_dev, st_ino) and emitter-liveness checks.
* A poll is ``DirectorySnapshot(path, recursive=False, stat=, listdir=)``: ``stat(path)``, then a
  ``stat`` of each name ``listdir`` gives (only ``entry.name`` is read; a failed stat skips it).
  For a polled tmp dir ours gives only the marker's name: two stats per poll whatever the save
  holds (a full snapshot of 20,000 files took 100 ms here; on NFS it is a GETATTR per file).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import cast

from watchdog import events as ev
from watchdog.observers.api import BaseObserver, EventEmitter, ObservedWatch
from watchdog.observers.polling import PollingObserverVFS

from ckptkeeper.names import Kind, parse_name
from ckptkeeperd.fstype import filesystem_type, is_network_fs
from ckptkeeperd.hints import (
    DEFAULT_MARKER,
    EDIT_EVENT,
    ROOT_EVENTS,
    TMP_EVENTS,
    Debouncer,
    Hint,
    event_hint,
)

__all__ = ["OBSERVER_SETTINGS", "RootWatcher", "resolve_observer"]

OBSERVER_SETTINGS = ("auto", "inotify", "polling")
_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})
_logger = logging.getLogger(__name__)  # stdlib, only for exceptions raised by callbacks


def _inotify_observer_class() -> Callable[[], BaseObserver] | None:
    try:
        from watchdog.observers.inotify import InotifyObserver
    except Exception:  # ImportError off Linux; UnsupportedLibcError (an Exception) without inotify
        return None
    return InotifyObserver


_FSTYPES: dict[tuple[Path, int], str] = {}  # (root, st_dev) -> fstype; bounded by clearing


def _filesystem_type(root: Path) -> str:
    """Mountinfo is parsed once per (root, st_dev): a mount on a root changes its st_dev."""
    try:
        key = (root, os.stat(root).st_dev)
    except OSError:
        return filesystem_type(root)  # no directory to key on yet: not cached
    if key not in _FSTYPES:
        if len(_FSTYPES) >= 4096:  # discovered roots come and go
            _FSTYPES.clear()
        _FSTYPES[key] = filesystem_type(root)
    return _FSTYPES[key]


def resolve_observer(root: Path, setting: str) -> str:
    """``auto``/``inotify``/``polling`` -> ``inotify`` or ``polling`` for ``root``.

    ``auto`` polls roots on network, cluster and FUSE filesystems (inotify does not see what other
    hosts do there), and also when the filesystem cannot be determined. Cheap to call again for a
    known root: one ``stat``; mountinfo is only read for a new (root, st_dev).
    """
    if setting not in OBSERVER_SETTINGS:
        raise ValueError(f"observer must be one of {', '.join(OBSERVER_SETTINGS)}, not {setting!r}")
    if setting == "polling" or _inotify_observer_class() is None:
        return "polling"
    if setting == "inotify":
        return "inotify"
    try:
        fstype = _filesystem_type(root)
    except (OSError, LookupError):
        return "polling"
    return "polling" if is_network_fs(fstype) else "inotify"


def _probe(path: Path) -> tuple[tuple[int, int] | None, str]:
    """(st_dev, st_ino) of a real directory (never through a symlink), or None and why not."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, "missing (not watched until it appears)"
    except OSError as exc:
        return None, f"cannot stat: {exc.strerror or exc}"
    if stat.S_ISDIR(st.st_mode):
        return (st.st_dev, st.st_ino), ""
    if stat.S_ISLNK(st.st_mode):
        return None, "is a symlink (never followed; not watched)"
    return None, "not a directory (not watched)"


@dataclass
class _Watch:
    observer: BaseObserver
    watch: ObservedWatch
    emitter: EventEmitter | None
    identity: tuple[int, int]
    kind: str

    def current(self, identity: tuple[int, int] | None) -> bool:
        """Still watching the directory that has this identity now? The inode number alone is
        not enough: ext4 and tmpfs hand a freed one to the next mkdir, so a root deleted and
        recreated often keeps (st_dev, st_ino); its old watch is dead, and so is its emitter."""
        alive = self.emitter is not None and self.emitter.is_alive()
        return alive and identity == self.identity


@dataclass
class _Root:
    requested: str
    main: _Watch
    tmp: dict[Path, _Watch] = field(default_factory=dict)


class _Handler(ev.FileSystemEventHandler):
    """Runs in an observer's dispatcher thread (observer lock held): no locks of ours here."""

    def __init__(self, owner: RootWatcher, root: Path, watched: Path) -> None:
        self._owner = owner
        self._root = root
        self._watched = watched

    def dispatch(self, event: ev.FileSystemEvent) -> None:
        self._owner._on_event(self._root, self._watched, event)


class RootWatcher:
    """Keeps watchdog watches on roots and their in-flight tmp dirs; calls ``on_change(root)``
    (from one thread) when something may have changed there: at once for a completion marker,
    debounced for anything else."""

    def __init__(
        self,
        on_change: Callable[[Path], None],
        *,
        debounce: float = 0.15,
        polling_interval: float = 1.0,
        on_problem: Callable[[Path, str], None] | None = None,
    ) -> None:
        self._on_change = on_change
        self._on_problem = on_problem
        self._polling_interval = polling_interval
        self._debouncer = Debouncer(self._fire, delay=debounce, max_delay=max(1.0, debounce))
        self._lock = threading.RLock()
        self._roots: dict[Path, _Root] = {}
        self._observers: dict[str, BaseObserver] = {}
        self._reported: dict[Path, str] = {}  # root -> last reported problem (reported once)
        # Read without our lock by handlers and polling emitters (a dict get is atomic).
        self._markers: dict[Path, str | None] = {}  # root -> its marker's name, None: not told
        self._polled_tmp: dict[str, Path] = {}  # polled tmp dir -> its root: probe the marker
        self._problems: list[tuple[Path, str]] = []  # to deliver once the lock is released
        self._stopped = False
        self._jobs: queue.SimpleQueue[tuple[Path, Callable[[], None]] | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._work, name="ckptkeeper-watch", daemon=True)
        self._worker.start()

    # -- public interface -------------------------------------------------------------------

    def set_roots(
        self, roots: Mapping[Path, str], markers: Mapping[Path, str] | None = None
    ) -> None:
        """Watch exactly these roots (root -> resolved ``inotify``/``polling``); never raises.

        ``markers``: root -> its completion marker's name (default ``.complete``). Without it a
        root may use another name: any new file in its tmp dirs is a (debounced) hint, and polls
        of its tmp dirs list every file."""
        with self._lock:
            if self._stopped:
                return
            for root in [r for r in self._roots if r not in roots]:
                self._drop_root(root)
            for root in [r for r in self._reported if r not in roots]:
                del self._reported[root]
            for root in [r for r in self._markers if r not in roots]:
                del self._markers[root]
            names: Mapping[Path, str | None] = dict.fromkeys(roots) if markers is None else markers
            self._markers.update({r: names.get(r, DEFAULT_MARKER) for r in roots})
            for root, kind in roots.items():
                try:
                    self._sync_root(root, kind)
                except Exception as exc:  # one bad root must not stop the others
                    self._drop_root(root)
                    self._report(root, f"cannot watch: {exc!r}")
        self._deliver_problems()

    def set_in_flight(self, root: Path, tmp_dirs: Iterable[Path]) -> None:
        """Watch exactly these ``tmp_step_N`` dirs of ``root``; no-op if ``root`` is not watched."""
        wanted = {Path(p) for p in tmp_dirs}
        for p in wanted:
            if p.parent != root:
                raise ValueError(f"{p} is not directly inside root {root}")
        with self._lock:
            state = self._roots.get(root)
            if self._stopped or state is None:
                return
            for tmp in [t for t in state.tmp if t not in wanted]:
                self._unschedule(state.tmp.pop(tmp))
            for tmp in sorted(wanted):
                self._sync_tmp(root, state, tmp)
        self._deliver_problems()

    def watch_count(self) -> int:
        with self._lock:
            return sum(1 + len(state.tmp) for state in self._roots.values())

    def stop(self) -> None:
        """Stop observers, worker and debouncer; join all their threads."""
        with self._lock:
            already, self._stopped = self._stopped, True
            observers = list(self._observers.values())
            self._observers.clear()
            self._roots.clear()
            self._polled_tmp.clear()
        if already:
            return
        self._jobs.put(None)
        if threading.current_thread() is not self._worker:  # e.g. stop() from on_problem
            self._worker.join()
        for observer in observers:
            observer.stop()  # unschedules (joins) every emitter, closes the inotify fd
        for observer in observers:
            observer.join()
        self._debouncer.stop()

    # -- watch bookkeeping (callers hold self._lock) ----------------------------------------

    def _sync_root(self, root: Path, kind: str, *, force: bool = False) -> None:
        if kind not in ("inotify", "polling"):
            self._drop_root(root)
            self._report(root, f"unknown observer kind {kind!r}")
            return
        identity, why_not = _probe(root)
        state = self._roots.get(root)
        if identity is None:
            self._drop_root(root)
            self._report(root, why_not)
            return
        if not force and state and state.main.current(identity) and state.requested == kind:
            self._reported.pop(root, None)
            return
        replaced = state is not None
        self._drop_root(root)
        self._reported.pop(root, None)
        try:
            main = self._schedule(root, root, kind, identity)
        except OSError as exc:
            gone = exc.errno in _GONE  # went between lstat and schedule
            self._report(root, _probe(root)[1] if gone else f"cannot watch: {exc.strerror}")
            return
        self._roots[root] = _Root(kind, main)
        if replaced:  # events between the old dir going and this watch were lost
            self._debouncer.trigger(root)

    def _sync_tmp(self, root: Path, state: _Root, tmp: Path, *, force: bool = False) -> None:
        identity, _ = _probe(tmp)
        current = state.tmp.get(tmp)
        if not force and current is not None and current.current(identity):
            return
        if current is not None:
            self._unschedule(state.tmp.pop(tmp))
        if identity is None:
            return  # finalized, collected, or never a real directory
        try:
            state.tmp[tmp] = self._schedule(root, tmp, state.main.kind, identity)
        except OSError as exc:
            if exc.errno not in _GONE:
                self._report(root, f"cannot watch {tmp.name}: {exc.strerror or exc}")
            return
        # What happened before this watch was not seen: look once, at once if the marker is there.
        marker = tmp / (self._markers.get(root) or DEFAULT_MARKER)
        self._debouncer.trigger(root, now=os.path.lexists(marker))

    def _drop_root(self, root: Path) -> None:
        state = self._roots.pop(root, None)
        if state is not None:
            for watch in [state.main, *state.tmp.values()]:
                self._unschedule(watch)

    def _schedule(self, root: Path, path: Path, kind: str, identity: tuple[int, int]) -> _Watch:
        if kind == "inotify":
            try:
                return self._schedule_on("inotify", root, path, identity)
            except OSError as exc:
                if exc.errno in _GONE:
                    raise
                self._report(root, f"inotify unusable ({exc.strerror or exc}); polling instead")
        return self._schedule_on("polling", root, path, identity)

    def _schedule_on(self, kind: str, root: Path, path: Path, identity: tuple[int, int]) -> _Watch:
        observer = self._observer(kind)
        if kind == "polling" and path != root:  # before schedule(): it takes the first snapshot
            self._polled_tmp[os.fspath(path)] = root
        event_filter = [*ROOT_EVENTS, EDIT_EVENT[kind]] if path == root else TMP_EVENTS
        handler = _Handler(self, root, path)
        watch = observer.schedule(handler, os.fspath(path), event_filter=event_filter)
        # Emitters are only added or removed under our lock, so iterating them here is safe.
        emitter = next((e for e in observer.emitters if e.watch == watch), None)
        return _Watch(observer, watch, emitter, identity, kind)

    def _observer(self, kind: str) -> BaseObserver:
        observer = self._observers.get(kind)
        if observer is None:
            if kind == "inotify":
                cls = _inotify_observer_class()
                if cls is None:
                    raise OSError(errno.ENOSYS, "inotify is not available on this system")
                observer = cls()  # may raise OSError (EMFILE: inotify instance limit)
            else:  # lstat: never follow a symlink, even to look at it
                observer = PollingObserverVFS(
                    os.lstat, self._listdir, polling_interval=self._polling_interval
                )
            observer.name = f"ckptkeeper-{kind}-observer"
            observer.start()
            self._observers[kind] = observer
        return observer

    def _unschedule(self, watch: _Watch) -> None:
        with contextlib.suppress(KeyError):  # already gone with its observer
            watch.observer.unschedule(watch.watch)
        if watch.kind == "polling":
            self._polled_tmp.pop(watch.watch.path, None)

    def _listdir(self, path: str | None) -> Iterator[os.DirEntry[str]]:
        """``listdir`` of the polling emitters: a polled tmp dir lists only its marker's name
        (absent: its stat fails and the snapshot skips it), so a poll costs two stats."""
        root = None if path is None else self._polled_tmp.get(path)
        marker = None if root is None else self._markers.get(root)
        if marker is None:
            return os.scandir(path)
        return iter([cast("os.DirEntry[str]", SimpleNamespace(name=marker))])  # all it reads

    def _report(self, root: Path, reason: str) -> None:
        if self._reported.get(root) != reason:
            self._reported[root] = reason
            self._problems.append((root, reason))

    def _deliver_problems(self, *extra: tuple[Path, str]) -> None:
        with self._lock:
            problems, self._problems = [*self._problems, *extra], []
        on_problem = self._on_problem
        if on_problem is None:
            return
        for root, reason in problems:
            try:
                on_problem(root, reason)
            except Exception:
                _logger.exception("on_problem callback failed for %s", root)

    # -- event path -------------------------------------------------------------------------

    def _on_event(self, root: Path, watched: Path, event: ev.FileSystemEvent) -> None:
        hint = event_hint(root, watched, event, self._markers.get(root))
        if hint is not Hint.NONE:
            self._debouncer.trigger(root, now=hint is Hint.NOW)
        if not isinstance(event, ev.DirDeletedEvent | ev.DirMovedEvent | ev.DirCreatedEvent):
            return
        src = Path(os.fsdecode(event.src_path))
        if isinstance(event, ev.DirDeletedEvent) and src == watched:
            # The watched dir itself went: its watch is dead even if the path exists again, maybe
            # with the same inode number, and even if the emitter thread has not ended yet.
            tmp = None if watched == root else watched
            self._post(root, lambda: self._job(root, tmp, force=True, only_if_watched=True))
            return
        if watched != root:
            return
        if isinstance(event, ev.DirDeletedEvent | ev.DirMovedEvent) and src.parent == root:
            self._post(root, lambda: self._job(root, src, force=False, only_if_watched=True))
        new = Path(os.fsdecode(event.dest_path)) if isinstance(event, ev.DirMovedEvent) else src
        parsed = parse_name(new.name)
        is_tmp = parsed is not None and parsed.kind is Kind.TMP and new.parent == root
        if isinstance(event, ev.DirCreatedEvent | ev.DirMovedEvent) and is_tmp:
            self._post(root, lambda: self._job(root, new, force=False, only_if_watched=False))

    def _post(self, root: Path, job: Callable[[], None]) -> None:
        """Run ``job`` on the worker thread, which may take our lock and the observers'."""
        self._jobs.put((root, job))

    def _work(self) -> None:
        while (item := self._jobs.get()) is not None:
            root, job = item
            with self._lock:
                if self._stopped:
                    continue
                try:
                    job()
                except Exception as exc:  # keep the worker alive; report what went wrong
                    self._problems.append((root, f"watch update failed: {exc!r}"))
            self._deliver_problems()

    def _job(self, root: Path, tmp: Path | None, *, force: bool, only_if_watched: bool) -> None:
        state = self._roots.get(root)
        if state is None:
            return
        if tmp is None:
            self._sync_root(root, state.requested, force=force)
        elif tmp in state.tmp or not only_if_watched:
            self._sync_tmp(root, state, tmp, force=force)

    def _fire(self, root: Path) -> None:
        if self._stopped:
            return
        try:
            self._on_change(root)
        except Exception as exc:
            if self._on_problem is None:
                raise
            self._deliver_problems((root, f"on_change failed: {exc!r}"))
