"""Removal of a directory tree that never follows a symlink nor crosses into another mounted
filesystem, with parallel workers for trees on filesystems with per-operation latency. Every
unlink and rmdir goes through `effects.Fs`, so tests inject faults exactly as for the other
effects."""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .dirfd import DIR_FLAGS, mount_points_below
from .effects import OS_FS, Fs
from .errors import errno_text

__all__ = ["MOUNTED", "Removal", "remove_tree"]

MOUNTED = "a filesystem is mounted here: not entered (the rest is removed once it is unmounted)"


@dataclass
class Removal:
    """What a `remove_tree` did: counts, bytes, and what it could not remove (with why)."""

    files: int = 0
    dirs: int = 0
    bytes: int = 0
    left: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, files: int = 0, dirs: int = 0, size: int = 0) -> None:
        with self._lock:
            self.files += files
            self.dirs += dirs
            self.bytes += size

    def leave(self, path: str, reason: str) -> None:
        with self._lock:
            self.left.append((path, reason))


def _retry_busy(op: Callable[[], None], retries: int, first: OSError) -> None:
    """``op`` just failed with ``first``: if that is EBUSY (NFS ``.nfs*`` silly-rename files, a
    mount point), run it again up to ``retries`` times with a growing pause. Raises the last
    error when it never succeeds."""
    exc, delay = first, 0.02
    for _ in range(retries):
        if exc.errno != errno.EBUSY:
            break
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
        try:
            op()
            return
        except OSError as again:
            exc = again
    raise exc


class _Node:
    """A directory of the tree: open (``fd``) from its visit until its last child is done;
    ``pending`` counts its own visit plus its unfinished subdirectories. ``held``: a mount point
    is at or below it, so it is not removed (its rmdir could only fail)."""

    __slots__ = ("fd", "held", "name", "parent", "parent_fd", "path", "pending")

    def __init__(self, parent: _Node | None, parent_fd: int, name: str, path: str) -> None:
        self.parent = parent
        self.parent_fd = parent_fd
        self.name = name
        self.path = path
        self.fd = -1
        self.pending = 1
        self.held = False


_GROW_EVERY_S = 0.05  # how often remove_tree checks whether more threads would help


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Pacing:
    """When `remove_tree` adds threads: it starts with one per core (``cores``; None: the CPUs
    this process may run on) and adds more while each takes longer than ``slow_op_s`` per entry
    (the threads are then waiting for a server, not working)."""

    cores: int | None = None
    slow_op_s: float = 100e-6

    def start(self) -> int:
        return self.cores if self.cores is not None else _cores()


class _Remover:
    """One `remove_tree` run.

    A directory is one task: the worker that takes it opens it (relative to its parent's
    descriptor, ``O_NOFOLLOW``), unlinks its files in one loop with the counts kept locally, and
    pushes its subdirectories; whoever finishes a directory's last child removes the directory.
    Tasks sit on a stack (depth-first), so the descriptors held open stay near workers x depth
    however wide the tree is. Every task reports completion exactly once, whatever fails, so the
    run always ends.

    A directory on another device or listed in the mount table, or a file mounted over, is
    `hold`: left with everything above it."""

    def __init__(
        self,
        result: Removal,
        fs: Fs,
        busy_retries: int,
        cancel: threading.Event | None,
        count_bytes: bool,
        pacing: Pacing,
    ) -> None:
        self.result = result
        self.pacing = pacing
        self.dev = -1  # the tree's device (-1: not compared)
        self.mounts: frozenset[str] = frozenset()  # mount points inside the tree, as shown
        self.fs = fs
        self.busy_retries = busy_retries
        self.cancel = cancel
        self.count_bytes = count_bytes
        self.cond = threading.Condition(threading.Lock())  # stack, finished, _Node.pending
        self.stack: list[_Node] = []
        self.finished = False
        self.finished_event = threading.Event()
        self.ops: list[int] = []  # entries handled, per worker (each writes only its own slot)
        self.interrupt: BaseException | None = None  # KeyboardInterrupt & co, re-raised at the end

    def stopped(self) -> bool:
        return self.interrupt is not None or (self.cancel is not None and self.cancel.is_set())

    # -- scheduling ------------------------------------------------------------------------------

    def run(self, root: _Node, workers: int) -> None:
        self.stack.append(root)
        if workers > 1:
            self.run_threads(workers)
        if not self.ops:
            self.ops.append(0)
        while self.stack:  # workers=1, or no thread could be started
            self.visit(self.stack.pop(), 0)
        if self.interrupt is not None:
            raise self.interrupt

    def run_threads(self, workers: int) -> None:
        """Start one thread per core, then double the threads (up to ``workers``) while
        directories are queued and each thread takes longer than ``pacing.slow_op_s`` per
        entry: it is then waiting for a server (NFS, Lustre, FUSE) or a disk, and more requests
        in flight help. Where an unlink is a few microseconds of kernel CPU (local disks),
        threads beyond the cores only queue for the CPUs and the GIL and slow removal down."""
        threads: list[threading.Thread] = []
        target = min(workers, self.pacing.start())
        try:
            wall, ops = time.perf_counter(), 0
            while True:
                while len(threads) < target:
                    if not self.start_worker(threads):
                        target = len(threads)  # no more threads to be had: go on with these
                if not threads:
                    break
                if self.finished_event.wait(_GROW_EVERY_S if target < workers else None):
                    break
                now, done = time.perf_counter(), sum(self.ops)
                per_op = len(threads) * (now - wall) / max(done - ops, 1)
                wall, ops = now, done
                if len(threads) < workers and self.stack and per_op > self.pacing.slow_op_s:
                    target = min(workers, 2 * len(threads))
        except BaseException as exc:  # e.g. Ctrl-C: the workers drain what is left, fast
            if self.interrupt is None:
                self.interrupt = exc
            if threads:
                self.finished_event.wait()
        for thread in threads:
            thread.join()

    def start_worker(self, threads: list[threading.Thread]) -> bool:
        slot = len(self.ops)
        self.ops.append(0)
        thread = threading.Thread(
            target=self.work, args=(slot,), name=f"ckptkeeper-rm-{slot}", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # can't start new thread
            return False
        threads.append(thread)
        return True

    def work(self, slot: int) -> None:
        cond, stack = self.cond, self.stack
        while True:
            with cond:
                while not stack:
                    if self.finished:
                        return
                    cond.wait()
                node = stack.pop()
            self.visit(node, slot)

    def push(self, node: _Node, names: list[str]) -> None:
        if not names:
            return
        children = [_Node(node, node.fd, name, f"{node.path}/{name}") for name in names]
        with self.cond:
            node.pending += len(children)
            self.stack.extend(children)
            self.cond.notify(len(children))

    def finish(self, node: _Node) -> None:
        """One of ``node``'s tasks is done; the last one closes and removes it, then goes up."""
        while True:
            with self.cond:
                node.pending -= 1
                if node.pending:
                    return
            if node.fd >= 0:
                os.close(node.fd)
                node.fd = -1
            if not node.held:
                self.rmdir(node)
            elif node.parent is not None:  # what is left keeps its parents (no rmdir to fail)
                node.parent.held = True
            if node.parent is None:
                self.done()
                return
            node = node.parent

    def finish_gone(self, node: _Node) -> None:
        """``node`` itself is gone (or was not a directory, or is kept): report upward without an
        rmdir."""
        if node.parent is None:
            self.done()
        else:
            if node.held:
                node.parent.held = True
            self.finish(node.parent)

    def done(self) -> None:
        with self.cond:
            self.finished = True
            self.cond.notify_all()
        self.finished_event.set()

    def failed(self, path: str, exc: BaseException) -> None:
        self.result.leave(path, f"internal error: {exc!r}")
        if not isinstance(exc, Exception) and self.interrupt is None:
            self.interrupt = exc  # stop, finish the bookkeeping, then re-raise it

    # -- one directory ---------------------------------------------------------------------------

    def visit(self, node: _Node, slot: int) -> None:
        """Open ``node``, unlink its files, push its subdirectories; always reports completion
        exactly once (finish or finish_gone), whatever goes wrong, so the run never hangs."""
        subdirs: list[str] = []
        opened = False
        try:
            if self.stopped():
                self.result.leave(node.path, "cancelled")
                return
            if node.path in self.mounts:
                self.hold(node)
                return
            try:
                node.fd = os.open(node.name, DIR_FLAGS, dir_fd=node.parent_fd)
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # swapped for a symlink or a file
                    self.unlink(node.parent_fd, node.name, node.path)
                else:
                    self.result.leave(node.path, errno_text(exc))
                return
            opened = True
            if self.dev >= 0 and os.fstat(node.fd).st_dev != self.dev:
                self.hold(node)  # another filesystem: not even listed
            else:
                self.clear(node, subdirs, slot)
        except BaseException as exc:  # a bug must not leave the caller waiting forever
            self.failed(node.path, exc)
            subdirs.clear()
        finally:
            if not opened:
                self.finish_gone(node)
            else:
                try:
                    self.push(node, subdirs)
                finally:
                    self.finish(node)

    def hold(self, node: _Node) -> None:
        """``node`` is a mount point: nothing at or above it is removed; reported once."""
        node.held = True
        self.result.leave(node.path, MOUNTED)

    def clear(self, node: _Node, subdirs: list[str], slot: int) -> None:
        """Unlink every non-directory in ``node`` and collect its subdirectories' names. The hot
        loop: one ``fs.unlink`` per file, counts added to the result once per directory."""
        fd = node.fd
        try:
            with os.scandir(fd) as it:
                # In inode order, as rm -rf's fts does for large directories: ext4 then reads and
                # journals its inode table in order (some 5 % less kernel time per file).
                entries = sorted(it, key=lambda entry: entry.inode())
        except OSError as exc:
            self.result.leave(node.path, errno_text(exc))
            return
        unlink, cancel, count_bytes, ops = self.fs.unlink, self.cancel, self.count_bytes, self.ops
        mounts = self.mounts
        files = size = 0
        try:
            for entry in entries:
                ops[slot] += 1
                if cancel is not None and cancel.is_set():
                    subdirs.clear()  # this directory is reported when its rmdir fails
                    return
                name = entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(name)
                        continue
                    if mounts and f"{node.path}/{name}" in mounts:  # a file mounted over
                        node.held = True
                        self.result.leave(f"{node.path}/{name}", MOUNTED)
                        continue
                    n = entry.stat(follow_symlinks=False).st_size if count_bytes else 0
                except OSError:
                    n = 0
                try:
                    unlink(name, dir_fd=fd)
                except OSError as exc:
                    if not self.unlink_failed(fd, name, f"{node.path}/{name}", exc):
                        continue
                files += 1
                size += n
        finally:
            self.result.add(files=files, size=size)

    def unlink(self, dir_fd: int, name: str, shown: str, size: int = 0) -> None:
        try:
            self.fs.unlink(name, dir_fd=dir_fd)
        except OSError as exc:
            if not self.unlink_failed(dir_fd, name, shown, exc):
                return
        self.result.add(files=1, size=size)

    def unlink_failed(self, dir_fd: int, name: str, shown: str, exc: OSError) -> bool:
        """The unlink of ``name`` raised ``exc``: True if a retry (EBUSY) removed it after all;
        otherwise False, and the entry is listed as left unless it is already gone."""
        if exc.errno == errno.EBUSY:
            try:
                _retry_busy(lambda: self.fs.unlink(name, dir_fd=dir_fd), self.busy_retries, exc)
                return True
            except OSError as again:
                exc = again
        if exc.errno != errno.ENOENT:  # already gone: someone else removed it, fine
            self.result.leave(shown, errno_text(exc))
        return False

    def rmdir(self, node: _Node) -> None:
        rmdir = self.fs.rmdir
        try:
            for attempt in range(2):
                try:
                    try:
                        rmdir(node.name, dir_fd=node.parent_fd)
                    except OSError as exc:
                        _retry_busy(
                            lambda: rmdir(node.name, dir_fd=node.parent_fd), self.busy_retries, exc
                        )
                    self.result.add(dirs=1)
                    return
                except FileNotFoundError:
                    return  # someone else removed it: fine
                except OSError as exc:
                    if exc.errno == errno.ENOTEMPTY and self.stopped():
                        self.result.leave(node.path, "cancelled")
                        return
                    if exc.errno != errno.ENOTEMPTY or attempt or not self.clear_nfs(node):
                        self.result.leave(node.path, errno_text(exc))
                        return
        except BaseException as exc:
            self.failed(node.path, exc)

    def clear_nfs(self, node: _Node) -> bool:
        """NFS renames a file still open elsewhere to ``.nfsXXXX``; it goes when closed. True if
        the directory held only such files and they were unlinked (or retried)."""
        try:
            fd = os.open(node.name, DIR_FLAGS, dir_fd=node.parent_fd)
        except OSError:
            return False
        try:
            names = [e.name for e in os.scandir(fd)]
            if not all(name.startswith(".nfs") for name in names):
                return False
            for name in names:
                self.unlink(fd, name, f"{node.path}/{name}")
        finally:
            os.close(fd)
        return True


def remove_tree(
    path: Path,
    *,
    workers: int = 8,
    fs: Fs = OS_FS,
    busy_retries: int = 5,
    cancel: threading.Event | None = None,
    parent_fd: int | None = None,
    count_bytes: bool = True,
    pacing: Pacing = Pacing(),
) -> Removal:
    """Remove ``path`` and everything below it without following symlinks.

    With ``parent_fd`` (an open descriptor of ``path``'s parent, left open) nothing above
    ``path`` is looked up by name again: a parent swapped for a symlink cannot redirect it.

    One directory is one task; ``workers`` bounds the threads. Removal starts with one thread
    per core and doubles them (up to ``workers``) while each takes more than
    ``pacing.slow_op_s`` per entry with directories queued: the threads are then waiting for a
    server's round trip (NFS, Lustre, FUSE), and requests in flight are what makes removal fast
    there. On a local disk an unlink is some microseconds of kernel CPU: threads beyond the
    cores would only queue for the CPUs and the GIL, so it stays at one per core. The files of
    one directory are unlinked by one thread: the kernel serialises unlinks within a directory
    anyway (it holds the directory's lock for the whole round trip).

    Never crosses into a mount (as ``rm --one-file-system``, and bind mounts of the same
    filesystem too): a mount point at or below ``path`` is left with the directories above it,
    listed once in `Removal.left` as `MOUNTED`; a later call removes the rest once unmounted.
    Costs one ``fstat`` per directory (``st_dev``) and one read of the mount table per call.

    Never raises for entries it cannot remove: they are listed in `Removal.left`. Setting
    ``cancel`` stops it early, between two files (what is left is listed; a later call finishes
    the job). ``count_bytes=False`` skips the ``lstat`` of each file (one more metadata round
    trip per file on a network filesystem; a glimpse of every stripe on Lustre):
    `Removal.bytes` then stays 0.
    """
    result = Removal()
    path = Path(path)
    try:
        parent_fd = os.open(path.parent, DIR_FLAGS) if parent_fd is None else os.dup(parent_fd)
    except OSError as exc:
        result.leave(str(path), errno_text(exc))
        return result
    remover = _Remover(result, fs, busy_retries, cancel, count_bytes, pacing)
    safe_to_close = True
    try:
        try:
            st = os.lstat(path.name, dir_fd=parent_fd)
        except FileNotFoundError:
            return result
        except OSError as exc:
            result.leave(str(path), errno_text(exc))
            return result
        if not stat.S_ISDIR(st.st_mode):
            remover.unlink(parent_fd, path.name, str(path), st.st_size if count_bytes else 0)
            return result
        shown = str(path)
        remover.dev = os.fstat(parent_fd).st_dev
        below = mount_points_below(parent_fd, path.name)
        remover.mounts = frozenset(f"{shown}/{rel}" if rel else shown for rel in below)
        safe_to_close = workers <= 1
        remover.run(_Node(None, parent_fd, path.name, shown), workers)
        safe_to_close = True
    finally:
        # Interrupted twice while workers still run: leave the descriptor to the process rather
        # than let a worker rmdir through a recycled descriptor number.
        if safe_to_close or remover.finished:
            os.close(parent_fd)
    return result
