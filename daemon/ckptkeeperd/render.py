"""Human tables (rich) and JSON documents for ``status`` and ``sweep``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ckptkeeper import Action, Policy
from ckptkeeper.layouts import DEFAULT_LAYOUT

from .reconcile import Report
from .spacelog import space_to_dict

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
    if report.scan is not None:
        doc["layout"] = {"name": report.scan.layout.name, "why": layout_why(report)}
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
        doc.update(space_to_dict(report.plan))
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


def layout_why(report: Report) -> str:
    """Why the root's scan used its layout: auto's finding, or the policy key."""
    scan = report.scan
    if scan is None:
        return ""
    return scan.layout_reason or "policy key layout"


def _metric_text(value: float | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return f"{value:.6g}"


def print_reports(reports: Sequence[tuple[Report, Policy]], console: Console) -> int:
    """Print each root's table; returns how many roots could not be shown.

    Names, reasons and paths come from disk and config: they are printed as plain ``Text``, never
    parsed as rich markup (``acc[/b]`` would crash, ``acc[red]`` would print as ``acc``). A root
    that fails to render is reported in one line and the following roots are still shown.
    """
    failed = 0
    for report, policy in reports:
        try:
            for renderable in _root_renderables(report, policy):
                console.print(renderable)
        except Exception as exc:  # a bug in one root's rendering must not hide the others
            failed += 1
            console.print(
                Text.assemble(
                    (str(report.root), "bold"), ": could not show this root: ", (repr(exc), "red")
                )
            )
    return failed


def _title(report: Report, policy: Policy) -> Text:
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
    if policy.min_free is not None:
        bounds.append(f"min_free={policy.min_free}")
    title = f"{report.root}  [{', '.join(bounds) or 'no bound: nothing is deleted'}]"
    scan = report.scan
    if scan is not None and (scan.layout_reason or scan.layout.name != DEFAULT_LAYOUT):
        title += f"  layout {scan.layout.name}: {layout_why(report)}"
    return Text(title)


def _root_renderables(report: Report, policy: Policy) -> list[Text | Table]:
    out: list[Text | Table] = []
    if report.status != "ok":
        out.append(
            Text.assemble(
                (str(report.root), "bold"),
                ": ",
                (report.status, "red"),
                " ",
                "; ".join(report.problems),
            )
        )
        if report.plan is None:
            return out
    assert report.plan is not None
    table = Table(title=_title(report, policy), title_justify="left", expand=False)
    table.add_column("step", justify="right")
    table.add_column("entry")
    table.add_column("metric", justify="right")
    table.add_column("decision")
    table.add_column("reasons")
    for d in report.plan.decisions:
        entry = d.path.name if d.path.parent == report.root else d.path.relative_to(report.root)
        table.add_row(
            Text("" if d.step is None else str(d.step)),
            Text(str(entry)),
            Text(_metric_text(d.metric)),
            Text(d.action.value, style=_STYLE.get(d.action, "")),
            Text("; ".join(d.reasons)),
        )
    if not report.plan.decisions:
        table.add_row("", "(no checkpoints)", "", "", "")
    out.append(table)
    return out
