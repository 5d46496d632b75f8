"""How an OSError is told in reports and logs: one spelling everywhere."""

from __future__ import annotations

import errno
import os

__all__ = ["errno_name", "errno_text", "strerror"]


def errno_name(exc: OSError, default: str = "OSError") -> str:
    """``ENOENT``, ``EACCES``...; ``default`` for an error without a known errno."""
    return errno.errorcode.get(exc.errno or 0, default)


def strerror(exc: OSError) -> str:
    """The system's words for it (``Permission denied``)."""
    return exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))


def errno_text(exc: OSError) -> str:
    """``EACCES (Permission denied)``: the name to grep for and the words to read."""
    name = errno_name(exc, "error")
    return f"{name} ({exc.strerror})" if exc.strerror else name
