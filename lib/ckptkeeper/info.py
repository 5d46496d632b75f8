"""``training_info.json``: reading it safely, and the per-root cache that makes a repeated scan
of an unchanged root parse no JSON (keyed by (inode, mtime_ns, size, ctime_ns)) and, for
memoized scans, look inside no unchanged step directory (see `scan.scan_root`). Reads only,
never writes."""

from __future__ import annotations

import json
import os
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from .errors import errno_text
from .layouts.nemo_rl import NEMO_RL
from .records import Checkpoint

__all__ = [
    "INFO_FILE",
    "MAX_INFO_BYTES",
    "MEMO_TRUST_S",
    "InfoCache",
    "Journal",
    "Listing",
    "read_training_info",
]

INFO_FILE = NEMO_RL.info_file  # the nemo-rl layout's (a scan reads its layout's)
MAX_INFO_BYTES = 16 * 1024 * 1024  # a training_info.json larger than this is not parsed

#: A step directory's memo entry is trusted only if the scan that made it began at least this long
#: after the directory last changed (st_ctime/st_mtime): far above any timestamp granularity.
MEMO_TRUST_S = 2.0

_InfoResult = tuple[Mapping[str, Any] | None, str | None]
# training_info.json: (st_ino, st_mtime_ns, st_size, st_ctime_ns). The ctime counts: a rewrite
# in place that keeps the size and puts the old mtime back (utime) still moves it.
_InfoKey = tuple[int, int, int, int]


class _StepMemo:
    """What a scan found in one ``step_N`` directory, for the next memoized scan. The directory
    is unchanged while its (st_dev, st_ino) is ``identity`` and its st_mtime_ns and st_ctime_ns
    are the same.

    A keeper holds one per checkpoint it watches (a million of them), so an entry keeps only
    what rebuilds the scan's record, in one ``bytes``: the directory's identity and times, the
    metrics file's key, the step, the pin and config flags and, when the metrics are a flat
    object of numbers (as training_info.json is), their values under a shared `_Schemas` shape.
    Any other metrics object (or why there is none) is kept as it is. `record` makes the
    record again (a new path and a new metrics dict each time: nothing else holds them)."""

    __slots__ = ("_info", "_stamp")

    def __init__(
        self,
        st: os.stat_result,
        trusted: bool,
        info_key: _InfoKey | None,
        record: Checkpoint,
        derived: bool = False,
    ) -> None:
        """Raises ValueError for a record that does not fit (see `make`)."""
        flags = (_TRUSTED if trusted else 0) | (_PINNED if record.pinned else 0)
        flags |= 0 if derived else _INFO_IS_FILE
        flags |= _CONFIG if record.config_yaml else _NO_CONFIG if record.config_yaml is False else 0
        ino, mtime, size, ctime = info_key if info_key is not None else (0, 0, 0, 0)
        flags |= _HAS_KEY if info_key is not None else 0
        shape, values = 0, b""
        self._info: object = record.info_error
        if record.info is not None:
            packed = _SCHEMAS.pack(record.info)
            if packed is None:
                self._info = record.info
                flags |= _INFO_OBJECT
            else:
                shape, values = packed
                self._info = None
                flags |= _INFO_PACKED
        dev, dino = record.identity
        try:
            times = (st.st_mtime_ns, st.st_ctime_ns, ino, mtime, size, ctime)
            head = _HEAD.pack(dev, dino, *times, record.step, flags, shape)
        except struct.error as exc:
            raise ValueError(str(exc)) from None
        self._stamp = head + values

    @classmethod
    def make(
        cls,
        st: os.stat_result,
        trusted: bool,
        info_key: _InfoKey | None,
        record: Checkpoint,
        derived: bool = False,
    ) -> _StepMemo | None:
        """An entry, or None when a number does not fit 64 bits (the step is then read again
        by the next scan, as if it had changed). ``derived``: the record's metrics are not the
        metrics file as parsed but what a layout made of it (hf-trainer's entries of one step
        in trainer_state.json): they may not stand for the file (`of_file`)."""
        try:
            return cls(st, trusted, info_key, record, derived)
        except ValueError:
            return None

    def _head(self) -> tuple[int, ...]:
        return _HEAD.unpack_from(self._stamp)

    @property
    def identity(self) -> tuple[int, int]:
        dev, ino = _HEAD.unpack_from(self._stamp)[:2]
        return dev, ino

    @property
    def step(self) -> int:
        return int(self._head()[8])

    @property
    def mtime_ns(self) -> int:
        return int(self._head()[2])

    @mtime_ns.setter
    def mtime_ns(self, value: int) -> None:
        self._set(2, value)

    @property
    def ctime_ns(self) -> int:
        return int(self._head()[3])

    @ctime_ns.setter
    def ctime_ns(self, value: int) -> None:
        self._set(3, value)

    @property
    def trusted(self) -> bool:
        return bool(self._head()[9] & _TRUSTED)

    @property
    def of_file(self) -> bool:
        """Are the metrics the file of `info_key` as parsed (so a read of it may use them)?"""
        return bool(self._head()[9] & _INFO_IS_FILE)

    @property
    def info_key(self) -> _InfoKey | None:
        head = self._head()
        return (head[4], head[5], head[6], head[7]) if head[9] & _HAS_KEY else None

    def _set(self, index: int, value: int) -> None:
        head = list(self._head())
        head[index] = value
        self._stamp = _HEAD.pack(*head) + self._stamp[_HEAD.size :]

    def matches(self, st: os.stat_result) -> bool:
        """Trusted, and ``st`` (the directory now) has the identity and times it had."""
        dev, ino, mtime, ctime, *_, flags, _ = _HEAD.unpack_from(self._stamp)
        return bool(
            flags & _TRUSTED
            and mtime == st.st_mtime_ns
            and ctime == st.st_ctime_ns
            and ino == st.st_ino
            and dev == st.st_dev
        )

    def info_result(self) -> _InfoResult:
        """The metrics file's (info, why) as the scan that made this entry read it."""
        flags, shape = _HEAD.unpack_from(self._stamp)[9:]
        if flags & _INFO_PACKED:
            return _SCHEMAS.unpack(shape, self._stamp, _HEAD.size), None
        if flags & _INFO_OBJECT:
            return self._info, None  # type: ignore[return-value]
        return None, self._info  # type: ignore[return-value]

    def record(self, path: Path) -> Checkpoint:
        """The scan's record of the step directory ``path``, made again."""
        dev, ino, _, _, _, _, _, _, step, flags, _ = _HEAD.unpack_from(self._stamp)
        info, why = self.info_result()
        pinned = bool(flags & _PINNED)
        config = True if flags & _CONFIG else False if flags & _NO_CONFIG else None
        return Checkpoint(step, path, info, why, pinned, (dev, ino), config)


# _StepMemo's bytes: st_dev, st_ino, st_mtime_ns, st_ctime_ns of the directory; the metrics
# file's (st_ino, st_mtime_ns, st_size, st_ctime_ns); the step; flags; the shape of packed
# metrics.
_HEAD = struct.Struct("<QQqqQqqqqBH")
_TRUSTED, _PINNED, _CONFIG, _HAS_KEY, _INFO_PACKED, _INFO_OBJECT = 1, 2, 4, 8, 16, 32
_NO_CONFIG = 64  # config_yaml False (neither flag: None, not probed)
_INFO_IS_FILE = 128  # the metrics are the metrics file as parsed (not derived by a layout)


class _Schemas:
    """The shapes of flat metrics objects (their keys, in order, and which values are ints and
    which floats), numbered once per process: a checkpoint's metrics are then 8 bytes a value.
    Bounded: past `LIMIT` shapes (or 64 keys, or a value that is not an int of 64 bits or a
    float) an object is not packed."""

    LIMIT = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: dict[tuple[tuple[str, ...], str], int] = {}
        self._shapes: list[tuple[tuple[str, ...], struct.Struct]] = []

    def pack(self, info: Mapping[str, Any]) -> tuple[int, bytes] | None:
        if type(info) is not dict or not 0 < len(info) <= 64:
            return None
        codes: list[str] = []
        for value in info.values():
            kind = type(value)
            if kind is float:
                codes.append("d")
            elif kind is int and -(1 << 63) <= value < (1 << 63):
                codes.append("q")
            else:
                return None
        if any(type(key) is not str for key in info):
            return None
        shape = (tuple(info), "".join(codes))
        with self._lock:
            number = self._ids.get(shape)
            if number is None:
                if len(self._shapes) >= self.LIMIT:
                    return None
                keys = tuple(sys.intern(k) for k in shape[0])
                number = len(self._shapes)
                self._shapes.append((keys, struct.Struct("<" + shape[1])))
                self._ids[shape] = number
        return number, self._shapes[number][1].pack(*info.values())

    def unpack(self, number: int, data: bytes, offset: int) -> dict[str, Any]:
        keys, layout = self._shapes[number]
        return dict(zip(keys, layout.unpack_from(data, offset), strict=True))


_SCHEMAS = _Schemas()


class Journal(Protocol):
    """What a watcher saw happen in a root (the daemon's `RootWatcher.journals`): set as
    `InfoCache.journal`, it lets a partial scan name a step's entries with no listing of the
    root, from the last full listing and the names created in the root since it began."""

    def mark(self, root: str, identity: tuple[int, int]) -> object | None:
        """A mark of now, taken just before a full listing of ``root`` (the directory of
        (st_dev, st_ino) ``identity``); None when the names created from now on will not be known
        (not watched, or watched by another directory)."""
        ...

    def since(self, root: str, mark: object, identity: tuple[int, int]) -> Collection[str] | None:
        """Every name created in (or renamed into) ``root`` since ``mark``, up to this call
        (events still queued are read first); None when that is not known for certain (events
        lost, the watch ended or watches another directory): the caller lists the root."""
        ...


class Listing:
    """What a full scan's listing of a root found that a partial scan cannot probe for: the
    spellings of a step other than its layout's (``step_07``), by step, and the root's
    (st_dev, st_ino, st_mtime_ns, st_ctime_ns) taken before the listing. While the root still
    has those, no entry was created, removed or renamed in it since, if the listing began at
    least `MEMO_TRUST_S` after the root's last change (``trusted``)."""

    __slots__ = ("layout", "mark", "odd", "stamp", "steps", "trusted")

    def __init__(
        self,
        st: os.stat_result,
        listed_ns: int,
        odd: dict[int, list[str]],
        steps: Mapping[str, object] | None = None,
        layout: str = "",
        mark: object | None = None,
    ) -> None:
        self.stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        self.trusted = listed_ns - max(st.st_mtime_ns, st.st_ctime_ns) >= int(MEMO_TRUST_S * 1e9)
        self.odd = odd
        # The step directories the listing classified, by name (the same scan's step memo, not a
        # copy): a name's step follows from the name alone, so while or after the root changes a
        # partial scan need not classify these again; their spellings of a step other than the
        # layout's are all in ``odd``.
        self.steps: Mapping[str, object] = steps if steps is not None else {}
        self.layout = layout  # the layout the names were classified by
        self.mark = mark  # `Journal.mark` taken before the listing (None: no journal)

    def holds(self, st: os.stat_result) -> bool:
        """Still the root's listing (``st``: the root now)?"""
        return self.trusted and self.stamp == (
            st.st_dev,
            st.st_ino,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )


class InfoCache:
    """Thread-safe cache of parsed training_info.json keyed by path and (inode, mtime_ns, size,
    ctime_ns).

    Entries are grouped per root; a scan of a root drops that root's entries for vanished steps.
    It also holds, per root, the step-directory memo of ``scan_root(..., memo=True)`` (judged by
    ``clock_ns``, the wall clock in ns). A step directory's metrics are kept once: in its memo
    entry (`_StepMemo`) once a full scan made one, else (a save in flight, a partial scan's
    step) as parsed. No plan is kept: planning an unchanged root again costs less than keeping
    every decision of a million checkpoints would (bench P9K).
    """

    def __init__(self, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.clock_ns = clock_ns
        self._lock = threading.Lock()
        self._roots: dict[str, dict[str, tuple[_InfoKey, _InfoResult]]] = {}
        self._steps: dict[str, dict[str, _StepMemo]] = {}
        self._sizes: dict[str, dict[tuple[int, int, int], int]] = {}
        self._listings: dict[str, Listing] = {}
        self.parses = 0  # how many files were actually parsed (for tests and benchmarks)
        self.memo_hits = 0  # step directories a memoized scan did not look inside (for tests)
        self.listing_hits = 0  # partial scans that did not list the root (for tests, benchmarks)
        self.journal: Journal | None = None  # the root's events, where a watcher has them

    def get(self, path: Path, key: _InfoKey) -> _InfoResult | None:
        return self.lookup(str(path.parent.parent), path.parent.name, key)

    def put(self, path: Path, key: _InfoKey, result: _InfoResult) -> None:
        self.store(str(path.parent.parent), path.parent.name, key, result)

    def lookup(self, root: str, name: str, key: _InfoKey) -> _InfoResult | None:
        """`get` of the metrics file in ``root/name`` (strings: no path objects on a scan)."""
        with self._lock:
            memo = self._steps.get(root, {}).get(name)
            hit = self._roots.get(root, {}).get(name)
        if memo is not None and memo.info_key == key and memo.of_file:
            return memo.info_result()
        return hit[1] if hit is not None and hit[0] == key else None

    def store(self, root: str, name: str, key: _InfoKey, result: _InfoResult) -> None:
        with self._lock:
            self.parses += 1
            self._roots.setdefault(root, {})[name] = (key, result)

    def retain(self, root: Path, names: Iterable[str]) -> None:
        """Forget the entries of ``root`` whose directory name is not in ``names``."""
        keep = set(names)
        with self._lock:
            entries = self._roots.get(str(root))
            if entries is not None and not keep.issuperset(entries):
                self._roots[str(root)] = {n: v for n, v in entries.items() if n in keep}

    def drop_root(self, root: Path) -> None:
        with self._lock:
            self._roots.pop(str(root), None)
            self._steps.pop(str(root), None)
            self._sizes.pop(str(root), None)
            self._listings.pop(str(root), None)

    def tree_sizes(self, root: Path) -> dict[tuple[int, int, int], int]:
        """Bytes of the checkpoint trees measured in ``root``, by (st_dev, st_ino, st_ctime_ns)."""
        with self._lock:
            return self._sizes.get(str(root), {})

    def keep_tree_sizes(self, root: Path, sizes: dict[tuple[int, int, int], int]) -> None:
        with self._lock:
            self._sizes[str(root)] = sizes  # replaced whole

    def listing(self, root: str) -> Listing | None:
        """The last full scan's `Listing` of ``root`` (None: none yet)."""
        with self._lock:
            return self._listings.get(root)

    def keep_listing(self, root: str, listing: Listing) -> None:
        with self._lock:
            self._listings[root] = listing

    def used_listing(self) -> None:
        with self._lock:
            self.listing_hits += 1

    def step_memo(self, root: str) -> dict[str, _StepMemo]:
        with self._lock:
            return self._steps.get(root, {})

    def set_step_memo(self, root: str, memo: dict[str, _StepMemo], hits: int) -> None:
        with self._lock:
            self._steps[root] = memo  # replaced whole: a concurrent scan of the root reads either
            self.memo_hits += hits
            parsed = self._roots.get(root)
            if parsed:  # what the memo holds as the file is not kept twice
                self._roots[root] = {
                    n: v for n, v in parsed.items() if n not in memo or not memo[n].of_file
                }


def _reject_constant(name: str) -> float:
    # json accepts NaN/Infinity literals; keep them as floats so the planner can call them unranked.
    return float(name)


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def read_training_info(directory: Path, cache: InfoCache | None = None) -> _InfoResult:
    """(info, None) for a usable JSON object, else (None, reason). Never raises for bad input."""
    return _read_info(directory / INFO_FILE, cache)[0]


def _read_info(path: Path, cache: InfoCache | None) -> tuple[_InfoResult, _InfoKey | None]:
    """`read_training_info` of ``path`` and the file's cache key (None: not a regular file)."""
    where = (str(path.parent.parent), path.parent.name)
    return _read_info_at(None, str(path), where, path.name, cache)


def _read_info_at(
    dir_fd: int | None,
    rel: str,
    where: tuple[str, str],
    label: str,
    cache: InfoCache | None,
) -> tuple[_InfoResult, _InfoKey | None]:
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


def _parse_info(path: Path, size: int) -> _InfoResult:
    return _parse_at(None, str(path), path.name, size)


def _parse_at(dir_fd: int | None, rel: str, label: str, size: int) -> _InfoResult:
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
