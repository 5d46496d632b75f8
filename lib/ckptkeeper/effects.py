"""Every mutation ckptkeeper makes, behind one narrow interface (`Fs`).

Tests wrap `Fs` to inject faults (``OSError`` at the k-th rename) or crashes (``os._exit``).
Nothing here follows a symlink: directories are opened with ``O_NOFOLLOW`` relative to their
parent's descriptor, so a directory swapped for a symlink mid-delete is unlinked, not entered.
Everything is created with modes 0o777 / 0o666 less the process umask (trainer and keeper may be
different users sharing a group: umask 002 and setgid directories make it all group-writable).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .dirfd import DIR_FLAGS, open_below
from .scan import CKPTKEEPER_DIR, WRITER_LOCK, trash_dir

__all__ = [
    "OS_FS",
    "Fs",
    "RootLock",
    "fsync_dir",
    "move_to_trash",
    "open_area",
    "write_marker",
    "writer_lock",
]


class Fs:
    """The system calls that mutate a root. Subclass to inject faults; all paths are absolute or
    relative to ``dir_fd``."""

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def unlink(self, path: str | Path, dir_fd: int | None = None) -> None:
        os.unlink(path, dir_fd=dir_fd)

    def rmdir(self, path: str | Path, dir_fd: int | None = None) -> None:
        os.rmdir(path, dir_fd=dir_fd)

    def mkdir(self, path: str | Path, mode: int = 0o777, dir_fd: int | None = None) -> None:
        os.mkdir(path, mode, dir_fd=dir_fd)

    def open(
        self, path: str | Path, flags: int, mode: int = 0o666, dir_fd: int | None = None
    ) -> int:
        return os.open(path, flags, mode, dir_fd=dir_fd)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def flock(self, fd: int, operation: int) -> None:
        fcntl.flock(fd, operation)


OS_FS = Fs()


def fsync_dir(path: Path, fs: Fs = OS_FS) -> None:
    fd = os.open(path, DIR_FLAGS)
    try:
        _fsync_fd(fd, fs)
    finally:
        os.close(fd)


def open_area(root: Path, *parts: str, create: bool = False, fs: Fs = OS_FS) -> int:
    """Open ``root/parts...`` (e.g. ``.ckptkeeper``, ``trash``) without following a symlink
    anywhere below the root (`dirfd.open_below`); ``create`` makes missing components through
    ``fs.mkdir``. The caller closes the descriptor."""

    def mkdir(name: str, dir_fd: int) -> None:
        fs.mkdir(name, 0o777, dir_fd=dir_fd)  # less the umask

    return open_below(root, *parts, mkdir=mkdir if create else None)


class RootLock:
    """``flock`` on ``<root>/.ckptkeeper/lock``; serialises every mutation of a root.

    ``timeout=0`` tries once (for the daemon: skip the pass when busy); ``None`` waits forever.
    The lock file is created 0o666 less the umask; ``flock`` needs no write access, so a lock
    file made by another user without group write is opened read-only and locks all the same.
    """

    def __init__(self, root: Path, *, timeout: float | None = None, fs: Fs = OS_FS) -> None:
        self.root = Path(root)
        self.timeout = timeout
        self.fs = fs
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        area_fd = open_area(self.root, CKPTKEEPER_DIR, create=True, fs=self.fs)
        try:
            fd = self._open_lock(area_fd)
        except OSError as exc:
            exc.filename = str(self.root / CKPTKEEPER_DIR / "lock")
            raise
        finally:
            os.close(area_fd)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        delay = 0.005
        try:
            while True:
                try:
                    flags = fcntl.LOCK_EX if deadline is None else fcntl.LOCK_EX | fcntl.LOCK_NB
                    self.fs.flock(fd, flags)
                    self._fd = fd
                    return True
                except BlockingIOError:
                    if deadline is None or time.monotonic() >= deadline:
                        os.close(fd)
                        return False
                    time.sleep(min(delay, max(deadline - time.monotonic(), 0)))
                    delay = min(delay * 2, 0.1)
        except BaseException:
            os.close(fd)
            raise

    def _open_lock(self, area_fd: int) -> int:
        flags = os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return self.fs.open("lock", os.O_RDWR | os.O_CREAT | flags, 0o666, dir_fd=area_fd)
        except PermissionError as denied:  # not group-writable: flock works on O_RDONLY too
            try:
                return self.fs.open("lock", os.O_RDONLY | flags, dir_fd=area_fd)
            except FileNotFoundError:  # missing, in an area we may not write: the first error
                raise denied from None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> RootLock:
        if not self.acquire():
            raise BlockingIOError(
                errno.EWOULDBLOCK, "root is locked by another actor", str(self.root)
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def write_marker(directory: Path, name: str, fs: Fs = OS_FS, **extra: Any) -> Path:
    """Write the completion marker atomically and durably.

    The content goes to a temporary name and is fsynced, then renamed into place, then the
    directory is fsynced through a descriptor opened first: a keeper that finalizes the save the
    moment the marker appears (``tmp_step_N`` -> ``step_N``) cannot make this fail, and a failure
    anywhere leaves no marker behind (a save the caller is told failed is never finalized).
    """
    payload = {"time": time.time(), "host": socket.gethostname(), "pid": os.getpid(), **extra}
    directory = Path(directory)
    path = directory / name
    temp = f".{name}.tmp-{os.getpid()}-{threading.get_ident()}"
    dir_fd = os.open(directory, DIR_FLAGS)
    renamed = False
    try:
        fd = fs.open(
            temp,
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o666,
            dir_fd=dir_fd,
        )
        try:
            data = json.dumps(payload).encode()
            if fs.write(fd, data) != len(data):
                raise OSError(errno.EIO, "short write of the completion marker", str(path))
            fs.fsync(fd)
        finally:
            os.close(fd)
        fs.rename(directory / temp, path)
        renamed = True
        _fsync_fd(dir_fd, fs)
    except BaseException:
        # Whatever failed, the save must not look complete. The directory may have been
        # finalized already (renamed) by a keeper: the descriptor still reaches it.
        for leftover in (temp, name) if renamed else (temp,):
            with contextlib.suppress(OSError):
                os.unlink(leftover, dir_fd=dir_fd)
        raise
    finally:
        os.close(dir_fd)
    return path


def _fsync_fd(fd: int, fs: Fs) -> None:
    try:
        fs.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on directories; not worth failing for
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise


@contextlib.contextmanager
def writer_lock(directory: Path, fs: Fs = OS_FS) -> Iterator[None]:
    """Hold ``flock(LOCK_EX)`` on ``<directory>/.writer.lock`` while writing a save."""
    fd = fs.open(
        Path(directory) / WRITER_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666
    )
    try:
        fs.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def move_to_trash(root: Path, path: Path, fs: Fs = OS_FS) -> Path | None:
    """Rename ``path`` into ``<root>/.ckptkeeper/trash/`` (atomic, same filesystem).

    Returns the trash path, or None when ``path`` is already gone (a lost race is success).
    """
    trash = trash_dir(root)
    # Made and checked component by component (no symlink anywhere below the root). The rename
    # itself goes by path: at worst a swap in between moves the step, it never deletes anything;
    # every removal goes through descriptors (see `purge_trash`).
    os.close(open_area(root, CKPTKEEPER_DIR, trash.name, create=True, fs=fs))
    dest = trash / f"{time.time_ns()}-{path.name}"
    try:
        fs.rename(path, dest)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise
        return None
    return dest
