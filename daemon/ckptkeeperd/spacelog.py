"""A root's free space as its plan saw it: JSON fields for ``status --json`` and ``sweep --json``,
and log records (`reconcile` reports them through its `ProblemLog`, so each is logged once while
it lasts): ``next_save_may_not_fit`` once per newest step, and ``disk_pressure`` while only
protected checkpoints stand between the root and ``min_free`` (DESIGN section 13)."""

from __future__ import annotations

from typing import Any

from ckptkeeper import Action, Plan

__all__ = ["space_problems", "space_to_dict"]


def space_problems(p: Plan) -> dict[tuple[str, str], dict[str, Any]]:
    """``next_save_may_not_fit`` (logged once per newest step) and disk pressure that only
    protected checkpoints stand in the way of (logged once while it lasts)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    steps = [d for d in p.by_action(Action.KEEP, Action.DELETE) if d.step is not None]
    if p.next_save_may_not_fit and p.free is not None and steps:
        newest = max(steps, key=lambda d: d.step or 0)
        size = p.free.sizes.get(newest.identity)
        out[(str(newest.path), "next_save_may_not_fit")] = {
            "event": "next_save_may_not_fit",
            "step": newest.step,
            "path": str(newest.path),
            "bytes": size,
            "free_bytes": p.free.free_bytes,
            "reason": f"the newest checkpoint ({size} bytes) is larger than the free space",
        }
    if p.pressure is not None and not p.pressure.satisfied:
        out[(str(p.root), "disk_pressure")] = {
            "event": "disk_pressure",
            "free_bytes": p.free.free_bytes if p.free is not None else None,
            "target_bytes": p.pressure.target_bytes,
            "reason": f"{p.pressure.reason}: only protected checkpoints remain",
        }
    return out


def space_to_dict(p: Plan) -> dict[str, Any]:
    """``free`` (bytes), ``disk_pressure`` (None or what it made the plan do) and
    ``next_save_may_not_fit`` of one root's plan."""
    free = p.free
    pressure = p.pressure
    return {
        "free": None
        if free is None
        else {"free_bytes": free.free_bytes, "total_bytes": free.total_bytes},
        "disk_pressure": None
        if pressure is None
        else {
            "reason": pressure.reason,
            "target_bytes": pressure.target_bytes,
            "expected_free_bytes": pressure.projected_free_bytes,
            "deleted_steps": list(pressure.deleted),
            "satisfied": pressure.satisfied,
        },
        "next_save_may_not_fit": p.next_save_may_not_fit,
    }
