"""The ``auto`` layout: picks the one built-in layout whose names are in the root.

A root where no layout's names appear is ``nemo-rl`` (the manager's, and what an empty root will
hold). A root where two layouts' names appear is refused: nothing in it is parsed, so nothing is
touched, and the scan reports both, with an example name of each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..names import Kind, ParsedName
from .base import COMPLETE_MARKER, Conventions
from .nemo_rl import NEMO_RL

__all__ = ["Auto", "Refused"]

# Root-level files that alone say which trainer wrote the root (before its first checkpoint).
_TRACKERS = {"latest_checkpointed_iteration.txt": "megatron", "latest": "deepspeed"}


@dataclass(frozen=True)
class Refused(Conventions):
    """Two layouts' names in one root: parses nothing, so nothing is touched."""

    reason: str
    name: str = "auto"
    default_marker: str = COMPLETE_MARKER
    info_file: str = NEMO_RL.info_file  # what an empty root is assumed to hold

    def parse(self, name: str) -> ParsedName | None:
        return None

    def format(self, kind: Kind, step: int) -> str:
        raise ValueError(f"layout refused: {self.reason}")

    def pointers(self, root: Path) -> Mapping[int, str]:
        return {}


@dataclass(frozen=True)
class Auto(Conventions):
    candidates: Callable[[], Sequence[Any]]  # the built-in layouts, configured
    name: str = "auto"
    default_marker: str = COMPLETE_MARKER
    info_file: str = NEMO_RL.info_file  # what an empty root is assumed to hold

    def parse(self, name: str) -> ParsedName | None:
        return None  # resolve() is always asked first

    def format(self, kind: Kind, step: int) -> str:
        raise ValueError("the auto layout names nothing: it resolves to a layout first")

    def pointers(self, root: Path) -> Mapping[int, str]:
        return {}

    def resolve(self, names: Sequence[str]) -> tuple[Any, str]:
        found: dict[str, tuple[Any, str]] = {}
        for layout in self.candidates():
            example = next((n for n in names if layout.parse(n) is not None), None)
            if example is None:
                example = next((n for n in names if _TRACKERS.get(n) == layout.name), None)
            if example is not None:
                found[layout.name] = (layout, example)
        if len(found) == 1:
            [(layout, example)] = found.values()
            return layout, f"auto: {example} is a {layout.name} name"
        if not found:
            default = next(lay for lay in self.candidates() if lay.name == NEMO_RL.name)
            return default, f"auto: no checkpoint names yet, {NEMO_RL.name} assumed"
        both = ", ".join(f"{name} ({example})" for name, (_, example) in sorted(found.items()))
        why = f"auto: names of several layouts in one root: {both}; set layout to choose"
        return Refused(why), why
