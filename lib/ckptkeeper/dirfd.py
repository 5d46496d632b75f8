"""Reaching a directory below a root without following a symlink: each component is opened
relative to its parent's descriptor with ``O_NOFOLLOW``. Shared by scanning (read-only) and the
effects (which may create missing components). Also: which mount points lie inside a tree, so
that removal never crosses into another filesystem (`mount_points_below`)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable
from pathlib import Path

__all__ = ["DIR_FLAGS", "MOUNTINFO", "mount_points_below", "open_below"]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MOUNTINFO = "/proc/self/mountinfo"
_OCTAL = re.compile(rb"\\([0-7]{3})")  # mountinfo escapes space, tab, newline, backslash


def open_below(
    root: Path,
    *parts: str,
    root_fd: int | None = None,
    mkdir: Callable[[str, int], None] | None = None,
) -> int:
    """A descriptor of ``root/parts...`` (the caller closes it).

    ``root_fd``: an open descriptor of ``root`` to start from (left open). A component that is
    (or is swapped for) a symlink or a file raises ENOTDIR naming its path; other errors carry
    the path too. ``mkdir(name, dir_fd)`` creates a missing component first.
    """
    fd = os.open(root, DIR_FLAGS) if root_fd is None else root_fd

    def release(fd: int) -> None:
        if fd != root_fd:
            os.close(fd)

    try:
        shown = Path(root)
        for part in parts:
            shown = shown / part
            if mkdir is not None:
                with contextlib.suppress(FileExistsError):
                    mkdir(part, fd)
            try:
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except NotADirectoryError:
                raise NotADirectoryError(
                    errno.ENOTDIR, "not a directory (a symlink is never followed)", str(shown)
                ) from None
            except OSError as exc:
                exc.filename = str(shown)
                raise
            release(fd)
            fd = child
    except BaseException:
        release(fd)
        raise
    return fd if fd != root_fd else os.dup(fd)


def mount_points_below(dir_fd: int, name: str) -> list[str]:
    """Mount points at or below ``name`` in the directory ``dir_fd``, as paths relative to it
    (``""``: ``name`` itself is one), from one read of this process's mountinfo.

    Any mount counts, a bind mount of a directory of the same filesystem too (its ``st_dev`` is
    the same: only the mount table tells). Empty when that cannot be known (no ``/proc``): the
    caller still compares ``st_dev``, which catches every mount of another filesystem.
    """
    try:
        where = os.readlink(f"/proc/self/fd/{dir_fd}")
        with open(MOUNTINFO, "rb") as fh:
            table = fh.read()
    except OSError:
        return []
    if not where.startswith("/"):
        return []
    # Compared in mountinfo's own escaped form: no line but a match is decoded.
    top = _escape(os.fsencode(where.rstrip("/") + "/" + name))
    found = []
    for line in table.split(b"\n"):
        fields = line.split(b" ", 5)
        if len(fields) > 4 and (fields[4] == top or fields[4].startswith(top + b"/")):
            found.append(_unescape(fields[4][len(top) + 1 :]))
    return found


def _escape(path: bytes) -> bytes:
    return b"".join(b"\\%03o" % c if c in b" \t\n\\" else bytes([c]) for c in path)


def _unescape(field: bytes) -> str:
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), field))
