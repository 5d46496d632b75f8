"""Reading a checkpoint's metrics file (``training_info.json``) safely: never a device or FIFO
opened, never more than `MAX_INFO_BYTES` read, never an exception for bad input; through an
`info.InfoCache` a file with an unchanged key is not parsed again. Reads only, never writes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import errno_text
from .layouts.nemo_rl import NEMO_RL
from .stepmemo import InfoKey, InfoResult

if TYPE_CHECKING:
    from .info import InfoCache

__all__ = ["INFO_FILE", "MAX_INFO_BYTES", "read_training_info"]

INFO_FILE = NEMO_RL.info_file  # the nemo-rl layout's (a scan reads its layout's)
MAX_INFO_BYTES = 16 * 1024 * 1024  # a training_info.json larger than this is not parsed


def _reject_constant(name: str) -> float:
    # json accepts NaN/Infinity literals; keep them as floats so the planner can call them unranked.
    return float(name)


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def read_training_info(directory: Path, cache: InfoCache | None = None) -> InfoResult:
    """(info, None) for a usable JSON object, else (None, reason). Never raises for bad input."""
    return _read_info(directory / INFO_FILE, cache)[0]


def _read_info(path: Path, cache: InfoCache | None) -> tuple[InfoResult, InfoKey | None]:
    """`read_training_info` of ``path`` and the file's cache key (None: not a regular file)."""
    where = (str(path.parent.parent), path.parent.name)
    return _read_info_at(None, str(path), where, path.name, cache)


def _read_info_at(
    dir_fd: int | None,
    rel: str,
    where: tuple[str, str],
    label: str,
    cache: InfoCache | None,
) -> tuple[InfoResult, InfoKey | None]:
    """`_read_info` of ``rel`` (relative to ``dir_fd`` when given): ``where`` is its (root,
    directory name) in the cache, ``label`` the file's name in messages."""
    try:
        st = os.stat(rel, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return (None, f"no {label}"), None
    except OSError as exc:
        return (None, f"{label} unreadable: {errno_text(exc)}"), None
    if not stat.S_ISREG(st.st_mode):
        return (None, f"{label} is not a regular file"), None
    key = (st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)
    if cache is not None and (hit := cache.lookup(*where, key)) is not None:
        return hit, key
    result = _parse_at(dir_fd, rel, label, st.st_size)
    if cache is not None:
        cache.store(*where, key, result)
    return result, key


def _read_bytes(dir_fd: int | None, rel: str, size: int) -> bytes:
    """Up to ``MAX_INFO_BYTES + 1`` bytes of ``path`` with plain ``read`` calls: no buffered file
    object (its fstat, ioctl and lseek, and a 16 MiB buffer mapped and unmapped per file). The
    first read asks for one byte more than the lstat'ed size: a regular file that returns exactly
    that size, short of the request, is at its end (a read of a regular file is short only
    there), so an unchanged file costs open, read, close. Any other count reads on to EOF."""
    fd = os.open(rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        want = min(size, MAX_INFO_BYTES) + 1
        first = os.read(fd, want)
        if len(first) == want - 1 == size:
            return first
        chunks, total = [first], len(first)
        want = min(MAX_INFO_BYTES + 1 - total, 1 << 16) or 1
        while first and total <= MAX_INFO_BYTES:
            first = os.read(fd, want)
            chunks.append(first)
            total += len(first)
            want = min(MAX_INFO_BYTES + 1 - total, 1 << 16) or 1
        return b"".join(chunks)
    finally:
        os.close(fd)


def _parse_info(path: Path, size: int) -> InfoResult:
    return _parse_at(None, str(path), path.name, size)


def _parse_at(dir_fd: int | None, rel: str, label: str, size: int) -> InfoResult:
    if size > MAX_INFO_BYTES:
        return None, f"{label} too large ({size} bytes > {MAX_INFO_BYTES})"
    try:
        raw = _read_bytes(dir_fd, rel, size)
    except OSError as exc:
        return None, f"{label} unreadable: {errno_text(exc)}"
    if len(raw) > MAX_INFO_BYTES:
        return None, f"{label} too large (> {MAX_INFO_BYTES} bytes)"
    # A JSON object's "{" followed by a byte that is not NUL: UTF-8, as json.detect_encoding
    # says for it (no BOM, not UTF-16/32), without calling it.
    utf8 = raw[:1] == b"{" and raw[1:2] != b"\0"
    try:  # json.loads(raw, parse_constant=...) would build a decoder per file
        data = _DECODER.decode(
            raw.decode("utf-8" if utf8 else json.detect_encoding(raw), "surrogatepass")
        )
    except (ValueError, RecursionError) as exc:
        return None, f"{label} is not valid JSON: {str(exc)[:80]}"
    if not isinstance(data, dict):
        return None, f"{label} is not a JSON object ({type(data).__name__})"
    return data, None
