"""P9K (P6 in issue 9): one keeper at scale, over 1,000 x 100 and 10,000 x 100 checkpoints.

``ckptkeeper run`` over R roots x S steps (plain ``step_N`` dirs, each with a
training_info.json; keep every checkpoint, inotify, hourly sweep): time from start to READY (every
root and its saves in flight watched), marker -> ``step_N`` of a few saves made during the first
pass (in the roots whose first pass comes last: not held back by the backlog), time to the first
pass's end, RSS over the same keeper on one empty root (bytes per checkpoint), threads, and the
CPU it burns idle over a window starting 1 s after the first pass.

The trees are built once under a fixed store (``$CKPTKEEPER_BENCH_STORE``, default
``/var/tmp/ckptkeeper-bench``; 10,000 x 100 is about 2 M inodes) and reused by later runs: a
stamp file says a tree is complete and how long it took to build. ``--quick`` uses tiny trees in
a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import Row
from .p5_idle import cpu_seconds, status_kib

__all__ = ["build_tree", "measure_keeper", "run"]

STORE = Path(os.environ.get("CKPTKEEPER_BENCH_STORE", "/var/tmp/ckptkeeper-bench"))
STAMP = ".p9k-built"
SHAPES_FULL = ((1000, 100), (10000, 100))
SHAPES_QUICK = ((10, 10), (20, 10))
IDLE_WINDOW_FULL, IDLE_WINDOW_QUICK = 60.0, 3.0
GOAL_THREADS, GOAL_BYTES_PER_CKPT, GOAL_READY_S, GOAL_IDLE_CPU_PER_MIN = 50, 400, 120.0, 0.2
GOAL_SAVE_S = 5.0  # ours: a save during the first pass is final within this (not held back)
SAVES, SAVE_GAP_S_PER_CKPT = 5, 2e-5  # 5 saves, 20 s apart at 1 M (2 s at 100k)


def build_tree(roots: int, steps: int, store: Path = STORE) -> tuple[list[Path], float, bool]:
    """``roots`` x ``steps`` checkpoints under ``store`` (built once, then reused): the roots,
    the seconds the build took (when it was made) and whether this call built it."""
    base = store / f"p9k-{roots}x{steps}"
    stamp = base / STAMP
    names = [base / f"run-{r:05d}" for r in range(roots)]
    if stamp.exists():
        return names, float(stamp.read_text().split()[-1]), False
    shutil.rmtree(base, ignore_errors=True)
    started = time.perf_counter()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for root in names:
        os.makedirs(root)
        for n in range(1, steps + 1):
            d = f"{root}/step_{n}"
            os.mkdir(d)
            fd = os.open(f"{d}/training_info.json", flags, 0o644)
            try:
                os.write(fd, f'{{"step": {n}, "val_reward": {n % 7}}}'.encode())
            finally:
                os.close(fd)
    took = time.perf_counter() - started
    stamp.write_text(f"{roots} {steps} {took:.1f}\n")
    return names, took, True


def drop_caches() -> bool:
    """Empty the page, dentry and inode caches (root only): every keeper starts cold, as on a
    node that boots. False when it cannot (not root): the tree is then as warm as it is."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def _system_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / os.sysconf("SC_CLK_TCK")


def _save(root: Path, step: int, *, marker: bool = True) -> float:
    """A trainer's save of ``step`` in ``root`` (its training_info.json, then the marker): the
    ``perf_counter`` just before the marker is written (its rename, then its directory's fsync,
    during which the keeper may finalize the save already)."""
    from ckptkeeper import write_marker

    tmp = root / f"tmp_step_{step}"
    tmp.mkdir(exist_ok=True)
    (tmp / "training_info.json").write_text(f'{{"step": {step}, "val_reward": 1}}')
    made = time.perf_counter()
    if marker:
        write_marker(tmp, ".complete")
    return made


def _saves_during(daemon: Any, roots: Sequence[Path], step: int, gap: float) -> list[float]:
    """One save in each of ``roots`` (their first passes come last), ``gap`` s apart while the
    first pass runs: seconds from each marker to its ``step_N`` (-1.0: none made, the pass was
    over)."""
    latencies: list[float] = []
    for root in roots:
        if daemon.find("first_pass_done"):
            latencies.append(-1.0)
            continue
        made = _save(root, step)
        final = root / f"step_{step}"
        while not final.exists() and time.perf_counter() - made < 1800.0:
            time.sleep(0.005)
        latencies.append(time.perf_counter() - made)
        time.sleep(gap)
    return latencies


def _undo_saves(roots: Sequence[Path], step: int) -> None:
    """The tree as built again (for the next run)."""
    for root in roots:
        for name in (f"step_{step}", f"tmp_step_{step}"):
            shutil.rmtree(root / name, ignore_errors=True)


def _next_step(roots: Sequence[Path]) -> int:
    """A step above every built one (``build_tree``'s stamp gives the count)."""
    stamp = roots[0].parent / STAMP if roots else None
    if stamp is None or not stamp.exists():
        return 1_000_000
    return int(stamp.read_text().split()[1]) + 1


def measure_keeper(
    roots: Sequence[Path], idle: float, *, cold: bool, saves: int = 0, gap: float = 0.0
) -> dict[str, Any]:
    """READY time, the first pass's end, marker -> ``step_N`` latencies of ``saves`` saves made
    during it (the first in a save in flight since before the start), RSS (KiB), threads and
    idle CPU seconds over ``idle`` s of one keeper; ``cold``: the caches are dropped first."""
    from tests.helpers import Daemon

    late, step = list(roots[len(roots) - saves :]) if saves else [], _next_step(roots)
    if late:  # in flight when the keeper starts: only the start's listing watches it in time
        _save(late[0], step, marker=False)
    dropped = drop_caches() if cold else False
    args = [*map(str, roots), "--sweep-interval", "1h", "--observer", "inotify"]
    t0 = time.perf_counter()
    daemon = Daemon(args)
    try:
        daemon.wait_ready(timeout=900.0, first_pass=False)
        ready = time.perf_counter() - t0
        pid = daemon.proc.pid
        ready_cpu = cpu_seconds(pid)
        latencies = _saves_during(daemon, late, step, gap)
        daemon.wait_for("first_pass_done", timeout=1800.0)
        first_pass = time.perf_counter() - t0
        pass_cpu, pass_sys = cpu_seconds(pid), _system_seconds(pid)
        time.sleep(1.0)  # the first pass's stragglers (watch updates) settle
        cpu0 = cpu_seconds(pid)
        time.sleep(idle)
        idle_cpu = cpu_seconds(pid) - cpu0
        return {
            "ready": ready,
            "ready_cpu": ready_cpu,
            "first_pass": first_pass,
            "pass_cpu": pass_cpu,
            "pass_sys": pass_sys,
            "saves": latencies,
            "cold": float(dropped),
            "load": os.getloadavg()[0],
            "rss_kib": status_kib(pid, "VmRSS"),
            "hwm_kib": status_kib(pid, "VmHWM"),
            "threads": status_kib(pid, "Threads"),
            "idle_cpu_per_min": idle_cpu / idle * 60,
        }
    finally:
        daemon.stop(timeout=60.0)
        _undo_saves(late, step)


def _latency_text(latencies: list[float]) -> str:
    during = sorted(x for x in latencies if x >= 0)
    if not during:
        return "no save made during the first pass"
    p50, top = during[len(during) // 2] * 1e3, during[-1] * 1e3
    return f"{len(during)} saves during it: marker -> step_N p50 {p50:.0f} ms, max {top:.0f} ms"


def _row(big: dict[str, Any], base: dict[str, Any], shape: tuple[int, int], built: str) -> Row:
    count = shape[0] * shape[1]
    per = (big["rss_kib"] - base["rss_kib"]) * 1024 / count
    during = [x for x in big["saves"] if x >= 0]
    met = (
        big["threads"] <= GOAL_THREADS
        and per <= GOAL_BYTES_PER_CKPT
        and big["ready"] <= GOAL_READY_S
        and big["idle_cpu_per_min"] <= GOAL_IDLE_CPU_PER_MIN
        and bool(during)
        and max(during) <= GOAL_SAVE_S
    )
    label = (
        f"{count / 1e6:g}M" if count >= 1e6 else f"{count // 1000}k" if count >= 1e3 else str(count)
    )
    return Row(
        id=f"P9K-{label}",
        what=f"one keeper over {shape[0]:,} roots x {shape[1]} checkpoints ({count:,})",
        ours=(
            f"READY {big['ready']:.1f} s; first pass {big['first_pass']:.1f} s "
            f"({big['pass_cpu']:.0f} CPU-s); {_latency_text(big['saves'])}; "
            f"RSS {big['rss_kib'] / 1024:.0f} MB; "
            f"{big['threads']:.0f} threads; idle {big['idle_cpu_per_min']:.3f} CPU-s/min"
        ),
        baseline=(
            f"one empty root: RSS {base['rss_kib'] / 1024:.0f} MB, {base['threads']:.0f} threads"
        ),
        ratio=f"{per:.0f} bytes per checkpoint over the base",
        goal=(
            "<= 50 threads; <= 400 B/checkpoint; READY <= 2 min at 1 M; idle <= 0.2 CPU-s/min; "
            f"saves during the first pass final within {GOAL_SAVE_S:g} s (ours)"
        ),
        met=met,
        notes=[
            f"{label}: peak RSS {big['hwm_kib'] / 1024:.0f} MB; READY (every root watched) "
            f"with {big['ready_cpu']:.1f} CPU-s; first pass {big['pass_cpu'] * 1e6 / count:.0f} "
            f"CPU-us per checkpoint ({big['pass_sys']:.0f} CPU-s of it in the kernel); "
            "marker -> step_N of each save (s, the first in a save in flight since before the "
            f"start, -1: made after the pass): {', '.join(f'{x:.3f}' for x in big['saves'])}; "
            f"{'cold start (caches dropped)' if big['cold'] else 'caches as they were'}; "
            f"load average {big['load']:.1f} at the first pass's end; tree {built}.",
        ],
    )


_NOTE = (
    "P6 of issue 9 (P6 on main is the status page; replaces the P9-keeper row of P9). Roots are "
    "plain `step_N` dirs with a training_info.json, keep every checkpoint (no retention rule), "
    "inotify, hourly sweep. READY: every root and its saves in flight watched (one listing of "
    "each root); the first pass over the backlog goes on after it (`first_pass_done`), and "
    f"{SAVES} saves are made during it in the roots whose first pass comes last. The idle "
    "window starts 1 s after the first pass. The trees are built once and reused; before each "
    "keeper starts the page, dentry and inode caches are dropped (as root), so both sizes are "
    "measured cold, as on a node that boots. The start runs 12 roots at a time (START_WORKERS)."
)


def run(quick: bool) -> list[Row]:
    shapes = SHAPES_QUICK if quick else SHAPES_FULL
    idle = IDLE_WINDOW_QUICK if quick else IDLE_WINDOW_FULL
    scratch = Path(tempfile.mkdtemp(prefix="ckptkeeper-bench-p9k-"))
    store = scratch if quick else STORE
    rows: list[Row] = []
    try:
        empty = scratch / "empty" / "run"
        empty.mkdir(parents=True)
        base = measure_keeper([empty], idle, cold=False)
        for shape in shapes:
            roots, took, now = build_tree(*shape, store=store)
            built = f"built in {took:.0f} s" + ("" if now else " (reused)")
            gap = shape[0] * shape[1] * SAVE_GAP_S_PER_CKPT
            big = measure_keeper(roots, idle, cold=not quick, saves=SAVES, gap=gap)
            rows.append(_row(big, base, shape, built))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows[-1].notes.append(_NOTE)
    return rows
