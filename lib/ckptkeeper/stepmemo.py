"""The step memo's entry (`_StepMemo`): what a memoized scan (`scan.scan_root(memo=True)`) found
in one step directory, packed in one ``bytes`` so a keeper can hold a million of them (bench P9K),
and the shared shapes (`_Schemas`) its flat numeric metrics are packed under. `info.InfoCache`
holds the entries, per root."""

from __future__ import annotations

import os
import struct
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .records import Checkpoint

__all__ = ["InfoKey", "InfoResult"]

InfoResult = tuple[Mapping[str, Any] | None, str | None]
# training_info.json: (st_ino, st_mtime_ns, st_size, st_ctime_ns). The ctime counts: a rewrite
# in place that keeps the size and puts the old mtime back (utime) still moves it.
InfoKey = tuple[int, int, int, int]


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
        info_key: InfoKey | None,
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
        info_key: InfoKey | None,
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
    def info_key(self) -> InfoKey | None:
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

    def unchanged(self, st: os.stat_result, info: os.stat_result) -> bool:
        """`matches` ``st`` (the directory now), and ``info`` (its metrics file now, a regular
        file) has the key this entry keeps: one unpack of the head."""
        dev, ino, mtime, ctime, i_ino, i_mtime, i_size, i_ctime, _, flags, _ = _HEAD.unpack_from(
            self._stamp
        )
        return bool(
            flags & _TRUSTED
            and flags & _HAS_KEY
            and mtime == st.st_mtime_ns
            and ctime == st.st_ctime_ns
            and ino == st.st_ino
            and dev == st.st_dev
            and i_mtime == info.st_mtime_ns
            and i_ctime == info.st_ctime_ns
            and i_ino == info.st_ino
            and i_size == info.st_size
        )

    def info_result(self) -> InfoResult:
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
