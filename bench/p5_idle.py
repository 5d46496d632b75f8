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

The daemon runs as configured by default, metrics endpoint on (on a free loopback port here).
``P5-metrics`` runs the same measurement twice more, with the endpoint off and with it on and
scraped every 15 s (``GET /metrics``, as Prometheus would), and reports the difference.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import time
import urllib.request
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
GOAL_METRICS_CPU_S = 0.05  # metrics may add this much CPU per minute to the idle daemon ...
GOAL_METRICS_RSS_MB = 10.0  # ... and this much memory
SCRAPE_FULL_S = 15.0  # a common Prometheus scrape_interval (its default is 1m)
SCRAPE_QUICK_S = 1.0


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
    scrapes: int = 0
    scrape_bytes: int = 0


class _Scraper:
    """GET /metrics every ``every`` s (from ``ready``), as Prometheus would; None: never."""

    def __init__(self, daemon: Any, every: float | None) -> None:
        self.every = every
        self.next = 0.0
        self.count = self.size = 0
        self.url = ""
        if every is not None:
            address = daemon.wait_for("metrics_serving")[0]["address"]
            self.url = f"http://{address}/metrics"

    def due(self, now: float) -> float:
        return SAMPLE_S if self.every is None else max(self.next - now, 0.0)

    def maybe(self, now: float) -> None:
        if self.every is None or now < self.next:
            return
        with urllib.request.urlopen(self.url, timeout=10) as resp:  # noqa: S310 (loopback)
            self.size = len(resp.read())
        self.count += 1
        self.next += self.every


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
def _daemon(args: list[str], metrics_address: str) -> Iterator[Any]:
    from tests.helpers import Daemon  # the repository's subprocess wrapper (JSON events)

    daemon = Daemon(args, metrics_address=metrics_address)
    try:
        yield daemon
    finally:
        daemon.stop()


def measure(
    roots: int,
    until: float,
    *,
    metrics_address: str = "127.0.0.1:0",
    scrape_every: float | None = None,
) -> IdleRun:
    """Start the daemon on ``roots`` fresh roots; sample it from ``ready`` to ``until`` s after.

    ``metrics_address``: the endpoint (``""``: metrics off); ``scrape_every``: GET /metrics this
    often, as Prometheus would (None: never)."""
    base = Path(tempfile.mkdtemp(prefix="ckptkeeper-bench-p5-"))
    result = IdleRun()
    try:
        dirs = _make_roots(base, roots)
        t_spawn = time.perf_counter()
        args = [*map(str, dirs), "--keep-top-k", "3"]
        with _daemon(args, metrics_address) as daemon:
            ready = daemon.wait_for("ready", timeout=120.0)[0]
            daemon.wait_for("first_pass_done", timeout=120.0)  # idle from here (READY is before)
            t_ready = time.perf_counter()
            result.startup_s = t_ready - t_spawn
            result.observer_kinds = list(ready.get("observer_kinds", []))
            pid = daemon.proc.pid
            result.cpu_at_ready = cpu_seconds(pid)
            result.samples.append(Sample(0.0, result.cpu_at_ready, status_kib(pid, "VmRSS")))
            scraper = _Scraper(daemon, scrape_every)
            while (now := time.perf_counter() - t_ready) < until:
                time.sleep(min(SAMPLE_S, until - now, scraper.due(now)))
                t = time.perf_counter() - t_ready
                scraper.maybe(t)
                result.samples.append(Sample(t, cpu_seconds(pid), status_kib(pid, "VmRSS")))
            result.scrapes, result.scrape_bytes = scraper.count, scraper.size
            result.watches = inotify_watches(pid)
            result.hwm_kib = status_kib(pid, "VmHWM")
            result.threads = status_kib(pid, "Threads")
            unexpected = [
                e
                for e in daemon.events
                if e.get("event") not in _STARTUP_EVENTS and e.get("level") != "debug"
            ]
            if unexpected:
                raise RuntimeError(f"P5: the idle daemon acted or complained: {unexpected[:3]}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return result


_STARTUP_EVENTS = ("root_added", "ready", "first_pass_done", "metrics_serving")


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


def _window(res: IdleRun, skip: float) -> tuple[float, float, float]:
    """(CPU seconds over the window, its span in seconds, VmRSS MB at its end)."""
    inside = [s for s in res.samples if s.t >= skip - 1e-3]
    first, last = inside[0], inside[-1]
    return last.cpu - first.cpu, last.t - first.t, last.rss_kib / 1024


def _metrics_row(quick: bool, skip: float, window: float) -> Row:
    """The cost of metrics: the same idle daemon with the endpoint off, and on with a scraper."""
    every = SCRAPE_QUICK_S if quick else SCRAPE_FULL_S
    off = measure(ROOTS, skip + window, metrics_address="")
    on = measure(ROOTS, skip + window, scrape_every=every)
    (cpu_off, span, rss_off), (cpu_on, _, rss_on) = _window(off, skip), _window(on, skip)
    per_min = 60.0 / span if span > 0 else 0.0
    d_cpu, d_rss = (cpu_on - cpu_off) * per_min, rss_on - rss_off
    return Row(
        id="P5-metrics",
        what=f"idle daemon, {ROOTS} roots: metrics on and scraped every {every:.0f} s vs off",
        ours=f"{d_cpu:+.3f} CPU-s/min, {d_rss:+.1f} MB",
        baseline=f"off: {cpu_off * per_min:.3f} CPU-s/min, {rss_off:.1f} MB",
        ratio="—",
        goal=f"<= +{GOAL_METRICS_CPU_S} CPU-s per 60 s and <= +{GOAL_METRICS_RSS_MB:.0f} MB",
        met=None if quick else d_cpu <= GOAL_METRICS_CPU_S and d_rss <= GOAL_METRICS_RSS_MB,
        notes=[
            f'Two more runs of this benchmark: `[daemon] metrics_address = ""` (off) and '
            f"on with GET /metrics every {every:.0f} s ({on.scrapes} scrapes of "
            f"{on.scrape_bytes / 1024:.0f} KiB: {ROOTS} roots with `root` labels); on: "
            f"{cpu_on * per_min:.3f} CPU-s/min, {rss_on:.1f} MB. CPU per minute of the "
            f"window ({span:.0f} s), each run's own periodic sweep included."
            + (
                " Quick: scraped far more often than a real scraper would; not judged."
                if quick
                else ""
            )
        ],
    )


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
        _metrics_row(quick, skip, window),
    ]
