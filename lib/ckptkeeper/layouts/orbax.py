"""The ``orbax`` layout: ``<N>/`` step directories written by Orbax's ``CheckpointManager``.

Orbax writes a step into ``<N>.orbax-checkpoint-tmp-<suffix>`` and renames it to ``<N>`` when
done (on POSIX), then writes ``_CHECKPOINT_METADATA``; object stores get ``commit_success.txt``.
A ``<N>/`` holding either is complete; one holding neither is left alone and reported. A
temporary is garbage once untouched for ``stale_after``. Metrics: ``<N>/metrics/metrics`` (the
JSON item ``save(..., metrics=...)`` writes), else the ``metrics`` of ``_CHECKPOINT_METADATA``, or
the policy's ``metrics_file``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..names import Kind, ParsedName
from .base import Look, Probe, Tunable

__all__ = ["ORBAX", "Orbax"]

_RE = re.compile(r"(?P<digits>[0-9]+)(?P<tmp>\.orbax-checkpoint-tmp(?:-[^/]*)?)?")
METADATA = "_CHECKPOINT_METADATA"
COMMIT = "commit_success.txt"
METRICS = "metrics/metrics"


@dataclass(frozen=True)
class Orbax(Tunable):
    name: str = "orbax"
    default_marker: str = COMMIT
    info_file: str = METADATA
    commit_files: tuple[str, ...] = (COMMIT, METADATA)  # either one makes a step complete

    def parse(self, name: str) -> ParsedName | None:
        m = _RE.fullmatch(name)
        if m is None or len(m["digits"]) > 30:
            return None
        step = int(m["digits"])
        if m["tmp"] is not None:
            return ParsedName(Kind.TMP, step, name, True)
        return ParsedName(Kind.STEP, step, name, name == self.format(Kind.STEP, step))

    def format(self, kind: Kind, step: int) -> str:
        return f"{step}.orbax-checkpoint-tmp" if kind is Kind.TMP else str(step)

    def pointers(self, root: Path) -> Mapping[int, str]:
        return {}

    def classify(self, parsed: ParsedName, probe: Probe) -> Look:
        if parsed.kind is not Kind.STEP:
            return Look(False, waiting="orbax temporary", collectable=True)
        if not (probe.exists(METADATA) or probe.exists(COMMIT)):
            return Look(False, waiting=f"no {METADATA} or {COMMIT}: not committed, kept")
        if self.metrics_file:
            info, why = probe.read_json(self.metrics_file)
            return Look(True, info, why)
        if probe.exists(METRICS):
            info, why = probe.read_json(METRICS)
            return Look(True, info, why)
        meta, _ = probe.read_json(METADATA)
        metrics = meta.get("metrics") if meta is not None else None
        return Look(True, dict(metrics) if isinstance(metrics, dict) else {}, None)


ORBAX = Orbax()
