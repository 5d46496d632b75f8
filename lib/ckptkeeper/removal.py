"""Removal of a directory tree that never follows a symlink nor crosses into another mounted
filesystem, with parallel workers for trees on filesystems with per-operation latency. Every
unlink and rmdir goes through `effects.Fs`, so tests inject faults exactly as for the other
effects."""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .dirfd import DIR_FLAGS, mount_points_below
from .effects import OS_FS, Fs
from .errors import errno_text
from .treewalk import MOUNTED, Node, Remover

__all__ = ["MOUNTED", "Pacing", "Removal", "remove_tree"]


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
    remover = Remover(result, fs, busy_retries, cancel, count_bytes, pacing)
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
        remover.run(Node(None, parent_fd, path.name, shown), workers)
        safe_to_close = True
    finally:
        # Interrupted twice while workers still run: leave the descriptor to the process rather
        # than let a worker rmdir through a recycled descriptor number.
        if safe_to_close or remover.finished:
            os.close(parent_fd)
    return result
