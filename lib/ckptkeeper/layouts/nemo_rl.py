"""The ``nemo-rl`` layout: NeMo-RL's checkpoint directory, the one place its names are spelled.

The grammar is strict: ``step_<N>`` (a finalized checkpoint), ``tmp_step_<N>`` (a save in
progress, complete once its marker exists) and ``old_step_<N>`` (transient, during a replace),
where ``<N>`` is one or more ASCII digits and the whole name must match (``re.fullmatch``).
``step_1-hf``, ``step_x``, ``step_-1``, ``step_1.bak``, ``step_1e3`` and names with non-ASCII
digits (``step_\u0661``) are not checkpoints and are never touched. Metrics live in
``training_info.json``; the run's ``config.yaml`` names the metric; ``KEEP`` pins a step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..names import Kind, ParsedName
from .base import COMPLETE_MARKER, Conventions

__all__ = ["NEMO_RL", "NemoRL"]

_PREFIXES = {Kind.STEP: "step_", Kind.TMP: "tmp_step_", Kind.OLD: "old_step_"}
_KIND_OF = {prefix: kind for kind, prefix in _PREFIXES.items()}


@dataclass(frozen=True)
class NemoRL(Conventions):
    name: str = "nemo-rl"
    default_marker: str = COMPLETE_MARKER
    info_file: str = "training_info.json"
    config_file: str = field(default="config.yaml", kw_only=True)  # names the metric
    # [0-9] rather than \d: \d also matches Arabic-Indic and other Unicode digits.
    _pattern: re.Pattern[str] = field(
        default=re.compile(r"(?P<prefix>step_|tmp_step_|old_step_)(?P<digits>[0-9]+)"),
        repr=False,
    )

    def parse(self, name: str) -> ParsedName | None:
        match = self._pattern.fullmatch(name)
        if match is None:
            return None
        prefix, digits = match.group("prefix", "digits")
        try:
            step = int(digits)
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            return None
        # Canonical (``format(kind, step)``, i.e. prefix + str(step)): no leading zeros.
        return ParsedName(_KIND_OF[prefix], step, name, digits == str(step))

    def format(self, kind: Kind, step: int) -> str:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return f"{_PREFIXES[kind]}{step}"

    def glob(self, kind: Kind) -> str:
        """A shell pattern that every ``kind`` name matches (and more: `parse` decides)."""
        return f"{_PREFIXES[kind]}*"

    def pointers(self, root: Path) -> Mapping[int, str]:
        return {}  # NeMo-RL keeps no pointer file: the latest step is kept by keep_latest


NEMO_RL = NemoRL()
