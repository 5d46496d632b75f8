"""Shared pieces of the benchmarks: result rows, timing helpers, the machine line."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Row", "machine_line", "median", "percentile", "print_rows", "timed"]


@dataclass
class Row:
    """One line of the benchmark table."""

    id: str  # "P1", "P2-inotify", ...
    what: str  # what was measured, in words
    ours: str  # our figure, formatted with units
    baseline: str  # the alternative's figure in the same run ("—" if none)
    ratio: str  # e.g. "2400x shorter" ("—" if none)
    goal: str  # the goal from the issue, in words
    met: bool | None  # None: informational row without a goal
    notes: list[str] = field(default_factory=list)


def print_rows(rows: Iterable[Row]) -> None:
    """A module's rows as plain text (``python -m bench.<module>``)."""
    for row in rows:
        print(f"{row.id}: {row.what}\n  ours {row.ours} | baseline {row.baseline} | {row.ratio}")
        print(f"  goal {row.goal}: {row.met}")
        for note in row.notes:
            print(f"  - {note}")


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * pct / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (perf_counter)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def machine_line() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.node() or 'host'}: {os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB, "
        f"Linux {platform.release()}, Python {platform.python_version()}"
    )


def drop_caches() -> str | None:
    """sync, then drop the page, dentry and inode caches; None on success, else why not."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        return f"could not drop caches ({exc.strerror})"
    return None
