"""What is wrong in a root after a pass, as log records keyed by (path, why): the key stays the
same while the problem does, so the daemon's `ProblemLog` reports a recurring one once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckptkeeper import Action

from .spacelog import space_problems

if TYPE_CHECKING:
    from .reconcile import Report

__all__ = ["Problems", "problems_of"]

Problems = dict[tuple[str, str], dict[str, Any]]


def problems_of(report: Report) -> Problems:
    current: Problems = {}
    if report.status == "error":
        for why in report.problems:
            current[(str(report.root), why)] = {"event": "root_problem", "reason": why}
    _scan_problems(report, current)
    _plan_problems(report, current)
    _effect_problems(report, current)
    return current


def _scan_problems(report: Report, current: Problems) -> None:
    if report.scan is None:
        return
    for a in report.scan.anomalies:
        current[(str(a.path), a.reason)] = {
            "event": "ignored",
            "step": a.step,
            "path": str(a.path),
            "reason": a.reason,
        }
    for c in report.scan.steps:
        if c.info_error is not None:
            current[(str(c.path), c.info_error)] = {
                "event": "unranked",
                "step": c.step,
                "path": str(c.path),
                "reason": f"{c.info_error}; kept",
            }


def _plan_problems(report: Report, current: Problems) -> None:
    if report.plan is None:
        return
    for d in report.plan.decisions:  # held back until someone acts: keyed by the stable reasons[0]
        if d.blocked is not None:
            current[(str(d.path), d.reasons[0])] = {
                "event": "skipped",
                "action": d.blocked.value,
                "step": d.step,
                "path": str(d.path),
                "reason": "; ".join(d.reasons),
            }
    current.update(space_problems(report.plan))
    if not report.plan.policy.metric_name:
        return
    for d in report.plan.by_action(Action.KEEP):
        if isinstance(d.metric, str) and (str(d.path), d.metric) not in current:
            current[(str(d.path), d.metric)] = {
                "event": "unranked",
                "step": d.step,
                "path": str(d.path),
                "reason": f"{d.metric}: ranked last; kept ({'; '.join(d.reasons)})",
            }


def _effect_problems(report: Report, current: Problems) -> None:
    for o in report.outcomes:
        if not o.ok:
            d = o.decision
            current[(str(d.path), o.errno_name or o.detail)] = {
                "event": "action_failed",
                "level": "error",
                "action": d.action.value,
                "step": d.step,
                "path": str(d.path),
                "errno": o.errno_name,
                "error": o.detail,
                "reason": "; ".join(d.reasons),
            }
    for path, removal in report.removed:
        if removal.left:
            current[(str(path), removal.left[0][1])] = {
                "event": "removal_incomplete",
                "path": str(path),
                "left": len(removal.left),
                "reason": "; ".join(f"{p}: {why}" for p, why in removal.left[:5]),
                "bytes": removal.bytes,
            }
