"""What a layout sees of an ``s3://`` root: the same hooks as on POSIX, answered from the listing.

A layout that looks inside its checkpoints (`layouts.Classifier`) or reads a file at the root
(`layouts.Surveyor`, ``auto``) works on S3 unchanged: its `layouts.Probe` is answered from the
pass's one listing (a key's existence, size, ``LastModified`` and ETag), and the few small files
it reads (a metrics file, ``trainer_state.json``, a tracker) are fetched only when their ETag
differs from the one read before (`ReadCache`). A root where nothing changed costs its listing
and no reads, whatever the layout.

What a POSIX probe learns from directory times comes from the keys: an entry's last change
(``changed("")``) and its tree's (``last_change``) are the newest ``LastModified`` under its
prefix. An object store has no symlinks, so there is nothing to not follow.
"""

from __future__ import annotations

import errno
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from .info import MAX_INFO_BYTES
from .layouts import Survey
from .s3client import os_error

__all__ = [
    "MAX_CACHED_RAW",
    "MAX_TEXT_BYTES",
    "ObjectInfo",
    "ReadCache",
    "S3Probe",
    "S3Reads",
    "parse_info",
]

Info = tuple[Any, str | None]
Text = tuple[str | None, str]
_Result = TypeVar("_Result", Info, Text)
MAX_TEXT_BYTES = 4096  # a tracker file (as on POSIX)
MAX_CACHED_RAW = 64 * 1024  # a run's ckptkeeper.toml is kept; a large config.yaml is not


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    etag: str
    size: int
    mtime: float


class ReadCache:
    """What was read of small objects by (kind, key), valid while the ETag is the same."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parsed: dict[tuple[str, str], tuple[str, Any]] = {}
        self.reads = 0

    def get(self, key: str, etag: str, kind: str = "json") -> Any:
        with self._lock:
            hit = self._parsed.get((kind, key))
        return hit[1] if hit is not None and hit[0] == etag else None

    def put(self, key: str, etag: str, result: Any, kind: str = "json") -> None:
        with self._lock:
            self._parsed[(kind, key)] = (etag, result)
            self.reads += 1


def parse_info(raw: bytes, file_name: str) -> Info:
    """Metrics JSON as `info` parses it: NaN/Infinity kept as floats, an object required."""
    try:
        data = json.loads(raw, parse_constant=float)
    except (ValueError, RecursionError) as exc:
        return None, f"{file_name} is not valid JSON: {str(exc)[:80]}"
    if not isinstance(data, dict):
        return None, f"{file_name} is not a JSON object ({type(data).__name__})"
    return data, None


def _text(raw: bytes, label: str) -> Text:
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError:
        return None, f"{label} is not text"


class S3Reads:
    """ETag-keyed GETs of the small objects of one root, by their key below the root."""

    def __init__(self, client: Any, bucket: str, base: str, cache: ReadCache) -> None:
        self.client, self.bucket, self.base, self.cache = client, bucket, base, cache

    def json(self, rel: str, found: ObjectInfo | None) -> Info:
        return self._get(rel, found, "json", MAX_INFO_BYTES, parse_info)

    def text(self, rel: str, found: ObjectInfo | None) -> Text:
        return self._get(rel, found, "text", MAX_TEXT_BYTES, _text)

    def _get(
        self,
        rel: str,
        found: ObjectInfo | None,
        kind: str,
        limit: int,
        parse: Callable[[bytes, str], _Result],
    ) -> _Result | tuple[None, str]:
        """(content, why not) of a small object: a metrics file (``json``) or a tracker
        (``text``), fetched and parsed once per ETag."""
        label = PurePosixPath(rel).name
        if found is None:
            return None, f"no {label}"
        if found.size > limit:
            detail = f" ({found.size} bytes > {limit})" if kind == "json" else ""
            return None, f"{label} too large{detail}"
        key = self.base + rel
        if (hit := self.cache.get(key, found.etag, kind)) is not None:
            return hit  # type: ignore[no-any-return]
        try:
            raw = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception as exc:
            return None, f"{label} unreadable: {os_error(exc, key).strerror}"
        result = parse(raw, label)
        self.cache.put(key, found.etag, result, kind)
        return result

    def raw(self, rel: str, found: ObjectInfo | None, limit: int) -> bytes | str | None:
        """The bytes of a small object (cached by ETag up to `MAX_CACHED_RAW`); None when
        absent; why not otherwise."""
        if found is None:
            return None
        if found.size > limit:
            return f"larger than {limit} bytes"
        key = self.base + rel
        if (hit := self.cache.get(key, found.etag, "raw")) is not None:
            return hit  # type: ignore[no-any-return]
        try:
            raw: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception as exc:
            error = os_error(exc, key)
            return None if error.errno == errno.ENOENT else f"cannot read: {error.strerror}"
        if len(raw) > limit:
            return f"larger than {limit} bytes"
        if len(raw) <= MAX_CACHED_RAW:
            self.cache.put(key, found.etag, raw, "raw")
        return raw

    def by_path(
        self, root: Path, find: Callable[[str], ObjectInfo | None]
    ) -> tuple[Callable[[Path], Info], Callable[[Path], Text]]:
        """The (JSON, text) readers a layout's survey gets: a path under ``root`` is looked up
        in the listing (``find``) and read through the cache."""

        def rel_of(path: Path) -> str:
            return PurePosixPath(path).relative_to(PurePosixPath(root)).as_posix()

        def read(path: Path) -> Info:
            rel = rel_of(path)
            return self.json(rel, find(rel))

        def read_text(path: Path) -> Text:
            rel = rel_of(path)
            return self.text(rel, find(rel))

        return read, read_text


class S3Probe:
    """`layouts.Probe` over the keys of one prefix (``files``: key below the prefix -> info)."""

    is_dir = True

    def __init__(
        self,
        path: Path,
        files: Mapping[str, ObjectInfo],
        now: float,
        survey: Survey,
        read: Callable[[str, ObjectInfo | None], Info],
    ) -> None:
        self.path, self.files, self.now, self.survey = path, files, now, survey
        self._read = read

    def exists(self, rel: str) -> bool:
        rel = rel.rstrip("/")
        return rel in self.files or any(k.startswith(rel + "/") for k in self.files)

    def read_json(self, rel: str) -> Info:
        return self._read(rel, self.files.get(rel))

    def last_change(self, stop_above: float | None = None) -> float:
        return max((o.mtime for o in self.files.values()), default=self.now)

    def changed(self, rel: str) -> float | None:
        if rel == "":
            return self.last_change()
        found = self.files.get(rel)
        return None if found is None else found.mtime
