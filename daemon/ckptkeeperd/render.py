"""Human tables (rich) and JSON documents for ``status`` and ``sweep``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ckptkeeper import Action, Policy

from .reconcile import Report

__all__ = ["print_reports", "report_to_dict"]

_STYLE = {
    Action.KEEP: "green",
    Action.DELETE: "red",
    Action.FINALIZE: "cyan",
    Action.REPLACE: "cyan",
    Action.RESTORE: "yellow",
    Action.DISCARD: "yellow",
    Action.COLLECT: "magenta",
    Action.WAIT: "blue",
    Action.PURGE: "red",
    Action.HOLD: "dim",
    Action.IGNORE: "yellow",
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _policy_dict(policy: Policy) -> dict[str, Any]:
    return asdict(policy)


def report_to_dict(report: Report, policy: Policy | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "root": str(report.root),
        "status": report.status,
        "errors": report.errors,
        "problems": list(report.problems),
        "duration_ms": round(report.duration_ms, 3),
    }
    if policy is not None:
        doc["policy"] = _policy_dict(policy)
    if report.plan is not None:
        doc["decisions"] = [
            {
                "step": d.step,
                "path": str(d.path),
                "action": d.action.value,
                "reasons": list(d.reasons),
                "metric": _jsonable(d.metric),
            }
            for d in report.plan.decisions
        ]
    if report.outcomes:
        doc["outcomes"] = [
            {
                "step": o.decision.step,
                "path": str(o.decision.path),
                "action": o.decision.action.value,
                "status": o.status,
                "detail": o.detail,
                "errno": o.errno_name,
            }
            for o in report.outcomes
        ]
    if report.removed:
        doc["removed"] = [
            {"path": str(p), "files": r.files, "dirs": r.dirs, "bytes": r.bytes, "left": r.left}
            for p, r in report.removed
        ]
    return doc


def _metric_text(value: float | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return f"{value:.6g}"


def print_reports(reports: Sequence[tuple[Report, Policy]], console: Console) -> None:
    for report, policy in reports:
        bounds = []
        if policy.keep_top_k is not None:
            by = policy.metric_name or "recency"
            better = "higher" if policy.higher_is_better else "lower"
            bounds.append(
                f"keep_top_k={policy.keep_top_k} by {by}"
                + (f" ({better} is better)" if policy.metric_name else "")
            )
        if policy.keep_latest_n is not None:
            bounds.append(f"keep_latest_n={policy.keep_latest_n}")
        if policy.keep_every_n_steps is not None:
            bounds.append(f"keep_every_n_steps={policy.keep_every_n_steps}")
        title = f"{report.root}  [{', '.join(bounds) or 'no bound: nothing is deleted'}]"
        if report.status != "ok":
            console.print(
                f"[bold]{escape(str(report.root))}[/bold]: [red]{report.status}[/red] "
                f"{escape('; '.join(report.problems))}"
            )
            if report.plan is None:
                continue
        table = Table(title=escape(title), title_justify="left", expand=False)
        table.add_column("step", justify="right")
        table.add_column("entry")
        table.add_column("metric", justify="right")
        table.add_column("decision")
        table.add_column("reasons")
        assert report.plan is not None
        for d in report.plan.decisions:
            style = _STYLE.get(d.action, "")
            table.add_row(
                "" if d.step is None else str(d.step),
                d.path.name
                if d.path.parent == report.root
                else str(d.path.relative_to(report.root)),
                _metric_text(d.metric),
                f"[{style}]{d.action.value}[/{style}]" if style else d.action.value,
                "; ".join(d.reasons),
            )
        if not report.plan.decisions:
            table.add_row("", "(no checkpoints)", "", "", "")
        console.print(table)
