"""ckptkeeper: checkpoint retention where trainers only write.

The NeMo-RL-compatible manager (`CheckpointManager`, `CheckpointingConfig`, `PathLike`,
`_load_checkpoint_history`) plus the pieces the daemon is built from: `scan_root`, `plan`,
`apply_plan`, `purge_trash`, `Policy`, `RootLock`. Imports neither torch, numpy, watchdog,
apscheduler nor structlog.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .effects import (
    OS_FS,
    Fs,
    RootLock,
    move_to_trash,
    write_marker,
    writer_lock,
)
from .execute import Outcome, apply_plan, purge_trash
from .names import Kind, ParsedName, parse_name
from .plan import Action, Decision, Plan, plan
from .policy import Policy, PolicyError, parse_duration
from .pressure import FreeSpace, Pressure
from .records import Anomaly, Checkpoint, InFlight, Leftover, RootScan, TrashEntry
from .removal import Removal, remove_tree
from .scan import InfoCache, read_training_info, scan_root

if TYPE_CHECKING:
    from .manager import (
        CheckpointingConfig,
        CheckpointManager,
        PathLike,
        _load_checkpoint_history,
    )

#: The NeMo-RL-compatible manager (and PyYAML) loads on first use: ``sweep`` and ``status``
#: never need it.
_LAZY = frozenset(
    {"CheckpointingConfig", "CheckpointManager", "PathLike", "_load_checkpoint_history"}
)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import manager

        value = getattr(manager, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "OS_FS",
    "Action",
    "Anomaly",
    "Checkpoint",
    "CheckpointManager",
    "CheckpointingConfig",
    "Decision",
    "FreeSpace",
    "Fs",
    "InFlight",
    "InfoCache",
    "Kind",
    "Leftover",
    "Outcome",
    "ParsedName",
    "PathLike",
    "Plan",
    "Policy",
    "PolicyError",
    "Pressure",
    "Removal",
    "RootLock",
    "RootScan",
    "TrashEntry",
    "_load_checkpoint_history",
    "apply_plan",
    "move_to_trash",
    "parse_duration",
    "parse_name",
    "plan",
    "purge_trash",
    "read_training_info",
    "remove_tree",
    "scan_root",
    "write_marker",
    "writer_lock",
]
__version__ = "0.1.0"
