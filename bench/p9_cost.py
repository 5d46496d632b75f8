"""P3-ops and P3-cold: what a cold pass costs per checkpoint (the keeper at scale: bench P9K).

- P3-ops: system calls per checkpoint of a cold ``ckptkeeper sweep`` process (``strace -f -c``)
  over R roots x 20 steps (P3's fleet), minus the same command with no roots (start-up and
  imports); the same for NeMo-RL's ``remove_old_checkpoints()`` loop (`bench.p3_pass.naive_pass`)
  in a Python process, minus that process over no roots. Both in one run.
- P3-cold: the wall time of a whole ``ckptkeeper sweep`` process over 1,000 x 20 (best of 3)
  against the naive loop in a warm process (best of 3 after one run): what cron pays. The row is
  a cron sweep with ``--cache-dir`` (after one sweep that filled the cache), on the default
  ``--jobs`` (the CPUs available); the notes give the same without the cache and on one core.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ckptkeeper.info import MEMO_TRUST_S
from ckptkeeperd.fanout import default_jobs

from .common import Row
from .p3_pass import FLAGS, make_fleet, naive_pass

__all__ = ["count_calls", "run"]

CKPTKEEPER = str(Path(sys.executable).with_name("ckptkeeper"))
OPS_ROOTS_FULL, OPS_ROOTS_QUICK = 100, 5
COLD_ROOTS_FULL, COLD_ROOTS_QUICK = 1000, 20
GOAL_OPS = 4.0

_NAIVE = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from bench.p3_pass import naive_pass
naive_pass([Path(p) for p in sys.argv[1:]])
"""
_SWEEP_FLAGS = ["--keep-top-k", str(FLAGS["keep_top_k"]), "--metric", str(FLAGS["metric_name"])]
_SWEEP_FLAGS.append("--higher-is-better")


def _strace_total(cmd: Sequence[str]) -> tuple[int, dict[str, tuple[int, int]]]:
    """(system calls, {name: (calls, errors)}) of ``cmd`` and its children (strace -f -c)."""
    with tempfile.NamedTemporaryFile(prefix="ckptkeeper-bench-strace-", suffix=".txt") as out:
        subprocess.run(
            ["strace", "-f", "-c", "-o", out.name, *cmd],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        table = Path(out.name).read_text().splitlines()
    by_name: dict[str, tuple[int, int]] = {}
    total = 0
    for line in table:
        fields = line.split()
        if len(fields) < 5 or not fields[3].isdigit():
            continue
        errors = int(fields[4]) if len(fields) == 6 else 0
        if fields[-1] == "total":
            total = int(fields[3])
        else:
            by_name[fields[-1]] = (int(fields[3]), errors)
    return total, by_name


def count_calls(roots: Sequence[Path], extra: Sequence[str] = ()) -> dict[str, object]:
    """System calls per checkpoint: ours (a sweep process with ``extra`` flags) and the naive
    loop, start-up removed."""
    steps = sum(1 for r in roots for p in r.iterdir() if p.name.startswith("step_"))
    naive = [sys.executable, "-c", _NAIVE.format(repo=str(Path(__file__).parent.parent))]
    sweep = [CKPTKEEPER, "sweep", *extra, *_SWEEP_FLAGS]
    ours_all, ours_names = _strace_total([*sweep, *map(str, roots)])
    ours_base, base_names = _strace_total(sweep)
    naive_all, naive_names = _strace_total([*naive, *map(str, roots)])
    naive_base, _ = _strace_total(naive)
    per = {
        name: (calls - base_names.get(name, (0, 0))[0]) / steps
        for name, (calls, _) in ours_names.items()
    }
    failed = sum(e for _, e in ours_names.values()) - sum(e for _, e in base_names.values())
    return {
        "steps": steps,
        "ours": (ours_all - ours_base) / steps,
        "naive": (naive_all - naive_base) / steps,
        "ours_failed": failed / steps,
        "ours_by_name": {
            k: round(v, 2) for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.01
        },
        "naive_by_name": {k: c for k, (c, _) in naive_names.items()},
    }


def _best(runs: int, fn: object) -> float:
    assert callable(fn)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _cpu() -> float:
    """CPU time (user + system) of this process and its waited-for children: a figure a loaded
    machine changes less than the wall time."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def time_cold(roots: Sequence[Path], cache: Path) -> dict[str, float]:
    """A whole sweep process (with the metrics cache in ``cache``, without, on one core) vs the
    naive loop in a warm process; and the CLI's import alone."""
    args = [CKPTKEEPER, "sweep", *_SWEEP_FLAGS, *map(str, roots)]

    def sweeper(*extra: str) -> Callable[[], None]:
        def sweep() -> None:
            cmd = [*args[:2], *extra, *args[2:]]
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)

        return sweep

    def imports() -> None:
        subprocess.run([sys.executable, "-c", "import ckptkeeperd.cli"], check=True)

    def python() -> None:
        subprocess.run([sys.executable, "-c", "pass"], check=True)

    naive_pass(roots)  # warm
    cached = ("--cache-dir", str(cache))
    sweeper(*cached)()  # fills the cache, as a cron sweep's first run does
    variants: dict[str, Callable[[], object]] = {
        "sweep": sweeper(*cached),
        "naive": lambda: naive_pass(roots),
        "uncached": sweeper(),
        "one_core": sweeper("--jobs", "1", *cached),
        "one_core_uncached": sweeper("--jobs", "1"),
    }
    return {
        **_interleaved(3, variants),
        "import": _best(3, imports) - _best(3, python),
    }


def _interleaved(runs: int, variants: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Best wall time (``name``) and least CPU time (``cpu_name``) of each variant, run in turn
    ``runs`` times (a burst of load then falls on all of them alike, not on one)."""
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, fn in variants.items():
            c0, t0 = _cpu(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(_cpu() - c0)
    out = {name: min(times) for name, times in wall.items()}
    out.update({f"cpu_{name}": min(times) for name, times in cpu.items()})
    return out


def _ops_row(ops: dict[str, object]) -> Row:
    ours, naive = float(ops["ours"]), float(ops["naive"])  # type: ignore[arg-type]
    return Row(
        id="P3-ops",
        what="system calls per checkpoint, cold pass (strace -f -c, start-up subtracted)",
        ours=f"{ours:.2f} calls",
        baseline=f"NeMo-RL loop: {naive:.2f} calls",
        ratio=f"{ours / naive:.2f}x the naive loop's" if naive else "—",
        goal=f"<= the naive loop's (aim <= {GOAL_OPS:g})",
        met=ours <= naive,
        notes=[
            f"{ops['steps']} checkpoints; ours by system call (per checkpoint): "
            f"{json.dumps(ops['ours_by_name'])}; failed calls per checkpoint "
            f"{float(ops['ours_failed']):.2f} (ENOENT probes).",  # type: ignore[arg-type]
            "Per finalized step 6: fstatat of the directory (its identity), of "
            "training_info.json (its cache key; no device or FIFO is opened), open + read + "
            "close of it (a read that returns the lstat'ed size is at EOF), faccessat of KEEP. "
            "No config.yaml probe (nothing decides by it). Per root about 27 (listing, trash, "
            "ckptkeeper.toml, statfs): 1.35 per checkpoint at 20 steps. Listing each step "
            "instead of the KEEP probe would cost open + getdents64 x2 + close.",
            f"With `--cache-dir` (filled by a sweep before): {float(ops['cached']):.2f} calls "  # type: ignore[arg-type]
            "per checkpoint: the open + read + close of each unchanged training_info.json and "
            "the KEEP probe of each unchanged step directory replaced by one cache file per "
            "root (stat of the root, open, fstat, read, close); the two fstatat stay.",
        ],
    )


def _cold_row(cold: dict[str, float], roots: int) -> Row:
    speed = cold["naive"] / cold["sweep"]
    naive = cold["naive"]
    return Row(
        id="P3-cold",
        what=f"a whole `ckptkeeper sweep --cache-dir` process over {roots:,} roots x 20 (cron)",
        ours=f"{cold['sweep']:.2f} s",
        baseline=f"NeMo-RL loop in a warm process: {cold['naive']:.2f} s",
        ratio=f"{speed:.2f}x (naive / ours)",
        goal=">= 1.0x",
        met=speed >= 1.0,
        notes=[
            "Same run, the variants in turn, best of 3 each (naive / ours): with the cache on "
            f"{default_jobs()} CPUs "
            f"{cold['sweep']:.2f} s ({speed:.2f}x); without the cache (the default) "
            f"{cold['uncached']:.2f} s ({naive / cold['uncached']:.2f}x); `--jobs 1` with the "
            f"cache {cold['one_core']:.2f} s ({naive / cold['one_core']:.2f}x), without "
            f"{cold['one_core_uncached']:.2f} s ({naive / cold['one_core_uncached']:.2f}x). "
            "The cache was filled by one sweep before (a cron sweep's first run reads every "
            "file and writes the cache: about the uncached time).",
            f"CPU time (user + system, least of 3; the naive loop's in its warm process): naive "
            f"{cold['cpu_naive']:.2f} s; ours with the cache {cold['cpu_sweep']:.2f} s on "
            f"{default_jobs()} CPUs, {cold['cpu_one_core']:.2f} s on one; without the cache "
            f"{cold['cpu_uncached']:.2f} / {cold['cpu_one_core_uncached']:.2f} s (start-up "
            "and imports included).",
            f"Best of 3 each; importing the CLI alone {cold['import']:.2f} s (beyond `python -c "
            "pass`): pydantic (the config), click. structlog (with rich and asyncio) is "
            "imported only when something is logged; sweep and status load no manager, PyYAML, "
            "prometheus_client, watchdog or apscheduler.",
        ],
    )


def run(quick: bool) -> list[Row]:
    base = Path(tempfile.mkdtemp(prefix="ckptkeeper-bench-p7-"))
    rows: list[Row] = []
    try:
        if shutil.which("strace"):
            roots = make_fleet(base / "ops", OPS_ROOTS_QUICK if quick else OPS_ROOTS_FULL)
            time.sleep(MEMO_TRUST_S)  # files changed within it are not cached (coldcache)
            ops = count_calls(roots)
            cached = ("--cache-dir", str(base / "ops-cache"))
            count_calls(roots, cached)  # fills the cache of every root
            ops["cached"] = count_calls(roots, cached)["ours"]
            rows.append(_ops_row(ops))
        cold_roots = COLD_ROOTS_QUICK if quick else COLD_ROOTS_FULL
        fleet = make_fleet(base / "cold", cold_roots)
        time.sleep(MEMO_TRUST_S)
        rows.append(_cold_row(time_cold(fleet, base / "cold-cache"), cold_roots))
        shutil.rmtree(base / "cold", ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return rows
