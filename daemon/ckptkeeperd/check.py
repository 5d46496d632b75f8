"""``ckptkeeper check``: a monitoring probe judged from what is on disk (DESIGN.md section 12).

It needs no running keeper, so it catches a dead one: each root is scanned and planned (the
read-only `preview`, as ``status`` does) and what is found is judged by age against the root's own
settings. Exit codes and output follow the Nagios/Icinga plugin convention: 0 OK, 1 WARNING,
2 CRITICAL, 3 UNKNOWN, and one line ``CKPTKEEPER <STATE> - <what> | <performance data>``.

| finding | state |
| --- | --- |
| a complete save (marker present) not finalized for over 2 x ``sweep_interval`` | CRITICAL |
| an interrupted replace (``old_step_N``) not resolved for over 2 x ``sweep_interval`` | CRITICAL |
| a root that does not exist, is not a directory, or cannot be listed (s3: no bucket) | CRITICAL |
| an ``s3://`` root with no object under its prefix (not written yet, or a typo) | WARNING |
| a root the probe is not permitted to read (EACCES/EPERM: it cannot judge) | UNKNOWN |
| trash not removed `TRASH_WARN_S` after ``trash_grace`` (`TRASH_CRIT_S`: CRITICAL) | WARNING |
| a stale save not collected `stale_after + sweep_interval` after its last change | WARNING |
| deletions paused (the run's ``ckptkeeper.toml`` is invalid) | WARNING |
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptkeeper import Action, Plan, Policy
from ckptkeeper.records import RootScan
from ckptkeeper.sizes import format_percent
from ckptkeeper.storage import Storage
from ckptkeeper.stores import root_url

from .config import DaemonConfig, Settings
from .metrics import deletions_paused
from .reconcile import Report, preview
from .resolver import resolve_settings
from .roots import expand

__all__ = ["CRITICAL", "OK", "UNKNOWN", "WARNING", "Finding", "RootHealth", "judge", "run_check"]

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
SEVERITY = {OK: 0, WARNING: 1, UNKNOWN: 2, CRITICAL: 3}  # which state wins the summary
TRASH_WARN_S = 3600.0
TRASH_CRIT_S = 6 * 3600.0
MAX_SHOWN = 3  # findings named in the summary line; the rest are counted (all in --json)


@dataclass(frozen=True, slots=True)
class Finding:
    state: int
    message: str


@dataclass
class RootHealth:
    root: Path
    findings: list[Finding] = field(default_factory=list)
    checkpoints: int = 0

    @property
    def state(self) -> int:
        return max((f.state for f in self.findings), key=SEVERITY.__getitem__, default=OK)


def duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(int(seconds), 0)}s"


def judge(report: Report, settings: Settings, problems: Iterable[str], now: float) -> RootHealth:
    """The findings about one root from a read-only pass over it (`preview`)."""
    health = RootHealth(report.root)
    add = health.findings.append
    paused = [p for p in problems if deletions_paused([p])]
    if paused:
        add(Finding(WARNING, f"deletions paused ({paused[0]})"))
    if report.status == "error" or report.plan is None:
        why = "; ".join(report.problems) or "cannot be read"
        denied = any(code in why for code in ("EACCES", "EPERM"))
        if denied:
            add(Finding(UNKNOWN, f"{why} (not permitted to look: cannot judge)"))
        else:
            add(Finding(CRITICAL, why))
        return health
    policy, interval = settings.policy, settings.sweep_interval
    health.checkpoints = len(report.plan.by_action(Action.KEEP, Action.DELETE))
    tmps = {t.path: t for t in report.scan.in_flight} if report.scan is not None else {}
    trash = {t.path: t for t in report.scan.trash} if report.scan is not None else {}
    for d in report.plan.decisions:
        name = d.path.name
        if d.action in (Action.FINALIZE, Action.REPLACE):
            since = _mtime(d.path / policy.complete_marker)
            if since is not None and now - since > 2 * interval:
                add(
                    Finding(
                        CRITICAL,
                        f"complete save {name} not finalized for {duration(now - since)}"
                        " (keeper not running?)",
                    )
                )
        elif d.action in (Action.RESTORE, Action.DISCARD):
            since = _mtime(d.path, ctime=True)
            if since is not None and now - since > 2 * interval:
                add(
                    Finding(
                        CRITICAL,
                        f"interrupted replace {name} not resolved for {duration(now - since)}"
                        " (keeper not running?)",
                    )
                )
        elif d.action is Action.COLLECT and (t := tmps.get(d.path)) is not None:
            idle = now - t.newest_mtime if t.newest_mtime is not None else 0.0
            if idle > policy.stale_after + interval:
                add(
                    Finding(
                        WARNING, f"stale save {name} not collected (untouched {duration(idle)})"
                    )
                )
        elif d.action is Action.PURGE and (e := trash.get(d.path)) is not None:
            overdue = now - e.trashed_at - policy.trash_grace
            if overdue > TRASH_WARN_S:
                state = CRITICAL if overdue > TRASH_CRIT_S else WARNING
                add(Finding(state, f"trash {name} not removed for {duration(overdue)} (stuck?)"))
    health.findings.extend(_space_findings(report.plan, policy))
    if report.scan is not None and _empty(report.scan, report.storage):
        add(
            Finding(
                WARNING,
                f"nothing under {root_url(report.root)} (not written yet, or a wrong prefix)",
            )
        )
    return health


def _empty(scan: RootScan, storage: Storage) -> bool:
    """A root whose listing found nothing that does not exist either: an object store's prefix
    with no object under it (a directory that exists is never empty in this sense)."""
    if scan.steps or scan.in_flight or scan.leftovers or scan.trash or scan.anomalies:
        return False
    try:
        return storage.lstat(scan.root) is None
    except OSError:
        return False  # cannot tell: the pass itself said what it could


def _space_findings(plan: Plan, policy: Policy) -> list[Finding]:
    """Free space under ``min_free``: a warning while deletable checkpoints remain (the keeper
    frees space), critical once only protected ones do; the next save may not fit: a warning."""
    found: list[Finding] = []
    threshold, free = policy.pressure_threshold, plan.free
    if threshold is not None and free is not None:
        want = threshold.bytes_for(free.total_bytes)
        if free.free_bytes < want:
            share = format_percent(100 * free.free_bytes / free.total_bytes)
            stuck = plan.pressure is not None and not plan.pressure.satisfied
            why = "only protected checkpoints left" if stuck else "deleting under pressure"
            state = CRITICAL if stuck else WARNING
            found.append(Finding(state, f"free space {share} < min_free {policy.min_free}: {why}"))
    if plan.next_save_may_not_fit:
        found.append(Finding(WARNING, "the next save may not fit in the free space"))
    return found


def _mtime(path: Path, *, ctime: bool = False) -> float | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return st.st_ctime if ctime else st.st_mtime


def run_check(config: DaemonConfig, now: float | None = None) -> tuple[int, str, dict[str, Any]]:
    """Judge every root of ``config``: (exit code, summary line, JSON document)."""
    now = time.time() if now is None else now
    healths: list[RootHealth] = []
    for where, overrides in expand(config):
        resolved = resolve_settings(config, where, overrides)
        report = preview(where.path, resolved.settings.policy, now=now, storage=where.storage)
        healths.append(judge(report, resolved.settings, resolved.problems, now))
    return summarize(healths)


def summarize(healths: list[RootHealth]) -> tuple[int, str, dict[str, Any]]:
    state = max((h.state for h in healths), key=SEVERITY.__getitem__, default=OK)
    counts = {s: sum(1 for h in healths if h.state == s) for s in (CRITICAL, WARNING, UNKNOWN)}
    perf = (
        f"roots={len(healths)} critical={counts[CRITICAL]} warning={counts[WARNING]}"
        f" unknown={counts[UNKNOWN]} checkpoints={sum(h.checkpoints for h in healths)}"
    )
    bad = sorted((h for h in healths if h.state != OK), key=lambda h: -SEVERITY[h.state])
    if not bad:
        checkpoints = sum(h.checkpoints for h in healths)
        roots = f"{len(healths)} root" + ("" if len(healths) == 1 else "s")
        what = f"{roots}, {checkpoints} checkpoints" if healths else "no roots found"
    else:
        shown: list[str] = []
        for h in bad:
            worst = sorted(h.findings, key=lambda f: -SEVERITY[f.state])
            shown.extend(f"{h.root}: {f.message}" for f in worst if f.state != OK)
        more = f" (+{len(shown) - MAX_SHOWN} more)" if len(shown) > MAX_SHOWN else ""
        what = f"{len(bad)} of {len(healths)} roots: " + "; ".join(shown[:MAX_SHOWN]) + more
    line = f"CKPTKEEPER {NAMES[state]} - {what} | {perf}"
    doc = {
        "status": NAMES[state],
        "exit_code": state,
        "summary": line,
        "roots": [
            {
                "root": str(h.root),
                "status": NAMES[h.state],
                "checkpoints": h.checkpoints,
                "findings": [{"status": NAMES[f.state], "message": f.message} for f in h.findings],
            }
            for h in healths
        ],
    }
    return state, line, doc
