"""Filesystem watches on checkpoint roots: events are hints that enqueue a reconcile of a root.

Watched: each root non-recursively, plus each in-flight ``tmp_step_N`` non-recursively while it
exists (so its marker is seen); never a checkpoint tree. The completion marker arriving in a tmp
dir (created, or renamed into place) makes its root's pass due at once; other changes in a root
are debounced; anything else in a tmp dir is a save being written (no hint, once ``set_roots``
is told the root's marker name). A new tmp dir watch makes the pass due at once if the marker is
there already (what happened before the watch was not seen), soon if its name is not known.

Threads do not grow with roots or saves: one inotify fd and its reader thread
(`ckptkeeperd.inotify`), one poller thread (`ckptkeeperd.poller`), one worker updating watches,
one debouncer. Kernel watches: one per root and per in-flight save, up to ``max_tmp_watches`` of
those; past it saves are polled (one ``lstat`` of the marker per poll), as is any directory that
inotify refuses for want of watches (ENOSPC: ``fs.inotify.max_user_watches``); each logged once.
A watched dir deleted (IN_DELETE_SELF, IN_IGNORED), a root renamed (IN_MOVE_SELF), a polled dir
gone or replaced: its watch is dead and the worker re-syncs it; an inode number alone does not
tell a live watch (ext4 and tmpfs reuse it at once). IN_Q_OVERFLOW (events lost): every root
gets a pass, and each pass re-syncs its tmp watches (``set_in_flight``).

A root watched by inotify also keeps a journal of the names created in it (`journal`):
``journals`` is the cache's `ckptkeeper.info.Journal`, so a marker's pass names its step's
entries without listing the root.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path

from watchdog import events as ev

from ckptkeeper.names import Kind, parse_name
from ckptkeeperd.config import RUN_FILE
from ckptkeeperd.fstype import OBSERVER_SETTINGS, resolve_observer
from ckptkeeperd.hints import (
    DEFAULT_MARKER,
    ROOT_MASK,
    TMP_MASK,
    Debouncer,
    Hint,
    event_hint,
    from_inotify,
)
from ckptkeeperd.inotify import InotifyReader, Watch
from ckptkeeperd.journal import Journals, RootJournal
from ckptkeeperd.logs import get_logger
from ckptkeeperd.poller import DirPoller, Polled
from ckptkeeperd.watched import Watched, WatchedRoot, probe

__all__ = ["DEFAULT_MAX_TMP_WATCHES", "OBSERVER_SETTINGS", "RootWatcher", "resolve_observer"]

DEFAULT_MAX_TMP_WATCHES = 8192  # a watch pins ~1 KiB of kernel memory; a poll costs CPU
_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})
_logger = logging.getLogger(__name__)  # stdlib, only for exceptions raised by callbacks


class RootWatcher:
    """Keeps watches on roots and their in-flight tmp dirs; calls ``on_change(root)`` (from one
    thread) when something may have changed there: at once for a completion marker, debounced
    for anything else. With ``on_marker``, a marker arriving in a tmp dir calls
    ``on_marker(root, tmp)`` at once instead (from the thread that saw it: it must not block),
    and ``on_change(root)`` follows debounced. ``max_tmp_watches``: in-flight saves watched by
    inotify at most (beyond it they are polled every ``polling_interval`` seconds)."""

    def __init__(
        self,
        on_change: Callable[[Path], None],
        *,
        debounce: float = 0.15,
        polling_interval: float = 1.0,
        on_problem: Callable[[Path, str], None] | None = None,
        max_tmp_watches: int = DEFAULT_MAX_TMP_WATCHES,
        on_marker: Callable[[Path, Path], None] | None = None,
    ) -> None:
        if max_tmp_watches < 0:
            raise ValueError(f"max_tmp_watches must be >= 0, got {max_tmp_watches}")
        self._on_change = on_change
        self._on_marker = on_marker
        self._on_problem = on_problem
        self._polling_interval = polling_interval
        self._max_tmp_watches = max_tmp_watches
        self._debouncer = Debouncer(self._fire, delay=debounce, max_delay=max(1.0, debounce))
        self._lock = threading.RLock()
        self._roots: dict[Path, WatchedRoot] = {}
        self._inotify: InotifyReader | None = None
        self._poller: DirPoller | None = None
        self._tmp_inotify = 0  # tmp dirs watched by inotify now
        self._noticed: set[str] = set()  # process-wide notices already logged
        self._reported: dict[Path, str] = {}  # root -> last reported problem (reported once)
        self.journals = Journals()  # the cache's `ckptkeeper.info.Journal` (``journal``)
        # Read without our lock by the inotify and poller threads (attribute and dict reads).
        self._markers: dict[Path, str | None] = {}  # root -> its marker's name, None: not told
        self._commit: dict[Path, frozenset[str]] = {}  # root -> its layout's commit files
        self._wanted: tuple[Path, ...] = ()  # roots of the last set_roots
        self._problems: list[tuple[Path, str]] = []  # to deliver once the lock is released
        self._stopped = False
        self._closing = False  # set by stop() before it takes the lock
        self._jobs: queue.SimpleQueue[tuple[Path, Callable[[], None]] | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._work, name="ckptkeeper-watch", daemon=True)
        self._worker.start()

    # -- public interface -------------------------------------------------------------------

    def set_roots(
        self,
        roots: Mapping[Path, str],
        markers: Mapping[Path, str] | None = None,
        commit_files: Mapping[Path, Iterable[str]] | None = None,
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
            commits = commit_files or {}
            self._commit = {r: frozenset(commits.get(r, ())) for r in roots}  # replaced whole
            self._wanted = tuple(roots)
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
                # A save created after the pass listed the root is not in ``tmp_dirs``: its
                # watch stays while the directory it watches is still there.
                if not state.tmp[tmp].current(probe(tmp)[0]):
                    self._unschedule(state.tmp.pop(tmp))
            for tmp in sorted(wanted):
                if self._closing:  # stop() waits for this lock: let it have it now
                    break
                self._sync_tmp(root, state, tmp)
        self._deliver_problems()

    def watch_count(self) -> int:
        with self._lock:
            return sum(1 + len(state.tmp) for state in self._roots.values())

    def stop(self) -> None:
        """Stop the inotify reader, the poller, the worker and the debouncer; join their threads."""
        self._closing = True
        with self._lock:
            already, self._stopped = self._stopped, True
            sources = [s for s in (self._inotify, self._poller) if s is not None]
            self._inotify = self._poller = None
            self._roots.clear()
            self.journals.end_all()
            self._tmp_inotify = 0
        if already:
            return
        self._jobs.put(None)
        if threading.current_thread() is not self._worker:  # e.g. stop() from on_problem
            self._worker.join()
        for source in sources:
            source.stop()  # the reader's fd closes: the kernel drops every watch at once
        self._debouncer.stop()

    # -- watch bookkeeping (callers hold self._lock) ----------------------------------------

    def _sync_root(self, root: Path, kind: str, *, force: bool = False) -> None:
        if kind not in ("inotify", "polling"):
            self._drop_root(root)
            self._report(root, f"unknown observer kind {kind!r}")
            return
        identity, why_not = probe(root)
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
            gone = exc.errno in _GONE  # went between lstat and the watch
            self._report(root, probe(root)[1] if gone else f"cannot watch: {exc.strerror}")
            return
        self._roots[root] = WatchedRoot(kind, main)
        if replaced:  # events between the old dir going and this watch were lost
            self._debouncer.trigger(root)

    def _sync_tmp(self, root: Path, state: WatchedRoot, tmp: Path, *, force: bool = False) -> None:
        identity, _ = probe(tmp)
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
        # What happened before this watch was not seen, and in a tmp dir only the marker matters:
        # there already, a pass at once; its name not known (any new file may be it), a pass soon.
        name = self._markers.get(root)
        if os.path.lexists(tmp / (name or DEFAULT_MARKER)):
            self._marked(root, tmp)
        elif name is None:
            self._debouncer.trigger(root)

    def _drop_root(self, root: Path) -> None:
        self.journals.end(str(root))
        state = self._roots.pop(root, None)
        if state is not None:
            for watch in [state.main, *state.tmp.values()]:
                self._unschedule(watch)

    def _schedule(self, root: Path, path: Path, kind: str, identity: tuple[int, int]) -> Watched:
        """An inotify watch if ``kind`` says so and one can be had, else a polled one."""
        tmp = path != root
        if kind == "inotify" and tmp and self._tmp_inotify >= self._max_tmp_watches:
            limit, interval = self._max_tmp_watches, self._polling_interval
            self._notice("limit", "watch_limit_reached", max_tmp_watches=limit, interval=interval)
        elif kind == "inotify":
            try:
                return self._add_inotify(root, path, identity)
            except OSError as exc:
                if exc.errno in _GONE:
                    raise
                if exc.errno != errno.ENOSPC:
                    self._report(root, f"inotify unusable ({exc.strerror or exc}); polling instead")
                else:  # fs.inotify.max_user_watches, shared by every process of our uid
                    self._notice("enospc", "inotify_watches_exhausted", path=str(path))
        return self._add_polled(root, path, identity)

    def _add_inotify(self, root: Path, path: Path, identity: tuple[int, int]) -> Watched:
        if self._inotify is None:  # OSError: EMFILE (fs.inotify.max_user_instances)
            self._inotify = InotifyReader(self._on_overflow, name="ckptkeeper-inotify")
        tmp = path != root
        journal = None if tmp else RootJournal(identity, self._inotify.barrier)
        callback = partial(self._on_inotify, root, path, journal)
        handle = self._inotify.add(os.fspath(path), TMP_MASK if tmp else ROOT_MASK, callback)
        self._tmp_inotify += tmp
        if journal is not None:
            self.journals.start(str(root), journal)
        return Watched(handle, identity, counted=tmp, journal=journal)

    def _add_polled(self, root: Path, path: Path, identity: tuple[int, int]) -> Watched:
        if self._poller is None:
            self._poller = DirPoller(self._polling_interval, name="ckptkeeper-poller")
        callback = partial(self._on_polled, root, path)
        if path == root:  # every entry, and the run's policy file's mtime and size
            handle = self._poller.add(os.fspath(path), callback, stamp=frozenset({RUN_FILE}))
        else:  # only the marker, if the root's marker name is known: two lstat per poll
            only = partial(self._markers.get, root)
            handle = self._poller.add(os.fspath(path), callback, only=only)
        return Watched(handle, identity)

    def _unschedule(self, watch: Watched) -> None:
        if watch.journal is not None:
            watch.journal.end()
        if isinstance(watch.handle, Watch):
            if self._inotify is not None:
                self._inotify.remove(watch.handle)
            self._tmp_inotify -= watch.counted
            watch.counted = False
        elif self._poller is not None:
            self._poller.remove(watch.handle)

    def _notice(self, key: str, event: str, **fields: object) -> None:
        """Log a process-wide condition once (not once per directory it concerns)."""
        if key not in self._noticed:
            self._noticed.add(key)
            get_logger().warning(event, fallback="polling", **fields)

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

    # -- event path: inotify reader and poller threads, no lock of ours -----------------------

    def _on_inotify(
        self,
        root: Path,
        watched: Path,
        journal: RootJournal | None,
        watch: Watch,
        mask: int,
        name: str,
    ) -> None:
        if journal is not None:  # the root's watch: before anything acts on the event
            journal.saw(mask, name)
        event = from_inotify(watched, mask, name)
        if event is not None:
            self._on_event(root, watched, watch, event)

    def _on_polled(
        self, root: Path, watched: Path, polled: Polled, found: list[ev.FileSystemEvent]
    ) -> None:
        for event in found:
            self._on_event(root, watched, polled, event)

    def _on_overflow(self) -> None:
        roots = self._wanted
        self.journals.restart_all()  # what was created meanwhile is not known
        get_logger().warning("inotify_overflow", roots=len(roots), reason="events lost")
        for root in roots:  # a pass of every root
            self._debouncer.trigger(root)

    def _on_event(
        self, root: Path, watched: Path, handle: Watch | Polled, event: ev.FileSystemEvent
    ) -> None:
        commit = self._commit.get(root, frozenset())
        hint = event_hint(root, watched, event, self._markers.get(root), commit)
        if hint is Hint.NOW and watched != root:
            self._marked(root, watched)
        elif hint is not Hint.NONE:
            self._debouncer.trigger(root, now=hint is Hint.NOW)
        if not isinstance(event, ev.DirDeletedEvent | ev.DirCreatedEvent):
            return
        src = Path(os.fsdecode(event.src_path))
        if isinstance(event, ev.DirDeletedEvent) and src == watched:
            # The watched dir itself went: its watch is dead even if the path exists again, maybe
            # with the same inode number.
            tmp = None if watched == root else watched
            self._post(root, partial(self._rewatch, root, tmp, handle))
        elif watched == root and src.parent == root:
            parsed = parse_name(src.name)
            if isinstance(event, ev.DirDeletedEvent):  # deleted or renamed away: drop its watch
                self._post(root, partial(self._sync_entry, root, src, only_if_watched=True))
            elif parsed is not None and parsed.kind is Kind.TMP:  # a new save: watch it now
                self._post(root, partial(self._sync_entry, root, src, only_if_watched=False))

    def _marked(self, root: Path, tmp: Path) -> None:
        """The marker is in ``tmp``: that save now (``on_marker``), then a full pass debounced;
        without ``on_marker``, a pass of the root at once."""
        on_marker = self._on_marker
        if on_marker is None or self._stopped:
            self._debouncer.trigger(root, now=True)
            return
        try:
            on_marker(root, tmp)
        except Exception:
            _logger.exception("on_marker callback failed for %s", tmp)
            self._debouncer.trigger(root, now=True)
            return
        self._debouncer.trigger(root)

    def _post(self, root: Path, job: Callable[[], None]) -> None:
        """Run ``job`` on the worker thread, which may take our lock."""
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

    def _rewatch(self, root: Path, tmp: Path | None, dead: Watch | Polled) -> None:
        """Replace the dead watch ``dead`` of ``root`` or its ``tmp``, unless it went already (an
        inotify watch reports its end twice: IN_DELETE_SELF, then IN_IGNORED)."""
        state = self._roots.get(root)
        current = None if state is None else state.main if tmp is None else state.tmp.get(tmp)
        if state is None or current is None or current.handle is not dead:
            return
        if tmp is None:
            self._sync_root(root, state.requested, force=True)
        else:
            self._sync_tmp(root, state, tmp, force=True)

    def _sync_entry(self, root: Path, tmp: Path, *, only_if_watched: bool) -> None:
        state = self._roots.get(root)
        if state is not None and (tmp in state.tmp or not only_if_watched):
            self._sync_tmp(root, state, tmp)

    def _fire(self, root: Path) -> None:
        if self._stopped:
            return
        try:
            self._on_change(root)
        except Exception as exc:
            if self._on_problem is None:
                raise
            self._deliver_problems((root, f"on_change failed: {exc!r}"))
