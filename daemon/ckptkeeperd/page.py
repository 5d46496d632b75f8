"""The status page (DESIGN section 12): every root, its checkpoints with the decision and reasons,
and a chart of the metric over steps. One self-contained HTML document: inline CSS and SVG, no
script, no external asset; every name, path, metric and reason shown is escaped.

Entry points:

- `render_page(reports)`: the page for ``(Report, Policy)`` pairs, as ``status`` and ``sweep``
  produce them (`reconcile.preview`). Pure.
- `page_for(keeper)`: what the daemon serves at ``GET /`` (``text/html; charset=utf-8``): a fresh
  read-only preview of every root the keeper holds, with its per-root settings and cache. It
  takes no lock and changes nothing, so it may run on the HTTP server's thread during passes.
- `write_page(path, reports)`: ``ckptkeeper status --html FILE`` (atomic replace).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptkeeper import Action, Decision, Plan, Policy
from ckptkeeper.sizes import format_percent, format_size
from ckptkeeper.stores import Root

from .chart import COLOURS, chart_svg, text
from .reconcile import Report, preview

if TYPE_CHECKING:
    from .keeper import KeeperCore

__all__ = ["CONTENT_TYPE", "page_for", "render_page", "write_page"]

CONTENT_TYPE = "text/html; charset=utf-8"

#: Row backgrounds per decision (the screenshot test looks for the first two).
ROW_COLOURS = {
    Action.KEEP: "#e8f5e9",
    Action.DELETE: "#ffebee",
    Action.FINALIZE: "#e0f7fa",
    Action.REPLACE: "#e0f7fa",
    Action.WAIT: "#fff3e0",
    Action.COLLECT: "#fce4ec",
    Action.PURGE: "#fce4ec",
    Action.HOLD: "#f5f5f5",
    Action.RESTORE: "#fffde7",
    Action.DISCARD: "#fffde7",
    Action.IGNORE: "#fffde7",
}

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#212121;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 4px;word-break:break-all}
.meta,.policy{color:#616161;margin:2px 0} .bad{color:#c62828;font-weight:bold}
.pressure{background:#fff3e0;border-left:4px solid #ef6c00;padding:6px 10px;margin:8px 0}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #e0e0e0;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f5f5f5} td.n{text-align:right;font-variant-numeric:tabular-nums}
td.why{max-width:640px} svg.chart{display:block;font-size:12px;margin:8px 0}
""" + "".join(f"tr.a-{a.value}{{background:{c}}}" for a, c in ROW_COLOURS.items())


def _policy_text(policy: Policy) -> str:
    parts: list[str] = []
    if policy.keep_top_k is not None:
        by = policy.metric_name or "recency"
        better = f" ({'higher' if policy.higher_is_better else 'lower'} is better)"
        parts.append(
            f"keep_top_k={policy.keep_top_k} by {by}" + (better if policy.metric_name else "")
        )
    if policy.keep_latest_n is not None:
        parts.append(f"keep_latest_n={policy.keep_latest_n}")
    if policy.keep_every_n_steps is not None:
        parts.append(f"keep_every_n_steps={policy.keep_every_n_steps}")
    if policy.min_free is not None:
        parts.append(f"min_free={policy.min_free} (min_keep={policy.min_keep})")
    if policy.keep_latest:
        parts.append("keep_latest")
    if not policy.bounded and policy.min_free is None:
        parts.append("no bound: nothing is deleted")
    return ", ".join(parts)


def _free_text(plan: Plan) -> str:
    free = plan.free
    if free is None or free.total_bytes <= 0:
        return ""
    share = format_percent(100.0 * free.free_bytes / free.total_bytes)
    return (
        f"free space: {format_size(free.free_bytes)} of {format_size(free.total_bytes)} ({share})"
    )


def _metric(value: float | str | None) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else f"{value:.6g}"


def _row(d: Decision, root: Path) -> str:
    name = d.path.name if d.path.parent == root else os.path.relpath(d.path, root)
    pinned = any(r.startswith("pinned") for r in d.reasons)
    cls = f"a-{d.action.value}" + (" pinned" if pinned else "")
    return (
        f'<tr class="{cls}"><td class="n">{"" if d.step is None else d.step}</td>'
        f'<td>{text(name)}</td><td class="n">{text(_metric(d.metric))}</td>'
        f'<td>{d.action.value}</td><td class="why">{text("; ".join(d.reasons))}</td></tr>'
    )


def _counts(plan: Plan | None) -> dict[str, int]:
    if plan is None:
        return {"checkpoints": 0, "keep": 0, "delete": 0, "in flight": 0}
    return {
        "checkpoints": len(plan.by_action(Action.KEEP, Action.DELETE)),
        "keep": len(plan.by_action(Action.KEEP)),
        "delete": len(plan.by_action(Action.DELETE)),
        "in flight": len(plan.by_action(Action.WAIT, Action.FINALIZE, Action.REPLACE)),
    }


def _summary(reports: Sequence[tuple[Report, Policy]]) -> str:
    rows = []
    for i, (report, _) in enumerate(reports):
        counts = _counts(report.plan)
        status = (
            text(report.status)
            if report.status == "ok"
            else f'<span class="bad">{text(report.status)}</span>'
        )
        free = _free_text(report.plan).removeprefix("free space: ") if report.plan else ""
        cells = "".join(f'<td class="n">{n}</td>' for n in counts.values())
        rows.append(
            f'<tr><td><a href="#root-{i}">{text(report.root)}</a></td><td>{status}</td>{cells}'
            f"<td>{text(free)}</td></tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in ("root", "status", *_counts(None), "free"))
    return _table("summary", head, rows)


def _pressure_text(plan: Plan) -> str:
    assert plan.pressure is not None
    p = plan.pressure
    if not p.satisfied:
        what = f"{len(p.deleted)} more deleted for it; only protected checkpoints remain"
    elif p.deleted:
        what = f"{len(p.deleted)} more deleted for it (worst first)"
    else:
        what = "what the other rules delete is enough"
    return f"{p.reason}: {what}"


def _table(cls: str, head: str, rows: list[str]) -> str:
    body = "".join(rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _section(i: int, report: Report, policy: Policy) -> str:
    out = [f'<section class="root" id="root-{i}"><h2>{text(report.root)}</h2>']
    out.append(f'<p class="policy">policy: {text(_policy_text(policy))}</p>')
    if report.status != "ok":
        out.append(f'<p class="bad">{text(report.status)}</p>')
    if report.problems:
        items = "".join(f"<li>{text(p)}</li>" for p in report.problems)
        out.append(f'<ul class="problems">{items}</ul>')
    plan = report.plan
    if plan is None:
        out.append("</section>")
        return "".join(out)
    if free := _free_text(plan):
        out.append(f'<p class="meta">{text(free)}</p>')
    if plan.pressure is not None:
        out.append(f'<p class="pressure">{text(_pressure_text(plan))}</p>')
    if plan.next_save_may_not_fit:
        out.append(
            '<p class="pressure">next save may not fit: the newest checkpoint is larger than '
            "the free space</p>"
        )
    out.append(chart_svg(plan, policy))
    head = "".join(f"<th>{h}</th>" for h in ("step", "entry", "metric", "decision", "reasons"))
    rows = [_row(d, report.root) for d in plan.decisions]
    if not rows:
        rows.append('<tr><td colspan="5">(no checkpoints)</td></tr>')
    out.append(_table("decisions", head, rows))
    out.append("</section>")
    return "".join(out)


def render_page(
    reports: Sequence[tuple[Report, Policy]],
    *,
    generated_at: float | None = None,
    title: str = "ckptkeeper status",
) -> str:
    """The whole page for ``(report, policy)`` pairs (one per root, in the order given)."""
    when = datetime.fromtimestamp(time.time() if generated_at is None else generated_at, UTC)
    total = sum(_counts(r.plan)["checkpoints"] for r, _ in reports)
    legend = ", ".join(f'<span style="color:{c}">{s}</span>' for s, c in COLOURS.items())
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{text(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{text(title)}</h1>",
        f'<p class="meta">generated {when:%Y-%m-%d %H:%M:%S} UTC; {len(reports)} '
        f"root{'' if len(reports) == 1 else 's'}, {total} checkpoints; markers: {legend}</p>",
        _summary(reports),
    ]
    parts += [_section(i, report, policy) for i, (report, policy) in enumerate(reports)]
    parts.append("</body></html>\n")
    return "".join(parts)


class _Silent:
    """A logger that drops everything: the page reports problems itself, and a page view must
    not repeat in the logs what the passes already logged."""

    def __getattr__(self, _name: str) -> Any:
        return lambda *_args, **_kwargs: None


def page_for(keeper: KeeperCore) -> bytes:
    """``GET /`` of the daemon: a fresh read-only preview of every root, rendered (UTF-8). Each
    root's settings are resolved now, as its next pass would (its config problems are shown)."""
    roots = dict(keeper.roots)  # replaced whole by refresh_roots: a consistent snapshot
    reports: list[tuple[Report, Policy]] = []
    for root, state in sorted(roots.items()):
        where = Root(root, state.storage)
        resolved = keeper.settings.resolve(keeper.config, where, state.overrides)
        policy = resolved.settings.policy
        report = preview(root, policy, cache=keeper.cache, log=_Silent())
        report.problems[:0] = resolved.problems
        reports.append((report, policy))
    return render_page(reports).encode("utf-8")


def write_page(path: Path, reports: Sequence[tuple[Report, Policy]]) -> None:
    """Write the page to ``path`` atomically (a temporary file beside it, then rename)."""
    from .textfile import write_atomically  # the metrics machinery only when writing

    write_atomically(Path(path), render_page(reports).encode("utf-8"))
