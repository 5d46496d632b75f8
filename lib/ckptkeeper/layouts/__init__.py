"""Layouts: how one framework names its checkpoints, signals that one is complete, keeps its
metrics and points at checkpoints that must not go.

A `Layout` only turns directory entries into records: the planner and the executor stay the
same for every framework. Built-in layouts are found by name; third-party layouts register a
zero-argument factory (or an instance) in the entry-point group ``ckptkeeper.layouts``::

    [project.entry-points."ckptkeeper.layouts"]
    my-trainer = "my_package.ckpt_layout:MyLayout"
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..names import Kind, ParsedName
from .auto import Auto, Refused
from .base import (
    Classifier,
    Look,
    Probe,
    Reader,
    Resolver,
    Survey,
    Surveyor,
    TextReader,
    commit_files,
)
from .hf_trainer import HF_TRAINER
from .lightning import LIGHTNING
from .nemo_rl import NEMO_RL, NemoRL
from .orbax import ORBAX
from .torchtitan import TORCHTITAN
from .tracked import DEEPSPEED, MEGATRON

__all__ = [
    "AUTO",
    "DEFAULT_LAYOUT",
    "ENTRY_POINT_GROUP",
    "NEMO_RL",
    "Classifier",
    "Layout",
    "LayoutError",
    "Look",
    "NemoRL",
    "Probe",
    "Refused",
    "Resolver",
    "Survey",
    "Surveyor",
    "TextReader",
    "available_layouts",
    "commit_files",
    "configured",
    "file_checkpoints",
    "get_layout",
    "pin_paths",
    "survey",
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


_BUILTIN: dict[str, Layout] = {
    layout.name: layout
    for layout in (NEMO_RL, HF_TRAINER, TORCHTITAN, MEGATRON, DEEPSPEED, ORBAX, LIGHTNING)
}
#: The policy's default. Not ``auto``: an existing root must be kept exactly as before (a root
#: holding another layout's names, or a directory named like an Orbax step, would change).
DEFAULT_LAYOUT = NEMO_RL.name
AUTO = "auto"


def available_layouts() -> list[str]:
    """Built-in layout names and those registered through the entry-point group."""
    from importlib import metadata  # not at import: a sweep of built-in layouts never needs it

    names = {*_BUILTIN, AUTO}
    names.update(ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def get_layout(name: str) -> Layout:
    """The layout called ``name``: built in, ``auto``, or registered in ``ckptkeeper.layouts``."""
    if name in _BUILTIN:
        return _BUILTIN[name]
    if name == AUTO:
        return Auto(lambda: tuple(_BUILTIN.values()))
    return _registered(name)


def configured(name: str, *, metrics_file: str | None, settle_after: float) -> Layout:
    """The layout called ``name`` with a policy's ``metrics_file`` and ``settle_after`` (for the
    layouts that have them; ``auto`` hands them to the layout it picks)."""
    if name == AUTO:
        return Auto(
            lambda: tuple(_with(lay, metrics_file, settle_after) for lay in _BUILTIN.values())
        )
    return _with(get_layout(name), metrics_file, settle_after)


def _with(layout: Layout, metrics_file: str | None, settle_after: float) -> Layout:
    if not dataclasses.is_dataclass(layout):
        return layout
    names = {f.name for f in dataclasses.fields(layout)}
    changes: dict[str, object] = {}
    if "metrics_file" in names and metrics_file != layout.metrics_file:
        changes["metrics_file"] = metrics_file
    if "settle_after" in names and settle_after != layout.settle_after:
        changes["settle_after"] = settle_after
    return dataclasses.replace(layout, **changes) if changes else layout


def file_checkpoints(layout: Layout) -> bool:
    """May a checkpoint of ``layout`` be a regular file (Lightning's ``.ckpt``)?"""
    return bool(getattr(layout, "file_checkpoints", False))


def pin_paths(layout: Layout, path: Path) -> tuple[Path, ...]:
    """Where a pin of the checkpoint at ``path`` may be: inside it, or (file checkpoints)
    ``<name>.KEEP`` beside it."""
    custom = getattr(layout, "pin_paths", None)
    return tuple(custom(path)) if custom is not None else (path / layout.pin_file,)


def survey(
    layout: Layout,
    root: Path,
    names: list[str],
    read: Reader | None = None,
    read_text: TextReader | None = None,
) -> Survey:
    """What ``layout`` reads at the root's top level once per scan (pointers, problems).
    ``read_text`` is given by a storage other than POSIX (an object store): then the layout
    must read through the readers, and a surveyor that cannot is refused (`LayoutError`)."""
    if read_text is None:
        if isinstance(layout, Surveyor):
            return layout.survey(root, names, read)
        return Survey(dict(layout.pointers(root)))
    if isinstance(layout, Surveyor):
        method: Any = layout.survey  # read_text: optional in the protocol (see `Surveyor`)
        if "read_text" not in inspect.signature(method).parameters:
            raise LayoutError(f"layout {layout.name!r} reads its root's files on POSIX only")
        found: Survey = method(root, names, read, read_text=read_text)
        return found
    return Survey()  # `pointers(root)` reads a POSIX path: none on an object store


@functools.cache  # loaded once per process, as importlib keeps the modules it imports
def _registered(name: str) -> Layout:
    from importlib import metadata

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
