"""The tree walk of `removal.remove_tree`: one task per directory on a depth-first stack, worked
by threads that grow while each waits on a server, never following a symlink nor entering
another mounted filesystem. Every unlink and rmdir goes through `effects.Fs`."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .dirfd import DIR_FLAGS
from .effects import Fs
from .errors import errno_text

if TYPE_CHECKING:
    from .removal import Pacing, Removal

__all__ = ["GROW_EVERY_S", "MOUNTED", "Node", "Remover", "retry_busy"]

MOUNTED = "a filesystem is mounted here: not entered (the rest is removed once it is unmounted)"


def retry_busy(op: Callable[[], None], retries: int, first: OSError) -> None:
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


class Node:
    """A directory of the tree: open (``fd``) from its visit until its last child is done;
    ``pending`` counts its own visit plus its unfinished subdirectories. ``held``: a mount point
    is at or below it, so it is not removed (its rmdir could only fail)."""

    __slots__ = ("fd", "held", "name", "parent", "parent_fd", "path", "pending")

    def __init__(self, parent: Node | None, parent_fd: int, name: str, path: str) -> None:
        self.parent = parent
        self.parent_fd = parent_fd
        self.name = name
        self.path = path
        self.fd = -1
        self.pending = 1
        self.held = False


GROW_EVERY_S = 0.05  # how often remove_tree checks whether more threads would help


class Remover:
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
        self.cond = threading.Condition(threading.Lock())  # stack, finished, Node.pending
        self.stack: list[Node] = []
        self.finished = False
        self.finished_event = threading.Event()
        self.ops: list[int] = []  # entries handled, per worker (each writes only its own slot)
        self.interrupt: BaseException | None = None  # KeyboardInterrupt & co, re-raised at the end

    def stopped(self) -> bool:
        return self.interrupt is not None or (self.cancel is not None and self.cancel.is_set())

    # -- scheduling ------------------------------------------------------------------------------

    def run(self, root: Node, workers: int) -> None:
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
                if self.finished_event.wait(GROW_EVERY_S if target < workers else None):
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

    def push(self, node: Node, names: list[str]) -> None:
        if not names:
            return
        children = [Node(node, node.fd, name, f"{node.path}/{name}") for name in names]
        with self.cond:
            node.pending += len(children)
            self.stack.extend(children)
            self.cond.notify(len(children))

    def finish(self, node: Node) -> None:
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

    def finish_gone(self, node: Node) -> None:
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

    def visit(self, node: Node, slot: int) -> None:
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

    def hold(self, node: Node) -> None:
        """``node`` is a mount point: nothing at or above it is removed; reported once."""
        node.held = True
        self.result.leave(node.path, MOUNTED)

    def clear(self, node: Node, subdirs: list[str], slot: int) -> None:
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
                retry_busy(lambda: self.fs.unlink(name, dir_fd=dir_fd), self.busy_retries, exc)
                return True
            except OSError as again:
                exc = again
        if exc.errno != errno.ENOENT:  # already gone: someone else removed it, fine
            self.result.leave(shown, errno_text(exc))
        return False

    def rmdir(self, node: Node) -> None:
        rmdir = self.fs.rmdir
        try:
            for attempt in range(2):
                try:
                    try:
                        rmdir(node.name, dir_fd=node.parent_fd)
                    except OSError as exc:
                        retry_busy(
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

    def clear_nfs(self, node: Node) -> bool:
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
