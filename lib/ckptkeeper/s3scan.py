"""Read one ``s3://`` root into records: one listing, reads only where an ETag changed.

The root's prefix is listed once per pass (``ListObjectsV2``, 1,000 keys a page). Each key is
filed under the first name below the root; a name the layout does not parse is never touched.
What a POSIX scan learns by ``lstat`` comes from the listing: the commit marker, the pin, the
config file, each save's last write (its newest ``LastModified``). The metrics file is fetched
only when its ETag differs from the one parsed before (`EtagCache`), so a pass over a root where
nothing changed costs one listing request and no reads.

- ``step_N/`` with the commit marker: a checkpoint. Without it: a save in flight, collected once
  untouched for ``stale_after`` (object stores have no writer lock).
- A name under ``.ckptkeeper/tombstones/``: a delete that was decided (trash); its prefix is no
  checkpoint whatever it holds, and the next purge finishes it.
- ``tmp_step_N/`` with a marker, ``old_step_N/``: anomalies (no rename on an object store).
- A key with a ``.`` or ``..`` segment, or an empty one inside, makes its checkpoint an anomaly:
  tools that normalise paths would read it elsewhere, so deleting it is not ours to decide.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .info import MAX_INFO_BYTES
from .layouts import Layout
from .names import Kind
from .records import Anomaly, Checkpoint, InFlight, RootScan, TrashEntry
from .s3client import os_error

__all__ = ["TOMBSTONES", "EtagCache", "ObjectInfo", "list_root", "records_of"]

TOMBSTONES = ".ckptkeeper/tombstones/"
_InfoResult = tuple[dict[str, Any] | None, str | None]


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    etag: str
    size: int
    mtime: float


@dataclass
class Listing:
    groups: dict[str, dict[str, ObjectInfo]] = field(default_factory=lambda: defaultdict(dict))
    tombstones: dict[str, float] = field(default_factory=dict)
    objects: list[str] = field(default_factory=list)  # checkpoint-named objects (not prefixes)
    requests: int = 0


class EtagCache:
    """Parsed metrics files by key, valid while the ETag is the same."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parsed: dict[str, tuple[str, _InfoResult]] = {}
        self.reads = 0

    def get(self, key: str, etag: str) -> _InfoResult | None:
        with self._lock:
            hit = self._parsed.get(key)
        return hit[1] if hit is not None and hit[0] == etag else None

    def put(self, key: str, etag: str, result: _InfoResult) -> None:
        with self._lock:
            self._parsed[key] = (etag, result)
            self.reads += 1


def list_root(client: Any, bucket: str, base: str, layout: Layout, where: str) -> Listing:
    """One (paginated) listing of the root's prefix ``base`` (ending in ``/`` or empty)."""
    out = Listing()
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
            out.requests += 1
            for obj in page.get("Contents", ()):
                _file(out, str(obj["Key"])[len(base) :], obj, layout)
    except Exception as exc:
        raise os_error(exc, where) from None
    return out


def _file(out: Listing, rel: str, obj: Any, layout: Layout) -> None:
    first, sep, rest = rel.partition("/")
    if first == ".ckptkeeper":
        if rel.startswith(TOMBSTONES) and "/" not in rel[len(TOMBSTONES) :]:
            out.tombstones[rel[len(TOMBSTONES) :]] = obj["LastModified"].timestamp()
        return
    if layout.parse(first) is None:
        return  # not a checkpoint name: never touched
    if not sep:
        out.objects.append(first)
        return
    mtime = obj["LastModified"].timestamp()
    out.groups[first][rest] = ObjectInfo(str(obj.get("ETag", "")), int(obj.get("Size", 0)), mtime)


def _hostile(rest: str) -> bool:
    segments = rest.split("/")
    inner = segments[:-1]  # a trailing "" is a "folder" object (key ending in "/"): harmless
    return any(s in (".", "..") for s in segments) or any(s == "" for s in inner)


def records_of(
    listing: Listing,
    root: Path,
    layout: Layout,
    marker: str,
    read_info: Any,
    stale_before: float | None,
) -> RootScan:
    """Records of a listing; ``read_info(name, ObjectInfo)`` reads a metrics file."""
    steps: list[Checkpoint] = []
    in_flight: list[InFlight] = []
    anomalies: list[Anomaly] = []
    for name in listing.objects:
        parsed = layout.parse(name)
        step = parsed.step if parsed is not None else None
        anomalies.append(Anomaly(root / name, "an object, not a prefix: not a checkpoint", step))
    by_step: dict[tuple[int, Kind], list[str]] = defaultdict(list)
    for name in listing.groups:
        parsed = layout.parse(name)
        if parsed is not None and name not in listing.tombstones:
            by_step[(parsed.step, parsed.kind)].append(name)
    ambiguous: set[int] = set()
    for (step, kind), names in sorted(by_step.items(), key=lambda kv: (kv[0][0], kv[0][1].value)):
        if len(names) > 1:
            both = " and ".join(sorted(names))
            anomalies += [
                Anomaly(root / n, f"ambiguous: {both} name one step", step) for n in names
            ]
            ambiguous.add(step)
            continue
        name = names[0]
        files = listing.groups[name]
        why = _odd(files, kind, marker)
        if why is not None:
            anomalies.append(Anomaly(root / name, why, step))
            continue
        info, info_error = _info(files, layout, name, read_info)
        pinned = layout.pin_file in files
        if marker in files and kind is Kind.STEP:
            has_config = bool(layout.config_file) and layout.config_file in files
            steps.append(
                Checkpoint(step, root / name, info, info_error, pinned, (0, 0), has_config)
            )
            continue
        newest = max(o.mtime for o in files.values()) if stale_before is not None else None
        locked = False if stale_before is not None else None
        in_flight.append(
            InFlight(step, root / name, False, info, info_error, pinned, (0, 0), locked, newest)
        )
    trash = [
        TrashEntry(root / ".ckptkeeper" / "tombstones" / name, when)
        for name, when in sorted(listing.tombstones.items())
        if layout.parse(name) is not None
    ]
    anomalies += [
        Anomaly(root / ".ckptkeeper" / "tombstones" / name, "tombstone of no checkpoint name")
        for name in sorted(listing.tombstones)
        if layout.parse(name) is None
    ]
    return RootScan(
        root, tuple(steps), tuple(in_flight), (), tuple(trash), tuple(anomalies),
        frozenset(ambiguous), layout=layout,
    )  # fmt: skip


def _odd(files: dict[str, ObjectInfo], kind: Kind, marker: str) -> str | None:
    if any(_hostile(rest) for rest in files):
        return "a key with a '.', '..' or empty segment: not treated as a checkpoint"
    if kind is Kind.OLD:
        return "leftover of a rename: object stores have no rename, left alone"
    if kind is Kind.TMP and marker in files:
        return "complete tmp prefix: object stores have no rename (write step_N/, marker last)"
    return None


def _info(files: dict[str, ObjectInfo], layout: Layout, name: str, read_info: Any) -> _InfoResult:
    found = files.get(layout.info_file)
    if found is None:
        return None, f"no {layout.info_file}"
    if found.size > MAX_INFO_BYTES:
        return None, f"{layout.info_file} too large ({found.size} bytes > {MAX_INFO_BYTES})"
    result: _InfoResult = read_info(name, found)
    return result


def parse_info(raw: bytes, file_name: str) -> _InfoResult:
    """Metrics JSON as `info` parses it: NaN/Infinity kept as floats, an object required."""
    try:
        data = json.loads(raw, parse_constant=float)
    except (ValueError, RecursionError) as exc:
        return None, f"{file_name} is not valid JSON: {str(exc)[:80]}"
    if not isinstance(data, dict):
        return None, f"{file_name} is not a JSON object ({type(data).__name__})"
    return data, None
