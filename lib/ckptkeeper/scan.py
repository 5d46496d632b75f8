"""Read one checkpoint root into plain records (`records.RootScan`). Reads only, never writes.

Symlinks are never followed: a ``step_N`` that is a symlink or a regular file is an anomaly.
Parsed ``training_info.json`` is cached by (inode, mtime_ns, size) so a repeated scan of an
unchanged root parses no JSON.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .names import Kind, ParsedName, parse_name
from .records import Anomaly, Checkpoint, InFlight, Leftover, RootScan, TrashEntry

__all__ = [
    "CKPTKEEPER_DIR",
    "INFO_FILE",
    "MAX_INFO_BYTES",
    "PIN_FILE",
    "WRITER_LOCK",
    "InfoCache",
    "newest_mtime",
    "parse_trash_name",
    "read_training_info",
    "scan_root",
    "trash_dir",
    "writer_lock_held",
]

CKPTKEEPER_DIR = ".ckptkeeper"
INFO_FILE = "training_info.json"
PIN_FILE = "KEEP"
WRITER_LOCK = ".writer.lock"
MAX_INFO_BYTES = 16 * 1024 * 1024  # a training_info.json larger than this is not parsed
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_InfoResult = tuple[Mapping[str, Any] | None, str | None]


def trash_dir(root: Path) -> Path:
    return root / CKPTKEEPER_DIR / "trash"


class InfoCache:
    """Thread-safe cache of parsed training_info.json keyed by path and (inode, mtime_ns, size).

    Entries are grouped per root; a scan of a root drops that root's entries for vanished steps.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._roots: dict[str, dict[str, tuple[tuple[int, int, int], _InfoResult]]] = {}
        self.parses = 0  # how many files were actually parsed (for tests and benchmarks)

    def get(self, path: Path, key: tuple[int, int, int]) -> _InfoResult | None:
        with self._lock:
            hit = self._roots.get(str(path.parent.parent), {}).get(path.parent.name)
        return hit[1] if hit is not None and hit[0] == key else None

    def put(self, path: Path, key: tuple[int, int, int], result: _InfoResult) -> None:
        with self._lock:
            self.parses += 1
            self._roots.setdefault(str(path.parent.parent), {})[path.parent.name] = (key, result)

    def retain(self, root: Path, names: Iterable[str]) -> None:
        """Forget the entries of ``root`` whose directory name is not in ``names``."""
        keep = set(names)
        with self._lock:
            entries = self._roots.get(str(root))
            if entries is not None:
                self._roots[str(root)] = {n: v for n, v in entries.items() if n in keep}

    def drop_root(self, root: Path) -> None:
        with self._lock:
            self._roots.pop(str(root), None)


def _reject_constant(name: str) -> float:
    # json accepts NaN/Infinity literals; keep them as floats so the planner can call them unranked.
    return float(name)


def read_training_info(directory: Path, cache: InfoCache | None = None) -> _InfoResult:
    """(info, None) for a usable JSON object, else (None, reason). Never raises for bad input."""
    path = directory / INFO_FILE
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, "no training_info.json"
    except OSError as exc:
        return None, f"training_info.json unreadable: {_errname(exc)}"
    if not stat.S_ISREG(st.st_mode):
        return None, "training_info.json is not a regular file"
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    if cache is not None and (hit := cache.get(path, key)) is not None:
        return hit
    result = _parse_info(path, st.st_size)
    if cache is not None:
        cache.put(path, key, result)
    return result


def _parse_info(path: Path, size: int) -> _InfoResult:
    if size > MAX_INFO_BYTES:
        return None, f"training_info.json too large ({size} bytes > {MAX_INFO_BYTES})"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(MAX_INFO_BYTES + 1)
    except OSError as exc:
        return None, f"training_info.json unreadable: {_errname(exc)}"
    if len(raw) > MAX_INFO_BYTES:
        return None, f"training_info.json too large (> {MAX_INFO_BYTES} bytes)"
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        return None, f"training_info.json is not valid JSON: {str(exc)[:80]}"
    if not isinstance(data, dict):
        return None, f"training_info.json is not a JSON object ({type(data).__name__})"
    return data, None


def _errname(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "error")
    return f"{name} ({exc.strerror})" if exc.strerror else name


def _exists(path: Path) -> bool:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return False
    return True


def writer_lock_held(directory: Path) -> bool:
    """True when some process holds ``flock(LOCK_EX)`` on ``<directory>/.writer.lock``."""
    import fcntl

    try:
        fd = os.open(directory / WRITER_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases our probe lock
    return False


def newest_mtime(directory: Path, stop_above: float | None = None) -> float:
    """Newest mtime in a tree (symlinks not followed); stops once one exceeds ``stop_above``."""
    newest = os.lstat(directory).st_mtime
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
            newest = max(newest, st.st_mtime)
            if stop_above is not None and newest > stop_above:
                return newest
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
    return newest


def parse_trash_name(name: str) -> float | None:
    """Trash entries are named ``<time_ns>-<original name>``; returns seconds or None."""
    head, sep, _ = name.partition("-")
    return int(head) / 1e9 if sep and head.isdigit() and head.isascii() else None


def scan_root(
    root: Path,
    *,
    marker: str = ".complete",
    cache: InfoCache | None = None,
    stale_before: float | None = None,
) -> RootScan:
    """Scan ``root``. ``stale_before`` (epoch seconds): probe unmarked tmp dirs for staleness.

    Raises OSError only when the root itself cannot be listed.
    """
    root = Path(root)
    groups: dict[tuple[Kind, int], list[tuple[ParsedName, os.DirEntry[str]]]] = defaultdict(list)
    anomalies: list[Anomaly] = []
    with os.scandir(root) as it:
        for entry in it:
            parsed = parse_name(entry.name)
            if parsed is None:
                continue
            try:
                is_link = entry.is_symlink()
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError as exc:
                anomalies.append(
                    Anomaly(Path(entry.path), f"cannot stat: {_errname(exc)}", parsed.step)
                )
                continue
            if is_link:
                anomalies.append(Anomaly(Path(entry.path), "symlink: not followed", parsed.step))
            elif not is_dir:
                anomalies.append(Anomaly(Path(entry.path), "not a directory", parsed.step))
            else:
                groups[(parsed.kind, parsed.step)].append((parsed, entry))

    steps: list[Checkpoint] = []
    in_flight: list[InFlight] = []
    leftovers: list[Leftover] = []
    ambiguous: set[int] = set()
    for (kind, step), members in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0].value)):
        if len(members) > 1:
            names = " and ".join(sorted(p.name for p, _ in members))
            for _, entry in members:
                anomalies.append(
                    Anomaly(Path(entry.path), f"ambiguous: {names} name one step", step)
                )
            ambiguous.add(step)
            continue
        _, entry = members[0]
        path = Path(entry.path)
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            anomalies.append(Anomaly(path, f"cannot stat: {_errname(exc)}", step))
            continue
        identity = (st.st_dev, st.st_ino)
        info, why = read_training_info(path, cache)
        pinned = _exists(path / PIN_FILE)
        if kind is Kind.STEP:
            has_cfg = _exists(path / "config.yaml")
            steps.append(Checkpoint(step, path, info, why, pinned, identity, has_cfg))
        elif kind is Kind.OLD:
            leftovers.append(Leftover(step, path, identity, info, why, pinned))
        else:
            complete = _exists(path / marker)
            locked: bool | None = None
            newest: float | None = None
            if not complete and stale_before is not None:
                locked = writer_lock_held(path)
                if not locked:
                    try:
                        newest = newest_mtime(path, stop_above=stale_before)
                    except OSError:
                        newest = None
            in_flight.append(
                InFlight(step, path, complete, info, why, pinned, identity, locked, newest)
            )

    trash = _scan_trash(root, anomalies)

    if cache is not None:
        cache.retain(root, [p.name for group in groups.values() for p, _ in group])
    return RootScan(
        root,
        tuple(steps),
        tuple(in_flight),
        tuple(leftovers),
        tuple(sorted(trash, key=lambda t: t.path.name)),
        tuple(anomalies),
        frozenset(ambiguous),
    )


def _scan_trash(root: Path, anomalies: list[Anomaly]) -> list[TrashEntry]:
    """Entries of ``<root>/.ckptkeeper/trash``, reached without following any symlink."""
    where = trash_dir(root)
    fd = -1
    try:
        fd = os.open(root, _DIR_FLAGS)
        for part in (CKPTKEEPER_DIR, where.name):
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
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
            Anomaly(where, "not a directory or behind a symlink: ckptkeeper's trash is not used")
        )
        return []
    except OSError as exc:
        anomalies.append(Anomaly(where, f"cannot list trash: {_errname(exc)}"))
        return []
    finally:
        if fd >= 0:
            os.close(fd)
