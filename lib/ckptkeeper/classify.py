"""Entries of a layout that looks inside its checkpoints (`layouts.Classifier`): the read-only
`layouts.Probe` the layout is handed, and the record the scanner makes of its verdict. The
executor asks again (`look_again`) before it collects a save the plan called garbage."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .info import InfoCache, _read_info
from .layouts import Classifier, Layout, Look, Survey, pin_paths, survey
from .probes import exists, newest_mtime, stale_probe
from .records import Checkpoint, InFlight

__all__ = ["classify_entry", "look_again"]


def classify_entry(
    layout: Layout,
    path: Path,
    st: os.stat_result,
    now: float,
    seen: Survey,
    cache: InfoCache | None,
    stale_before: float | None,
    stats: dict[str, os.stat_result | None] | None = None,
) -> Checkpoint | InFlight:
    """The record of one entry as ``layout`` classifies it: a checkpoint, or a save that is not
    complete (probed for staleness when the layout says it may be collected). ``stats``: files
    inside the entry the caller already stat'ed (None: missing), not stat'ed again."""
    parsed = layout.parse(path.name)
    assert parsed is not None and isinstance(layout, Classifier)
    probe = _EntryProbe(path, st, now, seen, cache, stats)
    look: Look = layout.classify(parsed, probe)
    pinned = any(exists(p) for p in pin_paths(layout, path))
    identity = (st.st_dev, st.st_ino)
    if look.complete:
        return Checkpoint(parsed.step, path, look.info, look.info_error, pinned, identity)
    locked, newest, unreadable = (
        stale_probe(path, layout.writer_lock, stale_before)
        if look.collectable and stat.S_ISDIR(st.st_mode)
        else (None, None, None)
    )
    return InFlight(
        parsed.step,
        path,
        False,
        pinned=pinned,
        identity=identity,
        writer_locked=locked,
        newest_mtime=newest,
        writer_lock_unreadable=unreadable,
        waiting=look.waiting,
        collectable=look.collectable,
        settles_at=look.settles_at,
    )


def look_again(layout: Layout, path: Path, now: float) -> Look | None:
    """A `layouts.Classifier` layout's verdict on ``path`` as it is now (the executor's re-check
    before collecting); None when the layout does not look inside, or ``path`` is gone."""
    if not isinstance(layout, Classifier) or (parsed := layout.parse(path.name)) is None:
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    seen = survey(layout, path.parent, [])
    return layout.classify(parsed, _EntryProbe(path, st, now, seen, None))


class _EntryProbe:
    """`layouts.Probe` over one entry of the root: reads only, never follows a symlink."""

    def __init__(
        self,
        path: Path,
        st: os.stat_result,
        now: float,
        seen: Survey,
        cache: InfoCache | None,
        stats: dict[str, os.stat_result | None] | None = None,
    ) -> None:
        self.path, self.st, self.now, self.survey, self.cache = path, st, now, seen, cache
        self.is_dir = stat.S_ISDIR(st.st_mode)
        self.stats = dict(stats or {})

    def lstat(self, rel: str) -> os.stat_result | None:
        if not self.is_dir:
            return None
        if rel not in self.stats:
            try:
                self.stats[rel] = os.lstat(self.path / rel)
            except OSError:
                self.stats[rel] = None
        return self.stats[rel]

    def exists(self, rel: str) -> bool:
        return self.lstat(rel) is not None

    def read_json(self, rel: str) -> tuple[Mapping[str, Any] | None, str | None]:
        if not self.is_dir:
            return None, f"no {rel}: the checkpoint is a file"
        # The cache is keyed by <root>/<entry>/<file>: only a file right inside the entry.
        cache = self.cache if "/" not in rel else None
        return _read_info(self.path / rel, cache)[0]

    def changed(self, rel: str) -> float | None:
        st = self.st if rel == "" else self.lstat(rel)
        return None if st is None else max(st.st_mtime, st.st_ctime)

    def last_change(self, stop_above: float | None = None) -> float:
        if not self.is_dir:
            return max(self.st.st_mtime, self.st.st_ctime)
        try:
            return newest_mtime(self.path, stop_above=stop_above)
        except OSError:
            return self.now  # vanished or unreadable: as if written just now (never "settled")
