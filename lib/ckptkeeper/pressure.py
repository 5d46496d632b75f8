"""Disk pressure (DESIGN section 13): which checkpoints ``min_free`` may delete, in which order.

Pure, like the planner that uses it: the free space and the checkpoints' sizes come in a
`FreeSpace` measured by the pass (`ckptkeeper.space`), as ``now`` does.

While the filesystem's free space is below ``min_free``, the planner deletes beyond what the other
rules ask, worst first (unranked, then the worst metric, then the oldest), counting what each
deletion gives back, until the free space expected after the pass is back at ``min_free`` or only
protected checkpoints remain. Protected, always: pinned steps, the latest, the single best by the
metric, milestones (``keep_every_n_steps``), saves being finalized in this pass, every step without
a usable training_info.json, and at least ``min_keep`` checkpoints. A checkpoint whose size is not
known is deleted on its own: no further pressure deletion in that pass (the next pass measures).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .policy import Policy, metric_value
from .records import Checkpoint

__all__ = ["FreeSpace", "Pressure", "pressure_order", "protected_steps"]


@dataclass(frozen=True, slots=True)
class FreeSpace:
    """What the pass measured on a root's filesystem, for the planner.

    ``free_bytes``: space an unprivileged writer (the trainer) can still use (``f_bavail``).
    ``sizes``: bytes of a checkpoint (or in-flight save, or leftover) by its (st_dev, st_ino);
    a missing entry is an unknown size. ``trash_bytes``: what the root's trash still holds."""

    free_bytes: int
    total_bytes: int
    sizes: Mapping[tuple[int, int], int] = field(default_factory=dict)
    trash_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Pressure:
    """The plan's view of disk pressure in one root (None on the plan when there is none)."""

    reason: str  # "disk pressure: 8% free < 15%"
    target_bytes: int  # min_free in bytes on this filesystem
    projected_free_bytes: int  # expected after the plan (sizes known to it only)
    deleted: tuple[int, ...]  # steps deleted because of pressure, worst first
    unsized: int | None = None  # a deleted step of unknown size: deletions stopped after it

    @property
    def satisfied(self) -> bool:
        """False: only protected checkpoints remain (or sizes were unknown) and space is short."""
        return self.projected_free_bytes >= self.target_bytes or self.unsized is not None


def protected_steps(
    checkpoints: Sequence[Checkpoint], policy: Policy, finalizing: Iterable[int] = ()
) -> dict[int, str]:
    """Steps disk pressure never deletes, with why (the first reason found per step)."""
    out: dict[int, str] = {}
    for step in finalizing:
        out.setdefault(step, "being finalized")
    for c in checkpoints:
        if c.pinned:
            out.setdefault(c.step, "pinned")
        if c.info is None:
            out.setdefault(c.step, "no usable training_info.json")
        if policy.keep_every_n_steps and c.step % policy.keep_every_n_steps == 0:
            out.setdefault(c.step, "milestone")
    if checkpoints:
        out.setdefault(max(c.step for c in checkpoints), "latest")
    best = _best(checkpoints, policy)
    if best is not None:
        out.setdefault(best, f"best by {policy.metric_name}")
    return out


def _best(checkpoints: Sequence[Checkpoint], policy: Policy) -> int | None:
    if policy.metric_name is None:
        return None  # ranked by recency: the best is the latest
    sign = 1.0 if policy.higher_is_better else -1.0
    ranked = [
        (sign * v, c.step)
        for c in checkpoints
        if not isinstance(v := metric_value(c.info, policy.metric_name), str)
    ]
    return max(ranked)[1] if ranked else None  # equal metric: the higher step wins


def pressure_order(checkpoints: Sequence[Checkpoint], policy: Policy) -> list[Checkpoint]:
    """Worst first: unranked (no usable metric), then the worst metric, then the oldest."""
    sign = 1.0 if policy.higher_is_better else -1.0

    def key(c: Checkpoint) -> tuple[int, float, int]:
        if policy.metric_name is None:
            return (1, 0.0, c.step)
        value = metric_value(c.info, policy.metric_name)
        if isinstance(value, str):
            return (0, 0.0, c.step)
        return (1, sign * value, c.step)

    return sorted(checkpoints, key=key)
