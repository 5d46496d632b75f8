"""Layouts: how one framework names its checkpoints, signals that one is complete, keeps its
metrics and points at checkpoints that must not go.

A `Layout` only turns directory entries into records: the planner and the executor stay the
same for every framework. Built-in layouts are found by name; third-party layouts register a
zero-argument factory (or an instance) in the entry-point group ``ckptkeeper.layouts``::

    [project.entry-points."ckptkeeper.layouts"]
    my-trainer = "my_package.ckpt_layout:MyLayout"
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..names import Kind, ParsedName
from .nemo_rl import NEMO_RL, NemoRL

__all__ = [
    "DEFAULT_LAYOUT",
    "ENTRY_POINT_GROUP",
    "NEMO_RL",
    "Layout",
    "LayoutError",
    "NemoRL",
    "available_layouts",
    "get_layout",
]

ENTRY_POINT_GROUP = "ckptkeeper.layouts"


@runtime_checkable
class Layout(Protocol):
    """One framework's on-disk conventions. Implementations are immutable and hold no state."""

    @property
    def name(self) -> str: ...

    @property
    def default_marker(self) -> str:
        """The completion marker a writer creates last (a per-root policy may rename it)."""
        ...

    @property
    def info_file(self) -> str:
        """The JSON object file inside a checkpoint that holds its metrics."""
        ...

    @property
    def pin_file(self) -> str:
        """A file inside a checkpoint that pins it (never deleted by policy)."""
        ...

    @property
    def writer_lock(self) -> str:
        """A file a writer may hold ``flock(LOCK_EX)`` on while it writes."""
        ...

    @property
    def config_file(self) -> str:
        """A file inside a checkpoint naming the metric and its direction, or "" for none."""
        ...

    def parse(self, name: str) -> ParsedName | None:
        """The kind and step of a directory entry's name; None for a name outside the grammar
        (never touched)."""
        ...

    def format(self, kind: Kind, step: int) -> str:
        """The canonical name of ``step`` as ``kind``."""
        ...

    def pointers(self, root: Path) -> Mapping[int, str]:
        """Steps the framework points at (e.g. a ``latest`` file), with why: never deleted."""
        ...


class LayoutError(LookupError):
    """An unknown layout name, or an entry point that does not give a layout."""


_BUILTIN: dict[str, Layout] = {NEMO_RL.name: NEMO_RL}
DEFAULT_LAYOUT = NEMO_RL.name


def available_layouts() -> list[str]:
    """Built-in layout names and those registered through the entry-point group."""
    names = set(_BUILTIN)
    names.update(ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def get_layout(name: str) -> Layout:
    """The layout called ``name``: built in, or registered in ``ckptkeeper.layouts``."""
    if name in _BUILTIN:
        return _BUILTIN[name]
    return _registered(name)


@functools.cache  # loaded once per process, as importlib keeps the modules it imports
def _registered(name: str) -> Layout:
    found = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        known = ", ".join(available_layouts())
        raise LayoutError(f"unknown layout {name!r} (known: {known})")
    loaded: Any = found[0].load()
    layout = loaded() if isinstance(loaded, type) or callable(loaded) else loaded
    if not isinstance(layout, Layout):
        raise LayoutError(
            f"entry point {found[0].value!r} in {ENTRY_POINT_GROUP} does not give a Layout"
        )
    return layout
