"""Prometheus metrics of the keeper (DESIGN.md section 12), fed by the passes' `Report`s.

One `KeeperMetrics` per process: the daemon observes every pass (`observe_pass`) and every
finalize as it happens (`finalize_hook`); ``sweep --metrics-file`` does the same for its one pass
per root and writes the text format atomically (`write_textfile`). Everything is kept here as
plain numbers and turned into metric families when scraped, so roots can come and go and
``root_labels = false`` (one series per metric for a fleet of runs) is only a way of adding up:

- counters of a root that goes away are added to a "retired" sum, so the totals without the
  ``root`` label never go down;
- without the label, gauges add up (checkpoints, paused roots) or take the worst root (the
  oldest last pass, the oldest save in flight, the filesystem with the least free space).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

import ckptkeeper
from ckptkeeper import Action, Outcome
from ckptkeeper.names import step_name

from .exposition import Family, Labels, render, to_metric
from .reconcile import Report

__all__ = [
    "ACTIONS",
    "PAUSED",
    "STATES",
    "KeeperMetrics",
    "deletions_paused",
]

PREFIX = "ckptkeeper_"
#: What each checkpoint-named entry of a root is after a pass (``checkpoints{state}``).
STATES = ("kept", "in_flight", "complete", "delete_pending", "stale", "trash", "ignored")
#: ``actions_total{action}``: the executor's actions, plus ``purge`` (trash removed).
ACTIONS = tuple(
    a.value
    for a in (
        Action.FINALIZE,
        Action.REPLACE,
        Action.RESTORE,
        Action.DISCARD,
        Action.COLLECT,
        Action.DELETE,
        Action.PURGE,
    )
)
PASS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
FINALIZE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
#: The words `roots.resolve_settings` puts in a problem when a run's ckptkeeper.toml is invalid.
PAUSED = "deletions in this root paused"


def deletions_paused(problems: Iterable[str]) -> bool:
    return any(PAUSED in p for p in problems)


class Histogram:
    """Cumulative buckets over fixed bounds (+Inf last); thread-safe."""

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = (*sorted(bounds), float("inf"))
        self.counts = [0.0] * len(self.bounds)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
            self.sum += value

    def family(self, name: str, doc: str) -> Family:
        out = Family(name, "histogram", doc)
        with self._lock:
            total = 0.0
            for bound, n in zip(self.bounds, self.counts, strict=True):
                total += n
                le = "+Inf" if bound == float("inf") else repr(float(bound))
                out.add((("le", le),), total, "_bucket")
            out.add((), total, "_count")
            out.add((), self.sum, "_sum")
        return out

    def seed(self, cumulative: Mapping[float, float], total: float) -> None:
        """Add a previous run's buckets (``le`` -> cumulative count) when the bounds are ours."""
        if set(cumulative) != set(self.bounds):
            return
        with self._lock:
            below = 0.0
            for i, bound in enumerate(self.bounds):
                self.counts[i] += cumulative[bound] - below
                below = cumulative[bound]
            self.sum += total


@dataclass
class _Root:
    checkpoints: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    actions: dict[str, float] = field(default_factory=dict)
    failures: dict[str, float] = field(default_factory=dict)
    freed: float = 0.0
    last_pass: float | None = None
    in_flight_since: float | None = None  # the oldest save in flight started no later than this
    first_seen: dict[Path, tuple[tuple[int, int], float]] = field(default_factory=dict)
    paused: bool = False
    fs: tuple[int, int, int] | None = None  # (st_dev, free bytes, size bytes)


class KeeperMetrics:
    """The keeper's metrics; ``registry`` holds them (for an HTTP endpoint or a text file)."""

    def __init__(self, *, root_labels: bool = True, clock: Callable[[], float] = time.time):
        self.root_labels = root_labels
        self.clock = clock
        self._lock = threading.Lock()
        self._roots: dict[Path, _Root] = {}
        self._retired = _Root()
        self.pass_duration = Histogram(PASS_BUCKETS)
        self.finalize_latency = Histogram(FINALIZE_BUCKETS)
        self.version = ckptkeeper.__version__
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # -- what a pass tells ------------------------------------------------------------------

    def finalize_hook(
        self, root: Path, marker: str | Callable[[], str]
    ) -> Callable[[Outcome], None]:
        """For ``reconcile(on_outcome=...)``: each finalize that is done, at the moment it is,
        observes ``now - mtime of the marker`` (the save's completion to its step visible).
        ``marker``: the completion marker's name, or what gives the one of the pass's policy."""

        def on_outcome(outcome: Outcome) -> None:
            d = outcome.decision
            if outcome.status != "done" or d.action not in (Action.FINALIZE, Action.REPLACE):
                return
            final = d.replaces if d.replaces is not None else Path(root) / step_name(d.step or 0)
            name = marker if isinstance(marker, str) else marker()
            try:
                written = os.stat(final / name, follow_symlinks=False).st_mtime
            except OSError:
                return  # the marker went with the save (a race): nothing to measure
            self.finalize_latency.observe(max(self.clock() - written, 0.0))

        return on_outcome

    def observe_pass(self, report: Report, *, paused: bool = False) -> None:
        """Count what ``report``'s pass did and take its root's state afterwards."""
        self.pass_duration.observe(report.duration_ms / 1000)
        now = self.clock()
        actions, failures, freed = _counts(report)
        local = report.storage.local_dir(report.root)  # None: an object store, no statvfs
        fs = _filesystem(local) if report.status != "error" and local is not None else None
        with self._lock:
            r = self._roots.setdefault(Path(report.root), _Root())
            _add(r.actions, actions)
            _add(r.failures, failures)
            r.freed += freed
            r.paused = paused
            if fs is not None:
                r.fs = fs
            if report.status == "ok" and report.settled is not None and r.last_pass is not None:
                r.in_flight_since, r.first_seen = None, {}  # none in flight (`ckptkeeper.settled`)
                r.last_pass = now  # the states: as the look that made the verdict counted them
            elif report.status == "ok" and report.plan is not None:
                r.checkpoints = _states(report)
                r.in_flight_since = _in_flight_since(report, r, now)
                r.last_pass = now

    def observe_actions(self, report: Report) -> None:
        """Count what a partial pass did (a marker's save) and its duration; the root's state
        is taken by the full pass that follows."""
        self.pass_duration.observe(report.duration_ms / 1000)
        actions, failures, freed = _counts(report)
        with self._lock:
            r = self._roots.setdefault(Path(report.root), _Root())
            _add(r.actions, actions)
            _add(r.failures, failures)
            r.freed += freed

    def forget_root(self, root: Path) -> None:
        """``root`` is no longer kept: its series go; its counts stay in the label-less sums."""
        with self._lock:
            gone = self._roots.pop(Path(root), None)
            if gone is not None:
                _add(self._retired.actions, gone.actions)
                _add(self._retired.failures, gone.failures)
                self._retired.freed += gone.freed

    def retain(self, roots: Iterable[Path]) -> None:
        keep = {Path(r) for r in roots}
        for root in [r for r in list(self._roots) if r not in keep]:
            self.forget_root(root)

    def seed_counters(
        self,
        root: Path | None,
        actions: Mapping[str, float],
        failures: Mapping[str, float],
        freed: float,
    ) -> None:
        """Start from a previous run's totals (``root`` None: the label-less sums)."""
        with self._lock:
            r = self._retired if root is None else self._roots.setdefault(Path(root), _Root())
            _add(r.actions, actions)
            _add(r.failures, failures)
            r.freed += freed

    # -- scraping ---------------------------------------------------------------------------

    def describe(self) -> list[Metric]:
        return []  # families are built at collect time; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        """For a prometheus_client registry (``generate_latest``); `render` is the fast way."""
        return iter([to_metric(f) for f in self.families()])

    def render(self) -> bytes:
        """The text format of every family (what ``GET /metrics`` and the text file hold)."""
        return render(self.families())

    def families(self) -> list[Family]:
        now = self.clock()
        with self._lock:
            roots = {str(p): r for p, r in sorted(self._roots.items())}
            out = self._per_root(roots, self._retired, now)
        out.append(
            self.pass_duration.family(
                PREFIX + "pass_duration_seconds", "Duration of one pass over one root."
            )
        )
        out.append(
            self.finalize_latency.family(
                PREFIX + "finalize_latency_seconds",
                "From a save's completion marker (its mtime) to its step_N being visible.",
            )
        )
        info = Family(PREFIX + "build_info", "gauge", "The running ckptkeeper's version.")
        info.add((("version", self.version),), 1)
        out.append(info)
        return out

    def _per_root(self, roots: dict[str, _Root], retired: _Root, now: float) -> list[Family]:
        def gauge(name: str, doc: str) -> Family:
            return Family(PREFIX + name, "gauge", doc)

        def counter(name: str, doc: str) -> Family:
            return Family(PREFIX + name, "counter", doc)

        ckpt = gauge("checkpoints", "Checkpoint-named entries by state.")
        acts = counter("actions", "Actions done.")
        fails = counter("action_failures", "Actions that failed.")
        freed = counter("freed_bytes", "Bytes removed from trash.")
        last = gauge("last_pass_timestamp_seconds", "End of the last full pass.")
        age = gauge("oldest_in_flight_age_seconds", "Age of the oldest save in flight.")
        paused = gauge("deletions_paused", "1: a run's ckptkeeper.toml is invalid.")
        free = gauge("filesystem_free_bytes", "Free bytes (statvfs f_bavail).")
        size = gauge("filesystem_size_bytes", "Size of the root's filesystem.")
        if self.root_labels:
            for name, r in roots.items():
                at: Labels = (("root", name),)
                for state in STATES:
                    ckpt.add((*at, ("state", state)), r.checkpoints.get(state, 0))
                for action in ACTIONS:
                    acts.add((*at, ("action", action)), r.actions.get(action, 0))
                    fails.add((*at, ("action", action)), r.failures.get(action, 0))
                freed.add(at, r.freed)
                if r.last_pass is not None:
                    last.add(at, r.last_pass)
                age.add(at, _age(r, now))
                paused.add(at, int(r.paused))
                if r.fs is not None:
                    free.add(at, r.fs[1])
                    size.add(at, r.fs[2])
        else:
            everyone = [*roots.values(), retired]
            for state in STATES:
                ckpt.add(
                    (("state", state),), sum(r.checkpoints.get(state, 0) for r in roots.values())
                )
            for action in ACTIONS:
                acts.add((("action", action),), sum(r.actions.get(action, 0) for r in everyone))
                fails.add((("action", action),), sum(r.failures.get(action, 0) for r in everyone))
            freed.add((), sum(r.freed for r in everyone))
            passes = [r.last_pass for r in roots.values() if r.last_pass is not None]
            if passes:
                last.add((), min(passes))
            age.add((), max((_age(r, now) for r in roots.values()), default=0.0))
            paused.add((), sum(int(r.paused) for r in roots.values()))
            filesystems = [r.fs for r in roots.values() if r.fs is not None]
            if filesystems:
                tightest = min(filesystems, key=lambda f: f[1])
                free.add((), tightest[1])
                size.add((), tightest[2])
        return [ckpt, acts, fails, freed, last, age, paused, free, size]


def _add(into: dict[str, float], more: Mapping[str, float]) -> None:
    for key, n in more.items():
        into[key] = into.get(key, 0) + n


def _age(r: _Root, now: float) -> float:
    return 0.0 if r.in_flight_since is None else max(now - r.in_flight_since, 0.0)


def _filesystem(root: Path) -> tuple[int, int, int] | None:
    try:
        st = os.statvfs(root)
        dev = os.stat(root).st_dev
    except OSError:
        return None
    return dev, st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def _counts(report: Report) -> tuple[dict[str, float], dict[str, float], float]:
    actions: dict[str, float] = {}
    failures: dict[str, float] = {}
    for o in report.outcomes:
        name = o.decision.action.value
        if o.status == "done":
            actions[name] = actions.get(name, 0) + 1
        elif o.status == "failed":
            failures[name] = failures.get(name, 0) + 1
    purges = set()
    if report.removed and report.plan is not None:
        purges = {d.path for d in report.plan.by_action(Action.PURGE)}
    freed = 0.0
    for path, removal in report.removed:
        freed += removal.bytes
        if removal.left:
            failures["purge"] = failures.get("purge", 0) + 1
        elif path in purges:
            actions["purge"] = actions.get("purge", 0) + 1
    return actions, failures, freed


def _states(report: Report) -> dict[str, int]:
    """What each entry is after the pass: the plan's decisions, less what the pass did."""
    assert report.plan is not None
    status = {o.decision.path: o.status for o in report.outcomes}
    removed = {path for path, removal in report.removed if not removal.left}
    in_trash = {
        o.trash_path for o in report.outcomes if o.trash_path is not None and o.status == "done"
    }
    counts = dict.fromkeys(STATES, 0)
    unfinalized = {
        d.step
        for d in report.plan.by_action(Action.FINALIZE)
        if status.get(d.path) not in ("done", "gone")
    }
    for d in report.plan.decisions:
        done = status.get(d.path) in ("done", "gone")
        match d.action:
            case Action.KEEP | Action.DELETE if (
                d.step in unfinalized
                and d.path.parent == (report.root)
                and d.path.name == step_name(d.step or 0)
            ):
                counts["complete"] += 1  # projected from a save the pass could not finalize
            case Action.KEEP:
                counts["kept"] += 1
            case Action.REPLACE if not done:
                counts["complete"] += 1  # the step it replaces is counted as it is
            case Action.DELETE if not done:
                counts["delete_pending"] += 1
            case Action.WAIT:
                counts["in_flight"] += 1
            case Action.COLLECT if not done:
                counts["stale"] += 1
            case Action.HOLD:
                counts["trash"] += 1
            case Action.PURGE if d.path not in removed:
                counts["trash"] += 1
            case Action.IGNORE:
                counts["ignored"] += 1
    counts["trash"] += len(in_trash - removed)
    return counts


def _in_flight_since(report: Report, r: _Root, now: float) -> float | None:
    """The earliest a save still in flight is known to exist: its directory's mtime or the pass
    that first saw it (the keeper's memory of each, by path and identity), whichever is older."""
    assert report.plan is not None
    waiting = {d.path for d in report.plan.by_action(Action.WAIT)}
    records = report.scan.in_flight if report.scan is not None else ()
    seen: dict[Path, tuple[tuple[int, int], float]] = {}
    oldest: float | None = None
    for t in records:
        if t.path not in waiting:
            continue
        known = r.first_seen.get(t.path)
        first = known[1] if known is not None and known[0] == t.identity else now
        seen[t.path] = (t.identity, first)
        with contextlib.suppress(OSError):
            first = min(first, os.lstat(t.path).st_mtime)
        oldest = first if oldest is None else min(oldest, first)
    r.first_seen = seen
    return oldest
