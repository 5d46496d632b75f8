"""The status page's chart of one root: the metric over steps as inline SVG (no script, no assets).

Kept, deleted, pinned and in-flight checkpoints have their own marker; steps without a usable
metric sit on a strip under the plot; the top-k threshold (the k-th best metric among top-k
candidates) is a dashed line. Every marker carries a ``<title>`` (the browser's tooltip) with the
step, decision and reasons. Every text from disk or config is escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass

from ckptkeeper import Action, Plan, Policy

__all__ = ["COLOURS", "Point", "chart_svg", "points_of", "text", "topk_threshold"]

#: Marker colours (the page's legend and the screenshot test use the same values).
COLOURS = {
    "kept": "#2e7d32",
    "deleted": "#c62828",
    "pinned": "#1565c0",
    "in-flight": "#ef6c00",
    "threshold": "#6a1b9a",
}
WIDTH, HEIGHT = 960, 300
LEFT, RIGHT, TOP = 72, 20, 18
INSET = 10  # between the plot's frame and the first and last step
PLOT_BOTTOM = 212  # y of the x axis; the "no metric" strip lies below it
STRIP_Y = 232
_IN_FLIGHT = (Action.WAIT, Action.FINALIZE, Action.REPLACE, Action.COLLECT)


def text(value: object) -> str:
    """Escaped text for HTML and SVG (quotes too); undecodable file names shown as escapes."""
    raw = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return html.escape(raw, quote=True)


@dataclass(frozen=True, slots=True)
class Point:
    step: int
    state: str  # kept | deleted | pinned | in-flight
    value: float | None  # None: no usable metric (drawn on the strip)
    tip: str  # tooltip text (unescaped)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def points_of(plan: Plan) -> list[Point]:
    """One point per checkpoint step (its retention decision) and per in-flight save."""
    in_flight = {
        d.step
        for d in plan.decisions
        if d.step is not None and d.action in _IN_FLIGHT and d.path.name.startswith("tmp_step_")
    }
    out: dict[int, Point] = {}
    for d in plan.decisions:
        if d.step is None or d.action not in (Action.KEEP, Action.DELETE, *_IN_FLIGHT):
            continue
        retention = d.action in (Action.KEEP, Action.DELETE)
        if not retention and (d.step in out or not d.path.name.startswith("tmp_step_")):
            continue
        if d.step in in_flight:
            state = "in-flight"
        elif any(r.startswith("pinned") for r in d.reasons):
            state = "pinned"
        else:
            state = "kept" if d.action is Action.KEEP else "deleted"
        value = d.metric if isinstance(d.metric, float | int) else None
        shown = "" if d.metric is None else f" {d.metric if value is None else _fmt(value)};"
        tip = f"step {d.step}: {d.action.value};{shown} {'; '.join(d.reasons)}"
        out[d.step] = Point(d.step, state, None if value is None else float(value), tip)
    return [out[s] for s in sorted(out)]


def topk_threshold(plan: Plan, policy: Policy) -> float | None:
    """The k-th best metric among top-k candidates (what a step must match to be kept)."""
    k = policy.keep_top_k
    if not k or policy.metric_name is None:
        return None
    values = [
        float(d.metric)
        for d in plan.by_action(Action.KEEP, Action.DELETE)
        if d.step is not None
        and d.step % policy.save_period == 0
        and isinstance(d.metric, float | int)
    ]
    if len(values) < k:
        return None  # every ranked candidate is within the top k
    return sorted(values, reverse=policy.higher_is_better)[k - 1]


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _marker(state: str, x: float, y: float, tip: str) -> str:
    colour, title = COLOURS[state], f"<title>{text(tip)}</title>"
    if state == "deleted":
        return (
            f'<path d="M{x - 4:.1f},{y - 4:.1f}l8,8m0,-8l-8,8" stroke="{colour}" '
            f'stroke-width="3">{title}</path>'
        )
    if state == "pinned":
        return f'<path d="M{x:.1f},{y - 7:.1f}l7,7l-7,7l-7,-7z" fill="{colour}">{title}</path>'
    if state == "in-flight":
        return (
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#fff" stroke="{colour}" '
            f'stroke-width="3">{title}</circle>'
        )
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{colour}">{title}</circle>'


def chart_svg(plan: Plan, policy: Policy) -> str:
    """The chart of one root's plan as an ``<svg>`` element."""
    points = points_of(plan)
    steps = [p.step for p in points] or [0]
    values = [p.value for p in points if p.value is not None]
    threshold = topk_threshold(plan, policy)
    lo_s, hi_s = min(steps), max(steps)
    lo_v, hi_v = (min(values), max(values)) if values else (0.0, 1.0)
    if threshold is not None:
        lo_v, hi_v = min(lo_v, threshold), max(hi_v, threshold)
    pad = (hi_v - lo_v) * 0.08 or 1.0
    lo_v, hi_v = lo_v - pad, hi_v + pad
    span_s = (hi_s - lo_s) or 1

    def x(step: float) -> float:
        return LEFT + INSET + (step - lo_s) / span_s * (WIDTH - LEFT - RIGHT - 2 * INSET)

    def y(value: float) -> float:
        return PLOT_BOTTOM - (value - lo_v) / (hi_v - lo_v) * (PLOT_BOTTOM - TOP)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{WIDTH}" '
        f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{text(_caption(policy))}">'
    ]
    out += _axes(x, y, lo_s, hi_s, lo_v, hi_v, policy, bool(values))
    line = " ".join(f"{x(p.step):.1f},{y(p.value):.1f}" for p in points if p.value is not None)
    if line:
        out.append(f'<polyline points="{line}" fill="none" stroke="#bdbdbd" stroke-width="1"/>')
    if threshold is not None:
        ty, colour = y(threshold), COLOURS["threshold"]
        out.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{ty:.1f}" y2="{ty:.1f}" '
            f'stroke="{colour}" stroke-width="2" stroke-dasharray="8 5"/>'
            f'<text x="{WIDTH - RIGHT - 4}" y="{ty - 5:.1f}" text-anchor="end" '
            f'fill="{colour}">top-{policy.keep_top_k} threshold {text(_fmt(threshold))}</text>'
        )
    mid = (TOP + PLOT_BOTTOM) / 2
    for p in points:
        where = STRIP_Y if p.value is None else (y(p.value) if values else mid)
        out.append(_marker(p.state, x(p.step), where, p.tip))
    out += _legend()
    out.append("</svg>")
    return "".join(out)


def _caption(policy: Policy) -> str:
    if policy.metric_name is None:
        return "checkpoints by step (no metric: ranked by recency)"
    better = "higher" if policy.higher_is_better else "lower"
    return f"{policy.metric_name} by step ({better} is better)"


_Scale = Callable[[float], float]


def _axes(
    x: _Scale,
    y: _Scale,
    lo_s: int,
    hi_s: int,
    lo_v: float,
    hi_v: float,
    policy: Policy,
    ranked: bool,
) -> list[str]:
    out = [
        f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" '
        f'height="{PLOT_BOTTOM - TOP}" fill="#fafafa" stroke="#e0e0e0"/>',
        f'<text x="{LEFT - 8}" y="{STRIP_Y + 4}" text-anchor="end" fill="#757575">no metric</text>',
        f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{STRIP_Y}" y2="{STRIP_Y}" stroke="#eeeeee"/>',
    ]
    for s in _ticks(lo_s, hi_s):
        if s == int(s):
            out.append(
                f'<text x="{x(s):.1f}" y="{STRIP_Y + 24}" text-anchor="middle" '
                f'fill="#616161">{int(s)}</text>'
            )
    if ranked:
        for v in _ticks(lo_v, hi_v):
            out.append(
                f'<text x="{LEFT - 8}" y="{y(v) + 4:.1f}" text-anchor="end" '
                f'fill="#616161">{text(_fmt(v))}</text>'
                f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                f'stroke="#eeeeee"/>'
            )
    out.append(
        f'<text x="{LEFT}" y="{TOP - 5}" fill="#424242" font-weight="bold">'
        f"{text(_caption(policy))}</text>"
    )
    return out


def _legend() -> list[str]:
    out, lx = [], LEFT
    for state in ("kept", "deleted", "pinned", "in-flight"):
        out.append(_marker(state, lx + 6, HEIGHT - 14, state))
        out.append(f'<text x="{lx + 16}" y="{HEIGHT - 10}" fill="#424242">{state}</text>')
        lx += 110
    colour = COLOURS["threshold"]
    out.append(
        f'<line x1="{lx}" x2="{lx + 24}" y1="{HEIGHT - 14}" y2="{HEIGHT - 14}" stroke="{colour}" '
        f'stroke-width="2" stroke-dasharray="8 5"/>'
        f'<text x="{lx + 30}" y="{HEIGHT - 10}" fill="#424242">top-k threshold</text>'
    )
    return out
