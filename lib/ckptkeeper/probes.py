"""What a scan probes beside the listing, read-only: does a name exist, is a writer lock held,
the last change in a tree, and ``.ckptkeeper/trash`` (reached without following a symlink)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import NamedTuple

from .dirfd import open_below
from .errors import errno_text, strerror
from .layouts.nemo_rl import NEMO_RL
from .records import Anomaly, TrashEntry

__all__ = [
    "CKPTKEEPER_DIR",
    "WRITER_LOCK",
    "LockProbe",
    "exists",
    "newest_mtime",
    "parse_trash_name",
    "probe_writer_lock",
    "scan_trash",
    "stale_probe",
    "trash_dir",
    "writer_lock_held",
]

CKPTKEEPER_DIR = ".ckptkeeper"
WRITER_LOCK = NEMO_RL.writer_lock


def trash_dir(root: Path) -> Path:
    return root / CKPTKEEPER_DIR / "trash"


def exists(rel: str | Path, dir_fd: int | None = None) -> bool:
    """Does ``rel`` (relative to ``dir_fd`` when given; its last component not followed)
    exist? One ``faccessat`` (F_OK, with the effective ids, as ``lstat`` judges): no stat
    result to build and no exception raised for the usual answer, "no"."""
    return os.access(rel, os.F_OK, dir_fd=dir_fd, effective_ids=True, follow_symlinks=False)


class LockProbe(NamedTuple):
    """``held``: a process holds the writer lock, or may (``unreadable`` says why we cannot tell,
    e.g. ``"Permission denied"``)."""

    held: bool
    unreadable: str | None = None


# No lock file, or a symlink (a writer following the protocol opens it with O_NOFOLLOW, as
# `effects.writer_lock` does): no writer can hold it.
_NO_LOCK = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def probe_writer_lock(directory: Path, lock_file: str = WRITER_LOCK) -> LockProbe:
    """Is ``<directory>/<lock_file>`` (the layout's writer lock) held? Opened read-only (flock
    works on any descriptor).

    A lock file that cannot be opened or probed (EACCES: another user's 0600 file; EPERM;
    ENOLCK...) may be held: ``LockProbe(True, <why>)``. Only a missing lock file (or a symlink)
    or a successful non-blocking shared lock means "not held".
    """
    import fcntl

    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(directory / lock_file, flags)
    except OSError as exc:
        if exc.errno in _NO_LOCK:
            return LockProbe(False)
        return LockProbe(True, strerror(exc))
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return LockProbe(True)
    except OSError as exc:
        return LockProbe(True, strerror(exc))
    finally:
        os.close(fd)  # closing releases our probe lock
    return LockProbe(False)


def writer_lock_held(directory: Path, lock_file: str = WRITER_LOCK) -> bool:
    """True when the writer lock is held, or may be (see `probe_writer_lock`)."""
    return probe_writer_lock(directory, lock_file).held


def newest_mtime(directory: Path, stop_above: float | None = None) -> float:
    """The last change in a tree: the newest mtime or ctime of any entry (symlinks not
    followed); stops once one exceeds ``stop_above``. The ctime counts because ``cp -p``,
    ``rsync -a`` and ``tar x`` write old mtimes, and a ctime cannot be set back."""
    st = os.lstat(directory)
    newest = max(st.st_mtime, st.st_ctime)
    stack = [str(directory)]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            newest = max(newest, st.st_mtime, st.st_ctime)
            if stop_above is not None and newest > stop_above:
                return newest
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
    return newest


def parse_trash_name(name: str) -> float | None:
    """Trash entries are named ``<time_ns>-<original name>``; returns seconds or None."""
    head, sep, _ = name.partition("-")
    return int(head) / 1e9 if sep and head.isdigit() and head.isascii() else None


def stale_probe(
    path: Path, lock_file: str, stale_before: float | None
) -> tuple[bool | None, float | None, str | None]:
    """An unmarked tmp dir: (writer lock held, last change, why the lock is unreadable).
    Nothing is probed without ``stale_before``; the last change only when it can matter."""
    if stale_before is None:
        return None, None, None
    lock = probe_writer_lock(path, lock_file)
    # A lock we cannot probe keeps the save, but the plan says so only when the save would
    # otherwise be stale: that needs the last change too.
    newest: float | None = None
    if not lock.held or lock.unreadable is not None:
        try:
            newest = newest_mtime(path, stop_above=stale_before)
        except OSError:
            newest = None
    return lock.held, newest, lock.unreadable


def scan_trash(root: Path, anomalies: list[Anomaly], root_fd: int | None) -> list[TrashEntry]:
    """Entries of ``<root>/.ckptkeeper/trash``, reached without following any symlink (from
    ``root_fd``, a descriptor of the root opened with ``O_NOFOLLOW``, when given)."""
    fd = -1
    try:
        fd = open_below(root, CKPTKEEPER_DIR, "trash", root_fd=root_fd)
        where = trash_dir(root)
        trash: list[TrashEntry] = []
        with os.scandir(fd) as it:
            for entry in it:
                when = parse_trash_name(entry.name)
                if when is None:
                    try:
                        when = entry.stat(follow_symlinks=False).st_ctime
                    except OSError:
                        continue
                trash.append(TrashEntry(where / entry.name, when))
        return trash
    except FileNotFoundError:
        return []  # no trash yet
    except NotADirectoryError:
        anomalies.append(
            Anomaly(
                trash_dir(root),
                "not a directory or behind a symlink: ckptkeeper's trash is not used",
            )
        )
        return []
    except OSError as exc:
        anomalies.append(Anomaly(trash_dir(root), f"cannot list trash: {errno_text(exc)}"))
        return []
    finally:
        if fd >= 0:
            os.close(fd)
