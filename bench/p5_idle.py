"""P5: what an idle daemon costs while it keeps 100 roots with nothing to do.

Each root holds three small finalized steps; ``ckptkeeper run ROOT x100 --keep-top-k 3`` (default
observer ``auto``, which is inotify on a local filesystem; default ``sweep_interval`` 60 s) has
nothing to finalize or delete. After its ``ready`` event (the first pass over every root is done)
the bench samples the process every 0.5 s; the figures are for the 60 s window from 5 s to 65 s
after ``ready`` (quick: 1 s to 6 s), which always holds exactly one periodic sweep (the scheduler
starts just before the first pass, so its first sweep falls 59-60 s after ``ready``):

- CPU seconds: ``utime + stime`` of /proc/PID/stat (all threads; 10 ms ticks), delta over the
  window;
- RSS: ``VmRSS`` of /proc/PID/status at the end (and the largest sample, and ``VmHWM``);
- inotify watches: lines starting with ``inotify wd:`` in /proc/PID/fdinfo/* (all inotify fds).

The periodic full sweep of the 100 roots (plus the root refresh job, scheduled at the same
interval) shows as the busiest second of the samples; its cost is reported beside the total.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import Row, median

__all__ = ["Sample", "cpu_seconds", "inotify_watches", "run", "status_kib"]

ROOTS = 100
STEPS_PER_ROOT = 3
WINDOW_FULL_S = 60.0
WINDOW_QUICK_S = 5.0
SKIP_FULL_S = 5.0  # the window starts this long after `ready` (see module docstring)
SKIP_QUICK_S = 1.0
SAMPLE_S = 0.5
IN_FLIGHT = 0
GOAL_CPU_S = 0.2
GOAL_RSS_MB = 80.0
GOAL_WATCH_SLACK = 10


@dataclass
class Sample:
    t: float  # seconds after `ready`
    cpu: float  # CPU seconds since the process started
    rss_kib: int


@dataclass
class IdleRun:
    samples: list[Sample] = field(default_factory=list)
    watches: int = 0
    hwm_kib: int = 0
    threads: int = 0
    startup_s: float = 0.0  # spawn -> ready
    cpu_at_ready: float = 0.0
    observer_kinds: list[str] = field(default_factory=list)


def cpu_seconds(pid: int) -> float:
    """``utime + stime`` of ``pid`` (every thread), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` (or count) field of /proc/PID/status, e.g. ``VmRSS``, ``VmHWM``, ``Threads``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return 0


def inotify_watches(pid: int) -> int:
    """inotify watches held by ``pid``: ``inotify wd:`` lines over all its fds' fdinfo."""
    count = 0
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    for entry in fdinfo.iterdir():
        with contextlib.suppress(OSError):  # an fd closed while we read
            count += sum(
                1 for line in entry.read_text().splitlines() if line.startswith("inotify wd:")
            )
    return count


def _make_roots(base: Path, roots: int) -> list[Path]:
    out = []
    for r in range(roots):
        root = base / f"run-{r:03d}"
        for step in range(1, STEPS_PER_ROOT + 1):
            d = root / f"step_{step * 100}" / "policy"
            d.mkdir(parents=True)
            (d / "shard_0.bin").write_bytes(b"\x00" * 4096)
            (d.parent / "training_info.json").write_text(f'{{"step": {step * 100}}}')
        out.append(root)
    return out


@contextlib.contextmanager
def _daemon(args: list[str]) -> Iterator[Any]:
    from tests.helpers import Daemon  # the repository's subprocess wrapper (JSON events)

    daemon = Daemon(args)
    try:
        yield daemon
    finally:
        daemon.stop()


def measure(roots: int, until: float) -> IdleRun:
    """Start the daemon on ``roots`` fresh roots; sample it from ``ready`` to ``until`` s after."""
    base = Path(tempfile.mkdtemp(prefix="ckptkeeper-bench-p5-"))
    result = IdleRun()
    try:
        dirs = _make_roots(base, roots)
        t_spawn = time.perf_counter()
        with _daemon([*map(str, dirs), "--keep-top-k", "3"]) as daemon:
            ready = daemon.wait_for("ready", timeout=120.0)[0]
            t_ready = time.perf_counter()
            result.startup_s = t_ready - t_spawn
            result.observer_kinds = list(ready.get("observer_kinds", []))
            pid = daemon.proc.pid
            result.cpu_at_ready = cpu_seconds(pid)
            result.samples.append(Sample(0.0, result.cpu_at_ready, status_kib(pid, "VmRSS")))
            while (now := time.perf_counter() - t_ready) < until:
                time.sleep(min(SAMPLE_S, until - now))
                t = time.perf_counter() - t_ready
                result.samples.append(Sample(t, cpu_seconds(pid), status_kib(pid, "VmRSS")))
            result.watches = inotify_watches(pid)
            result.hwm_kib = status_kib(pid, "VmHWM")
            result.threads = status_kib(pid, "Threads")
            unexpected = [
                e
                for e in daemon.events
                if e.get("event") not in ("root_added", "ready") and e.get("level") != "debug"
            ]
            if unexpected:
                raise RuntimeError(f"P5: the idle daemon acted or complained: {unexpected[:3]}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return result


def _sweep_share(samples: list[Sample]) -> tuple[float, float, float]:
    """(cpu of the busiest 1 s, its time after ready, median idle CPU per second)."""
    deltas = [(b.t, (b.cpu - a.cpu), b.t - a.t) for a, b in itertools.pairwise(samples)]
    if not deltas:
        return 0.0, 0.0, 0.0
    rates = [d / dt for _, d, dt in deltas if dt > 0]
    idle = median(rates) if rates else 0.0
    best_t, best = 0.0, -1.0
    for i in range(len(deltas)):
        cpu = sum(d for _, d, _ in deltas[i : i + 2])  # two 0.5 s samples: one second
        if cpu > best:
            best_t, best = deltas[i][0], cpu
    return max(best, 0.0), best_t, idle


def run(quick: bool) -> list[Row]:
    window = WINDOW_QUICK_S if quick else WINDOW_FULL_S
    skip = SKIP_QUICK_S if quick else SKIP_FULL_S
    res = measure(ROOTS, skip + window)
    before = [s for s in res.samples if s.t < skip - 1e-3]
    inside = [s for s in res.samples if s.t >= skip - 1e-3]
    first, last = inside[0], inside[-1]
    cpu = last.cpu - first.cpu
    span = last.t - first.t
    tail = first.cpu - res.samples[0].cpu if before else 0.0
    rss_mb = last.rss_kib / 1024
    peak_mb = max(s.rss_kib for s in res.samples) / 1024
    goal_watches = ROOTS + IN_FLIGHT + GOAL_WATCH_SLACK
    burst, burst_t, idle_rate = _sweep_share(inside)
    common = (
        f"{ROOTS} roots x {STEPS_PER_ROOT} steps, observer {'/'.join(res.observer_kinds)}, "
        f"default sweep_interval 60 s; window +{first.t:.1f} s .. +{last.t:.1f} s after `ready` "
        f"(spawn -> ready {res.startup_s:.2f} s and {res.cpu_at_ready:.2f} CPU-s for start-up "
        f"and the first pass; {tail:.2f} CPU-s between `ready` and the window); "
        f"{res.threads} threads."
    )
    cpu_notes = [common]
    if window >= 60:
        cpu_notes.append(
            f"The window holds the periodic full sweep of all {ROOTS} roots (and the root "
            f"refresh, same interval): the busiest second, at +{burst_t:.1f} s, used "
            f"{burst:.2f} CPU-s; outside it the daemon used a median {idle_rate * 1e3:.1f} "
            "CPU-ms per second."
        )
    else:
        cpu_notes.append(
            f"Quick window: shorter than the 60 s sweep interval, so no periodic sweep is in it "
            f"(median {idle_rate * 1e3:.1f} CPU-ms per second)."
        )
    if cpu > GOAL_CPU_S:
        cpu_notes.append(
            f"Misses <= {GOAL_CPU_S} CPU-s: the busiest second holds {burst:.2f} of the "
            f"{cpu:.2f} CPU-s (the periodic sweep + refresh of {ROOTS} roots)."
        )
    return [
        Row(
            id="P5-cpu",
            what=f"idle daemon, {ROOTS} roots: CPU over {span:.0f} s after ready",
            ours=f"{cpu:.2f} CPU-s",
            baseline="—",
            ratio="—",
            goal=f"<= {GOAL_CPU_S} CPU-s per 60 s" + (" (pro rata)" if window < 60 else ""),
            met=cpu <= GOAL_CPU_S * (window / 60.0) if window < 60 else cpu <= GOAL_CPU_S,
            notes=cpu_notes,
        ),
        Row(
            id="P5-rss",
            what=f"idle daemon, {ROOTS} roots: resident memory",
            ours=f"{rss_mb:.1f} MB",
            baseline="—",
            ratio="—",
            goal=f"<= {GOAL_RSS_MB:.0f} MB",
            met=rss_mb <= GOAL_RSS_MB and peak_mb <= GOAL_RSS_MB,
            notes=[
                f"VmRSS at the end {rss_mb:.1f} MB (MB = 2^20 bytes), largest sample "
                f"{peak_mb:.1f} MB, VmHWM (peak incl. start-up) {res.hwm_kib / 1024:.1f} MB."
            ],
        ),
        Row(
            id="P5-watches",
            what=f"idle daemon, {ROOTS} roots: inotify watches",
            ours=f"{res.watches}",
            baseline="—",
            ratio="—",
            goal=f"<= roots + in-flight + 10 = {goal_watches}",
            met=res.watches <= goal_watches,
            notes=[
                f"Counted from /proc/PID/fdinfo (`inotify wd:` lines); {IN_FLIGHT} saves in flight."
            ],
        ),
    ]
