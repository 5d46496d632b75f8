"""Read one ``s3://`` root into records: one listing, reads only where an ETag changed.

The root's prefix is listed once per pass (``ListObjectsV2``, 1,000 keys a page). Each key is
filed under the first name below the root; a name the layout does not parse is never touched.
What a POSIX scan learns by ``lstat`` comes from the listing: the commit marker, the pin, the
config file, each save's last write (its newest ``LastModified``). The metrics file is fetched
only when its ETag differs from the one parsed before (`s3look.ReadCache`), so a pass over a
root where nothing changed costs one listing request and no reads. A layout that looks inside
its checkpoints, reads a tracker or is ``auto`` gets the same hooks as on POSIX (`s3look`).

Name-only layouts (``nemo-rl``):

- ``step_N/`` with the commit marker: a checkpoint. Without it: a save in flight, collected once
  untouched for ``stale_after`` (object stores have no writer lock).
- A name under ``.ckptkeeper/tombstones/``: a delete that was decided (trash); its prefix is no
  checkpoint whatever it holds, and the next purge finishes it.
- ``tmp_step_N/`` with a marker, ``old_step_N/``: anomalies (no rename on an object store).
- A key with a ``.`` or ``..`` segment, or an empty one inside, makes its checkpoint an anomaly:
  tools that normalise paths would read it elsewhere, so deleting it is not ours to decide.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .layouts import (
    Classifier,
    Layout,
    LayoutError,
    Look,
    Refused,
    Resolver,
    Survey,
    file_checkpoints,
)
from .layouts import survey as layout_survey
from .names import Kind, ParsedName
from .records import Anomaly, Checkpoint, InFlight, RootScan, TrashEntry
from .s3client import os_error
from .s3look import ObjectInfo, ReadCache, S3Probe, S3Reads, parse_info

__all__ = [
    "TOMBSTONES",
    "EtagCache",
    "Listing",
    "ObjectInfo",
    "S3RootFiles",
    "list_root",
    "look_at",
    "parse_info",
    "records_of",
]

TOMBSTONES = ".ckptkeeper/tombstones/"
EtagCache = ReadCache  # the name it had


@dataclass
class Listing:
    """One listing of a root: keys grouped by their first name below it (any name: which are
    checkpoints is decided once the layout is known, ``auto`` resolves from these names)."""

    groups: dict[str, dict[str, ObjectInfo]] = field(default_factory=lambda: defaultdict(dict))
    top: dict[str, ObjectInfo] = field(default_factory=dict)  # objects right at the root
    tombstones: dict[str, float] = field(default_factory=dict)
    requests: int = 0

    def find(self, rel: str) -> ObjectInfo | None:
        """The object ``rel`` (a key below the root), None when the listing has none."""
        first, sep, rest = rel.partition("/")
        return self.groups.get(first, {}).get(rest) if sep else self.top.get(first)


class S3RootFiles:
    """`storage.RootFiles` of one listing: keys are (ETag, size), reads go through the cache.
    Without a listing (the root could not be listed: ``error``) nothing is known."""

    def __init__(self, listing: Listing | None, reads: S3Reads, error: str = "") -> None:
        self.listing, self.reads, self.error = listing, reads, error

    def key(self, rel: str) -> tuple[object, ...] | None:
        if self.listing is None:
            return None
        found = self.listing.find(rel)
        return () if found is None else (found.etag, found.size)

    def names_key(self) -> tuple[object, ...] | None:
        if self.listing is None:
            return None
        names = sorted(self.dirs())
        return (len(names), hash(tuple(names)))

    def read(self, rel: str, limit: int) -> bytes | str | None:
        if self.listing is None:
            return f"cannot read: {self.error}"
        return self.reads.raw(rel, self.listing.find(rel), limit)

    def dirs(self) -> list[str]:
        if self.listing is None:
            return []
        return [name for name in self.listing.groups if name not in self.listing.tombstones]


def list_root(client: Any, bucket: str, base: str, layout: Layout, where: str) -> Listing:
    """One (paginated) listing of the root's prefix ``base`` (ending in ``/`` or empty)."""
    out = Listing()
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
            out.requests += 1
            for obj in page.get("Contents", ()):
                _file(out, str(obj["Key"])[len(base) :], obj)
    except Exception as exc:
        raise os_error(exc, where) from None
    return out


def _file(out: Listing, rel: str, obj: Any) -> None:
    first, sep, rest = rel.partition("/")
    if first == ".ckptkeeper":
        if rel.startswith(TOMBSTONES) and "/" not in rel[len(TOMBSTONES) :]:
            out.tombstones[rel[len(TOMBSTONES) :]] = obj["LastModified"].timestamp()
        return
    found = ObjectInfo(
        str(obj.get("ETag", "")), int(obj.get("Size", 0)), obj["LastModified"].timestamp()
    )
    if not sep:
        out.top[first] = found
        return
    out.groups[first][rest] = found


def _hostile(rest: str) -> bool:
    segments = rest.split("/")
    inner = segments[:-1]  # a trailing "" is a "folder" object (key ending in "/"): harmless
    return any(s in (".", "..") for s in segments) or any(s == "" for s in inner)


class _Records:
    """The records of one listing (`records_of`)."""

    def __init__(self, listing: Listing, root: Path, reads: S3Reads, now: float) -> None:
        self.listing, self.root, self.reads, self.now = listing, root, reads, now
        self.steps: list[Checkpoint] = []
        self.in_flight: list[InFlight] = []
        self.anomalies: list[Anomaly] = []
        self.survey = Survey()
        self.reason = ""

    def odd(self, name: str, why: str, step: int | None = None) -> None:
        self.anomalies.append(Anomaly(self.root / name, why, step))

    def look_around(self, layout: Layout) -> Layout:
        """As a POSIX scan: ``auto`` picks the layout from the root's names, a layout that looks
        inside reads its root-level files (through the listing and the ETag cache)."""
        names = sorted({*self.listing.groups, *self.listing.top})
        if isinstance(layout, Resolver):
            layout, self.reason = layout.resolve(names)
            if isinstance(layout, Refused):
                self.anomalies.append(Anomaly(self.root, layout.reason))
        if file_checkpoints(layout):
            why = f"layout {layout.name!r} keeps checkpoints as files: not supported on S3"
            self.anomalies.append(Anomaly(self.root, why))
            return Refused(why)
        if isinstance(layout, Classifier):
            read, read_text = self.reads.by_path(self.root, self.listing.find)
            try:
                self.survey = layout_survey(layout, self.root, names, read, read_text)
            except LayoutError as exc:
                self.anomalies.append(Anomaly(self.root, f"{exc}: not used on S3"))
                return Refused(str(exc))
            for name, why in self.survey.problems:
                self.odd(name, why)
        return layout

    def probe(self, name: str, files: dict[str, ObjectInfo]) -> S3Probe:
        def read(rel: str, found: ObjectInfo | None) -> Any:
            return self.reads.json(f"{name}/{rel}", found)

        return S3Probe(self.root / name, files, self.now, self.survey, read)

    def classified(
        self, layout: Layout, parsed: ParsedName, files: dict[str, ObjectInfo], stale: bool
    ) -> None:
        """An entry of a layout that looks inside, as `classify.classify_entry` makes it."""
        assert isinstance(layout, Classifier)
        path = self.root / parsed.name
        probe = self.probe(parsed.name, files)
        look = layout.classify(parsed, probe)
        pinned = layout.pin_file in files
        if look.complete:
            self.steps.append(Checkpoint(parsed.step, path, look.info, look.info_error, pinned))
            return
        probed = stale and look.collectable
        self.in_flight.append(
            InFlight(
                parsed.step, path, False, pinned=pinned,
                writer_locked=False if probed else None,  # no writer locks on an object store
                newest_mtime=probe.last_change() if probed else None,
                waiting=look.waiting, collectable=look.collectable,
            )
        )  # fmt: skip


def look_at(
    listing: Listing, root: Path, layout: Layout, parsed: ParsedName, reads: S3Reads, now: float
) -> Look:
    """A `layouts.Classifier` layout's verdict on one entry of a listing (its survey read too)."""
    out = _Records(listing, root, reads, now)
    resolved = out.look_around(layout)
    if not isinstance(resolved, Classifier):
        return Look(False, waiting="not classified on S3: kept")
    return resolved.classify(parsed, out.probe(parsed.name, listing.groups[parsed.name]))


def records_of(
    listing: Listing,
    root: Path,
    layout: Layout,
    marker: str,
    reads: S3Reads,
    stale_before: float | None,
    now: float,
) -> RootScan:
    """Records of a listing (metrics and the files a layout looks at read through ``reads``)."""
    out = _Records(listing, root, reads, now)
    layout = out.look_around(layout)
    classifier = isinstance(layout, Classifier)
    for name in listing.top:
        if (parsed := layout.parse(name)) is not None:
            out.odd(name, "an object, not a prefix: not a checkpoint", parsed.step)
    by_step: dict[tuple[int, Kind], list[ParsedName]] = defaultdict(list)
    for name in listing.groups:
        parsed = layout.parse(name)
        if parsed is not None and name not in listing.tombstones:
            by_step[(parsed.step, parsed.kind)].append(parsed)
    ambiguous: set[int] = set()
    for (step, kind), group in sorted(by_step.items(), key=lambda kv: (kv[0][0], kv[0][1].value)):
        if len(group) > 1:
            both = " and ".join(sorted(p.name for p in group))
            for p in group:
                out.odd(p.name, f"ambiguous: {both} name one step", step)
            ambiguous.add(step)
            continue
        parsed = group[0]
        name = parsed.name
        files = listing.groups[name]
        why = _odd(files, kind, marker) if not classifier else _hostile_files(files)
        if why is not None:
            out.odd(name, why, step)
            continue
        if classifier:
            out.classified(layout, parsed, files, stale_before is not None)
            continue
        info, info_error = reads.json(f"{name}/{layout.info_file}", files.get(layout.info_file))
        pinned = layout.pin_file in files
        if marker in files and kind is Kind.STEP:
            has_config = bool(layout.config_file) and layout.config_file in files
            out.steps.append(
                Checkpoint(step, root / name, info, info_error, pinned, (0, 0), has_config)
            )
            continue
        newest = max(o.mtime for o in files.values()) if stale_before is not None else None
        locked = False if stale_before is not None else None
        out.in_flight.append(
            InFlight(step, root / name, False, info, info_error, pinned, (0, 0), locked, newest)
        )
    return RootScan(
        root, tuple(out.steps), tuple(out.in_flight), (), _trash(listing, root, layout),
        tuple(out.anomalies + _odd_tombstones(listing, root, layout)), frozenset(ambiguous),
        layout=layout, layout_reason=out.reason, pointers=out.survey.pointers,
    )  # fmt: skip


def _trash(listing: Listing, root: Path, layout: Layout) -> tuple[TrashEntry, ...]:
    return tuple(
        TrashEntry(root / ".ckptkeeper" / "tombstones" / name, when)
        for name, when in sorted(listing.tombstones.items())
        if layout.parse(name) is not None
    )


def _odd_tombstones(listing: Listing, root: Path, layout: Layout) -> list[Anomaly]:
    return [
        Anomaly(root / ".ckptkeeper" / "tombstones" / name, "tombstone of no checkpoint name")
        for name in sorted(listing.tombstones)
        if layout.parse(name) is None
    ]


_HOSTILE = "a key with a '.', '..' or empty segment: not treated as a checkpoint"


def _hostile_files(files: dict[str, ObjectInfo]) -> str | None:
    return _HOSTILE if any(_hostile(rest) for rest in files) else None


def _odd(files: dict[str, ObjectInfo], kind: Kind, marker: str) -> str | None:
    if any(_hostile(rest) for rest in files):
        return _HOSTILE
    if kind is Kind.OLD:
        return "leftover of a rename: object stores have no rename, left alone"
    if kind is Kind.TMP and marker in files:
        return "complete tmp prefix: object stores have no rename (write step_N/, marker last)"
    return None
