"""What a parsed checkpoint name is, whatever the layout: its kind and its step.

A layout (`ckptkeeper.layouts`) owns the spellings; this module only holds the types they
produce. ``parse_name``, ``step_name``, ``tmp_name`` and ``old_name`` are the ``nemo-rl``
layout's, kept for callers of the first API.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "Kind",
    "ParsedName",
    "old_name",
    "parse_name",
    "step_name",
    "tmp_name",
]


class Kind(enum.Enum):
    STEP = "step"  # a complete checkpoint
    TMP = "tmp"  # a save in progress (complete once its marker exists)
    OLD = "old"  # the previous copy during a replace


@dataclass(frozen=True, slots=True)
class ParsedName:
    kind: Kind
    step: int
    name: str
    #: The layout's own spelling of this step (``step_7``, not ``step_07``).
    canonical: bool = field(default=True, compare=False)


def parse_name(name: str) -> ParsedName | None:
    """The ``nemo-rl`` layout's parse: None for anything that is not a checkpoint name."""
    return NEMO_RL.parse(name)


def step_name(step: int) -> str:
    return NEMO_RL.format(Kind.STEP, step)


def tmp_name(step: int) -> str:
    return NEMO_RL.format(Kind.TMP, step)


def old_name(step: int) -> str:
    return NEMO_RL.format(Kind.OLD, step)


from .layouts.nemo_rl import NEMO_RL  # noqa: E402  (the layout module imports the types above)
