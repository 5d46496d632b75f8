"""The one module that owns checkpoint directory names.

The grammar is strict: ``step_<N>``, ``tmp_step_<N>`` and ``old_step_<N>`` where ``<N>`` is one or
more ASCII digits and the whole name must match (``re.fullmatch``).  ``step_1-hf``, ``step_x``,
``step_-1``, ``step_1.bak``, ``step_1e3`` and names with non-ASCII digits (``step_\u0661``) are not
checkpoints and are never touched.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = [
    "Kind",
    "ParsedName",
    "old_name",
    "parse_name",
    "step_name",
    "tmp_name",
]

# [0-9] rather than \d: \d also matches Arabic-Indic and other Unicode digits.
_NAME_RE = re.compile(r"(?P<prefix>step_|tmp_step_|old_step_)(?P<digits>[0-9]+)")


class Kind(enum.Enum):
    STEP = "step"
    TMP = "tmp"
    OLD = "old"


_PREFIX_KIND = {"step_": Kind.STEP, "tmp_step_": Kind.TMP, "old_step_": Kind.OLD}


@dataclass(frozen=True, slots=True)
class ParsedName:
    kind: Kind
    step: int
    name: str

    @property
    def canonical(self) -> bool:
        """True when the digits have no leading zeros (``step_7``, not ``step_07``)."""
        return self.name == _format(self.kind, self.step)


def parse_name(name: str) -> ParsedName | None:
    """Parse a directory entry name; ``None`` for anything that is not a checkpoint name."""
    match = _NAME_RE.fullmatch(name)
    if match is None:
        return None
    try:
        step = int(match["digits"])
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        return None
    return ParsedName(_PREFIX_KIND[match["prefix"]], step, name)


def _format(kind: Kind, step: int) -> str:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    prefix = {Kind.STEP: "step_", Kind.TMP: "tmp_step_", Kind.OLD: "old_step_"}[kind]
    return f"{prefix}{step}"


def step_name(step: int) -> str:
    return _format(Kind.STEP, step)


def tmp_name(step: int) -> str:
    return _format(Kind.TMP, step)


def old_name(step: int) -> str:
    return _format(Kind.OLD, step)
