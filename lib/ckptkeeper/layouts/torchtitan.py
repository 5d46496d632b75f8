"""The ``torchtitan`` layout: ``step-<N>/`` written by ``torch.distributed.checkpoint`` (DCP).

DCP writes ``.metadata`` last (the coordinator, after every rank's data files), so a ``step-N``
holding it is complete; one without it is a save in progress, or abandoned: garbage once untouched
for ``stale_after``. DCP keeps no metrics: ranking is by recency unless the policy's
``metrics_file`` names a JSON file inside each checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..names import Kind, ParsedName
from .base import Look, Probe, Tunable, metrics_or_empty, parse_step

__all__ = ["TORCHTITAN", "Torchtitan"]

_RE = re.compile(r"step-([0-9]+)")


@dataclass(frozen=True)
class Torchtitan(Tunable):
    name: str = "torchtitan"
    default_marker: str = ".metadata"
    info_file: str = ".metadata"
    commit_files: tuple[str, ...] = (".metadata",)

    def parse(self, name: str) -> ParsedName | None:
        m = _RE.fullmatch(name)
        return parse_step(None if m is None else m[1], name, self._canonical)

    def _canonical(self, step: int) -> str:
        return self.format(Kind.STEP, step)

    def format(self, kind: Kind, step: int) -> str:
        return f"step-{step}"

    def pointers(self, root: Path) -> Mapping[int, str]:
        return {}

    def classify(self, parsed: ParsedName, probe: Probe) -> Look:
        if not probe.exists(".metadata"):
            return Look(False, waiting="no .metadata (DCP writes it last)", collectable=True)
        info, why = metrics_or_empty(probe, self.metrics_file)
        return Look(True, info, why)


TORCHTITAN = Torchtitan()
