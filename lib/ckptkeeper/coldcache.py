"""A cron ``sweep``'s parsed metrics kept across processes (``sweep --cache-dir DIR``, off by
default): one file per root in the cache directory, read once per root instead of an open, read
and JSON parse of every step's metrics file. Only for the look that decides whether a root needs
a pass (`ColdLookStorage`).

Never trusted over the files it describes:

- An entry is used only while the metrics file's (st_ino, st_mtime_ns, st_size, st_ctime_ns)
  equal those it was read with (and a step directory's pin probe, ``KEEP``, only while the
  directory's (st_dev, st_ino, st_mtime_ns, st_ctime_ns) do: creating or removing an entry in
  it changes them) (every scan still ``lstat``s each file; a rewrite in place, even
  with its mtime restored through ``utime``, changes its ctime), and the root is the same
  directory (st_dev, st_ino). It is kept only when the file was last changed at least
  `MEMO_TRUST_S` before the read (an equal key then means an unchanged file, whatever the
  timestamp granularity).
- It feeds the unlocked look only (a memoized scan, ``memo=True``): what is acted on comes from
  the locked scan, which reads every file. A forged or stale entry can at most make a pass
  look for nothing (the locked pass re-reads and does what the files say) or put it off while
  its key matches; it never causes an action the files do not call for.
- The directory and each file must be owned by this process's user and writable by no one
  else, the file regular and at most `MAX_CACHE_BYTES`; anything else (corrupt, foreign,
  unreadable, another root's) is ignored as if there were no cache. Files are replaced whole
  (a temporary file renamed over): a crash leaves the old file or the new one.
- Bounded: a root's file holds its current steps only; files not used for `STALE_DAYS` are
  removed (at most once a day, `prune`). Nothing is ever written inside a root for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from .effects import OS_FS, Fs
from .errors import errno_text
from .info import MEMO_TRUST_S, InfoCache, _read_info_at
from .layouts import NEMO_RL, Layout
from .records import RootScan
from .storage import PosixStorage

__all__ = [
    "MAX_CACHE_BYTES",
    "STALE_DAYS",
    "ColdLookStorage",
    "MetricsSeed",
    "prune",
    "usable_dir",
]

MAX_CACHE_BYTES = 16 << 20
STALE_DAYS = 30
_VERSION = 2
_DAY_S = 86400
_TRUST_NS = int(MEMO_TRUST_S * 1e9)
_InfoKey = tuple[int, int, int, int]
_InfoResult = tuple[Mapping[str, Any] | None, str | None]
_DirKey = tuple[int, int, int, int]
_Entries = dict[str, tuple[_InfoKey, dict[str, Any]]]
_Dirs = dict[str, tuple[_DirKey, bool]]


def _private(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _usable_dir(directory: Path, create: bool) -> bool:
    """``directory`` is ours alone (created 0700 when asked and missing)."""
    return usable_dir(directory, create) is None


def usable_dir(directory: Path, create: bool = True) -> str | None:
    """Why ``directory`` cannot hold the cache (None: it can): it must be a directory (not a
    symlink) owned by this process's user and writable by no one else. Created 0700 (with its
    parents) when missing and ``create``. A sweep checks once, before its first root."""
    try:
        if create:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.lstat(directory)
    except OSError as exc:
        return errno_text(exc)
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not {os.geteuid()}"
    if st.st_mode & 0o022:
        return f"writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


class MetricsSeed:
    """One root's cache file: entries read from it, and what this scan found."""

    def __init__(self, directory: Path, root: str, identity: tuple[int, int]) -> None:
        self.path = directory / (
            hashlib.sha256(root.encode("utf-8", "surrogateescape")).hexdigest()[:40] + ".json"
        )
        self.directory, self.root, self.identity = directory, root, identity
        self.entries: dict[str, tuple[_InfoKey, dict[str, Any]]] = {}
        self.used: dict[str, tuple[_InfoKey, dict[str, Any]]] = {}
        # A step directory's pin probe, by its (st_dev, st_ino, st_mtime_ns, st_ctime_ns).
        self.dirs: dict[str, tuple[_DirKey, bool]] = {}
        self.dirs_used: dict[str, tuple[_DirKey, bool]] = {}
        self.changed = False
        self.started_ns = time.time_ns()

    def load(self) -> None:
        """The entries of the cache file, if it is one this process may trust to be its own
        (the directory was checked once: `usable_dir`)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) and _private(st)) or st.st_size > MAX_CACHE_BYTES:
                return
            raw = os.read(fd, st.st_size + 1)
        except OSError:
            return
        finally:
            os.close(fd)
        self.entries, self.dirs = _parse(raw, self.root, self.identity)
        if self.entries and time.time() - st.st_mtime > _DAY_S:  # in use: not pruned
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def read(
        self, dir_fd: int, rel: str, name: str, label: str
    ) -> tuple[_InfoResult, _InfoKey | None]:
        """`info._read_info_at` of ``rel``: from the entry while the file's key matches it."""
        try:
            st = os.stat(rel, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            st = None
        if st is not None and stat.S_ISREG(st.st_mode):
            hit = self.entries.get(name)
            if hit is not None and hit[0] == (
                st.st_ino,
                st.st_mtime_ns,
                st.st_size,
                st.st_ctime_ns,
            ):
                self.used[name] = hit
                return (hit[1], None), hit[0]
        result, read_key = _read_info_at(dir_fd, rel, (self.root, name), label, None)
        info = result[0]
        if (
            read_key is not None
            and isinstance(info, dict)
            and self.started_ns - max(read_key[1], read_key[3]) >= _TRUST_NS
        ):
            self.used[name] = (read_key, info)
            self.changed = True
        return result, read_key

    def pinned(self, name: str, st: os.stat_result) -> bool | None:
        """The pin probe of the step directory ``name`` (``st``: its lstat) while the directory
        is unchanged (no entry created, removed or renamed in it since); None: probe it."""
        hit = self.dirs.get(name)
        if hit is not None and hit[0] == (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns):
            self.dirs_used[name] = hit
            return hit[1]
        return None

    def probed(self, name: str, st: os.stat_result, pinned: bool) -> None:
        """``pinned``: the probe of ``name`` made after ``st``; kept if the directory was last
        changed `MEMO_TRUST_S` before this scan began."""
        if self.started_ns - max(st.st_mtime_ns, st.st_ctime_ns) >= _TRUST_NS:
            self.dirs_used[name] = ((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns), pinned)
            self.changed = True

    def save(self) -> None:
        """Replace the file with what this scan used, if that differs from what was loaded."""
        if (
            not self.changed
            and len(self.used) == len(self.entries)
            and len(self.dirs_used) == len(self.dirs)
        ):
            return
        doc = {
            "v": _VERSION,
            "root": self.root,
            "identity": list(self.identity),
            "entries": {n: [*key, info] for n, (key, info) in self.used.items()},
            "dirs": {n: [*key, pinned] for n, (key, pinned) in self.dirs_used.items()},
        }
        try:
            data = json.dumps(doc, separators=(",", ":"), allow_nan=True).encode()
        except (TypeError, ValueError):
            return
        if len(data) > MAX_CACHE_BYTES:
            return
        _replace(self.path, data)


def _parse(raw: bytes, root: str, identity: tuple[int, int]) -> tuple[_Entries, _Dirs]:
    """The entries of a cache file's bytes; none for anything not written by `save` for
    ``root``."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return {}, {}
    if not isinstance(doc, dict) or doc.get("v") != _VERSION or doc.get("root") != root:
        return {}, {}
    entries, dirs = doc.get("entries"), doc.get("dirs")
    if doc.get("identity") != list(identity) or not isinstance(entries, dict):
        return {}, {}
    out: _Entries = {}
    for name, entry in entries.items():
        if _ints(entry, 5, 4) and isinstance(entry[4], dict):
            out[name] = ((entry[0], entry[1], entry[2], entry[3]), entry[4])
    pins: _Dirs = {}
    for name, entry in dirs.items() if isinstance(dirs, dict) else ():
        if _ints(entry, 5, 4) and type(entry[4]) is bool:
            pins[name] = ((entry[0], entry[1], entry[2], entry[3]), entry[4])
    return out, pins


def _ints(entry: object, length: int, ints: int) -> bool:
    """A list of ``length`` items whose first ``ints`` are integers (not bools)."""
    return (
        isinstance(entry, list)
        and len(entry) == length
        and all(type(v) is int for v in entry[:ints])
    )


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole: a temporary file beside it, renamed over it."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def prune(directory: Path, now: float | None = None) -> None:
    """Remove cache files unused for `STALE_DAYS` (and stray temporary files a day old), at
    most once a day (the directory's ``.pruned`` stamp)."""
    now = time.time() if now is None else now
    if not _usable_dir(directory, create=False):
        return
    stamp = directory / ".pruned"
    with contextlib.suppress(OSError):
        if now - os.lstat(stamp).st_mtime < _DAY_S:
            return
    with contextlib.suppress(OSError):
        stamp.touch()
        with os.scandir(directory) as it:
            for entry in it:
                limit = _DAY_S if entry.name.startswith(".tmp-") else STALE_DAYS * _DAY_S
                if entry.name == ".pruned" or not entry.is_file(follow_symlinks=False):
                    continue
                with contextlib.suppress(OSError):
                    if now - entry.stat(follow_symlinks=False).st_mtime > limit:
                        os.unlink(entry.path)


class ColdLookStorage(PosixStorage):
    """A local root's storage whose memoized scans (the unlocked look of `reconcile`) take
    metrics from the cache in ``directory`` and keep it up to date; every other scan (the
    locked one that is acted on, a preview, a partial scan) reads the files as always."""

    def __init__(self, directory: Path, fs: Fs = OS_FS) -> None:
        super().__init__(fs)
        self.directory = directory

    def scan(
        self,
        root: Path,
        *,
        layout: Layout = NEMO_RL,
        marker: str = "",
        cache: InfoCache | None = None,
        stale_before: float | None = None,
        memo: bool = False,
        steps: Collection[int] | None = None,
    ) -> RootScan:
        from .scan import scan_root

        seed = None
        if memo and steps is None:
            try:
                st = os.stat(root, follow_symlinks=False)
            except OSError:
                st = None  # the scan says why
            if st is not None and stat.S_ISDIR(st.st_mode):
                seed = MetricsSeed(self.directory, str(root), (st.st_dev, st.st_ino))
                seed.load()
        found = scan_root(
            root,
            marker=marker,
            cache=cache,
            stale_before=stale_before,
            memo=memo,
            layout=layout,
            steps=steps,
            seed=seed,
        )
        if seed is not None:
            seed.save()
        return found
