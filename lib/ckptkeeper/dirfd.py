"""Reaching a directory below a root without following a symlink: each component is opened
relative to its parent's descriptor with ``O_NOFOLLOW``. Shared by scanning (read-only) and the
effects (which may create missing components)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["DIR_FLAGS", "open_below"]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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
