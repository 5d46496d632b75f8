"""Plain-data records of what is on disk in one checkpoint root.

`scan.scan_root` produces them from a real directory; the planner consumes them and does no I/O,
so planner tests build these records by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .layouts import NEMO_RL, Layout

__all__ = ["Anomaly", "Checkpoint", "InFlight", "Leftover", "RootScan", "TrashEntry"]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A ``step_N`` directory (or a complete ``tmp_step_N``/``old_step_N`` that will become one)."""

    step: int
    path: Path
    info: Mapping[str, Any] | None = None
    info_error: str | None = (
        None  # why training_info.json could not be used (None when info is set)
    )
    pinned: bool = False
    identity: tuple[int, int] = (0, 0)  # (st_dev, st_ino) at scan time, re-checked before deletion
    # A config.yaml is present: known where a listing says so for free (S3); a local scan does
    # not probe for it (None: not looked at). Nothing decides by it.
    config_yaml: bool | None = None


@dataclass(frozen=True, slots=True)
class InFlight:
    """A ``tmp_step_N`` directory: a save in progress, complete, or abandoned."""

    step: int
    path: Path
    complete: bool  # the completion marker exists
    info: Mapping[str, Any] | None = None
    info_error: str | None = None
    pinned: bool = False
    identity: tuple[int, int] = (0, 0)
    writer_locked: bool | None = None  # held, or maybe (writer_lock_unreadable); None: not probed
    # The last change seen in the tree: the newest of mtime and ctime over its entries (a lower
    # bound: the probe stops once it is recent enough); None: not probed.
    newest_mtime: float | None = None
    writer_lock_unreadable: str | None = None  # why the writer lock could not be probed
    # Layouts with a commit signal inside the checkpoint (`layouts.Classifier`): why this save
    # is not complete yet ("" for a nemo-rl tmp_step_N), and whether it may ever be collected.
    waiting: str = ""
    collectable: bool = True
    settles_at: float | None = None  # a settling save counts from then if nothing changes


@dataclass(frozen=True, slots=True)
class Leftover:
    """An ``old_step_N`` directory left by a replace (finalize over an existing ``step_N``)."""

    step: int
    path: Path
    identity: tuple[int, int] = (0, 0)
    info: Mapping[str, Any] | None = None
    info_error: str | None = None
    pinned: bool = False


@dataclass(frozen=True, slots=True)
class TrashEntry:
    path: Path
    trashed_at: float  # seconds since the epoch


@dataclass(frozen=True, slots=True)
class Anomaly:
    """Something with a checkpoint-like name that is not treated as a checkpoint; never touched."""

    path: Path
    reason: str
    step: int | None = None


@dataclass(frozen=True, slots=True)
class RootScan:
    root: Path
    steps: tuple[Checkpoint, ...] = ()
    in_flight: tuple[InFlight, ...] = ()
    leftovers: tuple[Leftover, ...] = ()
    trash: tuple[TrashEntry, ...] = ()
    anomalies: tuple[Anomaly, ...] = ()
    ambiguous_steps: frozenset[int] = field(default_factory=frozenset)
    layout: Layout = NEMO_RL  # how the entries were named (the plan and executor name by it)
    layout_reason: str = ""  # why this layout ("" : the policy's ``layout`` key named it)
    pointers: Mapping[int, str] = field(default_factory=dict)  # steps the trainer points at
