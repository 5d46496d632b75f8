"""P2-scale: marker -> ``step_N`` visible as the root grows (the real daemon, inotify).

One ``ckptkeeper run ROOT --observer inotify --sweep-interval 1h`` per size, on a root that already
holds 100, 1,000 or 5,000 finalized checkpoints and keeps every one (no retention rule: the
keeper only finalizes). A trainer's save is written as in P2 (``tmp_step_N`` with two data files
and training_info.json, then the marker as ``write_marker`` writes it: a temporary file, fsync,
rename into place, fsync of the directory); the clock runs from just before the marker's rename
(the moment it appears) to ``lstat(step_N)`` succeeding (0.2 ms polls). (Until 2026-11-30 16:30 it
ran from ``write_marker``'s return, after its directory fsync, which the keeper's work overlaps:
a fast finalize then measured ~0, the floor, and ratios to it meant little.) Two ways of
writing: with a pause (the tmp dir is left for 4 s first, as a real save is for minutes: its
watch is in place and the root was listed since its creation) and without (the marker follows
the creation of ``tmp_step_N`` at once: the root changed since its last listing). Either way the
marker's partial scan takes the names created since the last full listing from the root's
inotify journal and lists nothing (the case without a pause used to wait for the 150 ms
debounce, then to list the root's names).
Saves are 1.5 s apart, so the full pass that follows each finalize (debounced) has ended: a full
pass of a 5,000-step root running at the marker's moment shares the GIL (and 2 cores) with the
marker's pass and would be measured instead.

The alternative in the same run is the same daemon at the smallest size: the goal is that the
latency does not grow with the root (p50 at the largest size within 2x of the smallest).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from .common import Row, percentile
from .p2_latency import _daemon, _make_tmp, _wait_visible

__all__ = ["measure_scale", "run"]

SIZES_FULL = (100, 1000, 5000)
SIZES_QUICK = (20, 200)
COUNT_FULL = 20
COUNT_QUICK = 4
PAUSE_FULL_S, PAUSE_QUICK_S = 4.0, 0.3
GAP_FULL_S, GAP_QUICK_S = 1.5, 0.6
TIMEOUT_S = 10.0
GOAL_P50, GOAL_P99, GOAL_FLAT = 0.010, 0.050, 2.0


def _populate(root: Path, steps: int) -> None:
    for n in range(1, steps + 1):
        d = root / f"step_{n}"
        d.mkdir(parents=True)
        (d / "training_info.json").write_text(f'{{"step": {n}, "val_loss": {1.0 / n:.6f}}}')


def _write_marker(tmp: Path, name: str) -> float:
    """The marker as `ckptkeeper.write_marker` writes it; the perf_counter time just before its
    rename into place."""
    temp = tmp / f".{name}.tmp-{os.getpid()}"
    data = json.dumps({"time": time.time(), "pid": os.getpid()}).encode()
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        t0 = time.perf_counter()
        os.rename(temp, tmp / name)
        os.fsync(dir_fd)  # the keeper may have renamed the directory: its fd still syncs
    finally:
        os.close(dir_fd)
    return t0


def measure_scale(
    size: int, count: int, pause: float = PAUSE_FULL_S, gap: float = GAP_FULL_S
) -> dict[str, list[float]]:
    """Seconds from marker to visible, ``count`` saves each way (paused / at once)."""
    base = Path(tempfile.mkdtemp(prefix=f"ckptkeeper-bench-p2s-{size}-"))
    root = base / "run"
    _populate(root, size)
    out: dict[str, list[float]] = {"pause": [], "at_once": [], "timeouts": []}
    args = [str(root), "--observer", "inotify", "--sweep-interval", "1h"]
    try:
        with _daemon(args):
            step = size
            for i in range(2 * count):
                step += 1
                how = "pause" if i % 2 == 0 else "at_once"
                tmp = _make_tmp(root, step)
                if how == "pause":
                    time.sleep(pause)  # the daemon sees tmp_step_N, watches it, lists the root
                t0 = _write_marker(tmp, ".complete")
                seen = _wait_visible(root / f"step_{step}", TIMEOUT_S)
                if seen is None:
                    out["timeouts"].append(float(step))
                else:
                    out[how].append(seen - t0)
                time.sleep(gap)  # saves are minutes apart: the debounced full pass has run
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


def _ms(values: list[float], pct: float) -> str:
    return f"{percentile(values, pct) * 1e3:.1f} ms" if values else "—"


def run(quick: bool) -> list[Row]:
    sizes = SIZES_QUICK if quick else SIZES_FULL
    count = COUNT_QUICK if quick else COUNT_FULL
    pause = PAUSE_QUICK_S if quick else PAUSE_FULL_S
    gap = GAP_QUICK_S if quick else GAP_FULL_S
    results = {size: measure_scale(size, count, pause, gap) for size in sizes}
    rows: list[Row] = []
    small, large = results[sizes[0]], results[sizes[-1]]
    for how, words in (("pause", "tmp dir watched first"), ("at_once", "marker right after mkdir")):
        p50s = {s: percentile(r[how], 50) if r[how] else float("inf") for s, r in results.items()}
        p99_large = percentile(large[how], 99) if large[how] else float("inf")
        flat = p50s[sizes[-1]] / p50s[sizes[0]] if p50s[sizes[0]] else float("inf")
        timeouts = sum(len(r["timeouts"]) for r in results.values())
        met = (
            p50s[sizes[-1]] <= GOAL_P50
            and p99_large <= GOAL_P99
            and flat <= GOAL_FLAT
            and not timeouts
        )
        per_size = "; ".join(
            f"{s:,} steps: p50 {_ms(r[how], 50)} / p99 {_ms(r[how], 99)} / max "
            + (f"{max(r[how]) * 1e3:.1f} ms" if r[how] else "—")
            for s, r in results.items()
        )
        rows.append(
            Row(
                id=f"P2-scale-{'pause' if how == 'pause' else 'nopause'}",
                what=f"marker -> step_N visible vs checkpoints in the root ({words})",
                ours=f"{sizes[-1]:,} steps: p50 {_ms(large[how], 50)} / p99 {_ms(large[how], 99)}",
                baseline=f"{sizes[0]:,} steps: p50 {_ms(small[how], 50)}",
                ratio=f"{flat:.2f}x (p50, largest / smallest)",
                goal="p50 <= 10 ms, p99 <= 50 ms at 5,000; within 2x of 100",
                met=met,
                notes=[
                    f"{count} saves per size; {per_size}"
                    + (f"; {timeouts} not visible within {TIMEOUT_S:.0f} s" if timeouts else ""),
                    "The marker's event hands its tmp dir to a pass of its own (watch.py "
                    "on_marker -> Keeper.finalize_now -> reconcile.finalize_marked): a locked "
                    "RECOVERY pass over a partial scan of step N: only the names of step N are "
                    "lstat'ed (the layout's spellings, the odd ones the last full listing "
                    "found, and the names created since that listing as the root's inotify "
                    "watch journaled them: ckptkeeperd.journal), the root is not listed; the "
                    "full pass follows debounced.",
                ],
            )
        )
    return rows
