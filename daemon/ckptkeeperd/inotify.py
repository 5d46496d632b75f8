"""One inotify instance and one reader thread for any number of watched directories.

watchdog's InotifyObserver runs an emitter thread per watch: thousands of in-flight saves were
thousands of threads. Here the kernel interface comes from ``inotify_simple`` (``inotify_init1``
with ``IN_CLOEXEC``, ``inotify_add_watch``/``inotify_rm_watch`` raising ``OSError`` with the
errno, and the parsing of ``struct inotify_event``); this module adds what the daemon needs:

* one thread, blocked in poll(2) on the inotify fd and a wake pipe, reads every event;
* a table wd -> subscriptions: O(1) per event, per add and per remove. Two paths to one inode
  get the same wd from the kernel, so a wd may hold several subscriptions, each with its own
  mask; the kernel's mask is their union (``IN_MASK_ADD``) and each hears only its own events;
* ``IN_IGNORED`` (the kernel dropped the watch: directory deleted, filesystem unmounted): the
  wd's subscriptions end (``alive`` turns false) and each hears that event last;
* ``IN_Q_OVERFLOW`` (wd -1; the kernel's queue was full and events were lost): ``on_overflow()``;
* ``add()`` raises ``OSError`` with its errno: ENOSPC (``fs.inotify.max_user_watches``),
  ENOENT, ENOTDIR (``IN_ONLYDIR``), ELOOP (a symlink: ``IN_DONT_FOLLOW``), EACCES.

Callbacks run in the reader thread with no lock of ours held, in the kernel's order; an
exception in one is logged and the thread goes on. ``barrier()`` waits until every event queued
before it was handed to its callbacks (the journal of a root, `ckptkeeperd.watch`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import struct
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from inotify_simple import INotify

__all__ = [
    "IN_CLOSE_WRITE",
    "IN_CREATE",
    "IN_DELETE",
    "IN_DELETE_SELF",
    "IN_IGNORED",
    "IN_ISDIR",
    "IN_MOVED_FROM",
    "IN_MOVED_TO",
    "IN_MOVE_SELF",
    "IN_Q_OVERFLOW",
    "IN_UNMOUNT",
    "InotifyReader",
    "Watch",
]

# <sys/inotify.h>
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_MASK_ADD = 0x20000000
IN_ISDIR = 0x40000000
_ALWAYS = IN_IGNORED | IN_UNMOUNT  # sent whatever the mask

_logger = logging.getLogger(__name__)  # stdlib, only for exceptions raised by callbacks

Callback = Callable[["Watch", int, str], None]  # (watch, mask, name: "" for the dir itself)


@dataclass(eq=False)
class Watch:
    """One subscription: ``path`` (as added) and the events of ``mask`` on it."""

    path: str
    wd: int
    mask: int
    callback: Callback = field(repr=False)
    alive: bool = True  # false once removed, or once the kernel dropped the watch


class InotifyReader:
    """One inotify fd and one thread serving every ``add()``-ed directory. Thread-safe."""

    def __init__(
        self, on_overflow: Callable[[], None], *, name: str = "ckptkeeper-inotify"
    ) -> None:
        self._on_overflow = on_overflow
        self._ino = INotify()  # OSError: EMFILE (fs.inotify.max_user_instances), ENOSYS
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._lock = threading.Lock()
        self._by_wd: dict[int, list[Watch]] = {}
        self._stopping = False
        self._served = threading.Condition()  # barriers: asked (written a byte), served (read)
        self._asked = self._done = 0
        self._in_batch = False  # between a read of the fd and the end of its dispatch
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, path: str, mask: int, callback: Callback) -> Watch:
        """Watch the directory ``path`` (never through a symlink) for ``mask``; raises OSError."""
        flags = mask | IN_ONLYDIR | IN_DONT_FOLLOW | IN_MASK_ADD
        with self._lock:
            if self._stopping:
                raise OSError(errno.EBADF, "inotify reader stopped")
            wd = int(self._ino.add_watch(path, flags))
            watch = Watch(path, wd, mask, callback)
            self._by_wd.setdefault(wd, []).append(watch)
        return watch

    def remove(self, watch: Watch) -> None:
        """End ``watch``; the kernel's watch goes with the last subscription on its wd."""
        with self._lock:
            watch.alive = False
            subs = self._by_wd.get(watch.wd)
            if subs is None or watch not in subs:
                return  # already ended (IN_IGNORED, or removed twice)
            subs.remove(watch)
            if subs:
                return
            del self._by_wd[watch.wd]
            if not self._stopping:
                with contextlib.suppress(OSError):  # EINVAL: the kernel dropped it already
                    self._ino.rm_watch(watch.wd)

    def watch_count(self) -> int:
        """Kernel watches held (wds), as /proc/self/fdinfo would list them."""
        with self._lock:
            return len(self._by_wd)

    def barrier(self, timeout: float) -> bool:
        """Wait until every event queued before this call has been handed to its callbacks.
        False after ``timeout`` s, once stopping, or when called from a callback (the reader
        thread cannot wait for itself)."""
        if threading.current_thread() is self._thread:
            return False
        deadline = time.monotonic() + timeout
        with self._served:
            if not self._in_batch and self._pending() == 0:
                return True  # nothing queued, nothing read and not yet handed over
            self._asked += 1
            ticket = self._asked
            with self._lock:
                if self._stopping:
                    return False
                with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
                    os.write(self._wake_w, b"b")
            while self._done < ticket:
                left = deadline - time.monotonic()
                if self._stopping or left <= 0:
                    return False
                self._served.wait(left)
        return True

    def _pending(self) -> int:
        """Bytes of events queued in the kernel (FIONREAD); -1 if that cannot be asked."""
        try:
            with self._lock:
                if self._stopping:
                    return -1
                raw = fcntl.ioctl(self._ino.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return -1
        return int(struct.unpack("i", raw)[0])

    def stop(self) -> None:
        """Stop and join the thread; it closes the fd (the kernel drops every watch with it)."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            for subs in self._by_wd.values():
                for watch in subs:
                    watch.alive = False
            self._by_wd.clear()
            os.write(self._wake_w, b"x")  # under the lock: the thread closes the pipe under it
        with self._served:
            self._served.notify_all()  # a barrier waiting returns False
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._ino.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopping:
            poller.poll()
            if self._stopping:
                break
            with self._served:  # the barriers whose byte was written before the read below
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
                asked = self._asked
                self._in_batch = True
            try:
                events = self._ino.read(timeout=0)
            except OSError:  # not expected of a live inotify fd: wait for stop(), do not spin
                _logger.exception("reading the inotify fd failed; no more inotify events")
                poller.unregister(self._ino.fileno())
                with self._served:
                    self._in_batch = False  # barriers now wait for their timeout: None
                continue
            self._dispatch([(int(e.wd), int(e.mask), str(e.name)) for e in events])
            with self._served:
                self._done = asked
                self._in_batch = False
                self._served.notify_all()
        with self._lock:  # stop() has written its wake-up: nothing else uses these fds now
            self._ino.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _dispatch(self, events: list[tuple[int, int, str]]) -> None:
        calls: list[tuple[Watch | None, int, str]] = []
        with self._lock:
            for wd, mask, name in events:
                if mask & IN_Q_OVERFLOW:
                    calls.append((None, mask, name))
                    continue
                subs = self._by_wd.get(wd, [])
                if mask & IN_IGNORED and subs:
                    del self._by_wd[wd]
                    for sub in subs:
                        sub.alive = False
                calls.extend((w, mask, name) for w in subs if mask & (w.mask | _ALWAYS))
        for target, mask, name in calls:
            try:
                if target is None:
                    self._on_overflow()
                else:
                    target.callback(target, mask, name)
            except Exception:
                _logger.exception("inotify callback failed")
