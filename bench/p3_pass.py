"""P3: one full daemon pass over many roots where nothing is to be done.

Layout: ``roots`` run directories, each with ``steps`` finalized ``step_N`` holding a
training_info.json, a config.yaml, a small weights file and the ``.complete`` marker. The policy
(``keep_top_k = 20``, metric ``val_reward``) keeps every step, so a pass only reads.

"One full pass" is what the daemon does for every root per sweep: `resolve_settings` (reads the
run's ckptkeeper.toml, if any) and `reconcile` (scan and plan without the lock; the plan does
nothing, so no lock is taken and nothing is applied). The baseline is what NeMo-RL's
``CheckpointManager.remove_old_checkpoints`` does per call and root: ``glob step_*``,
``json.load`` every training_info.json, sort by the metric, pick the top k.

Cold: a fresh `InfoCache` after ``echo 3 > /proc/sys/vm/drop_caches`` (when permitted); warm: the
next pass with the same cache. Every root holds ``.ckptkeeper/lock`` and an empty
``.ckptkeeper/trash/``, as a root the daemon has deleted from before (so the trash is listed on
every pass). Peak RSS is measured in a child process (``VmHWM`` / ``ru_maxrss``). The "floor" is
the system calls of a warm pass made with as little Python as possible around them.

``python -m bench.p3_pass [--quick]`` runs it alone.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.common import Row, drop_caches, median, print_rows

__all__ = ["make_fleet", "naive_pass", "ours_pass", "run"]

STEPS = 20
STEP_STRIDE = 100  # step_100, step_200, ...
KEEP_TOP_K = 20
FLAGS: dict[str, Any] = {"keep_top_k": KEEP_TOP_K, "metric_name": "val_reward"}
FLAGS["higher_is_better"] = True  # both set: no config.yaml fallback read per root
WARM_GOAL_S = 0.5
SPEEDUP_GOAL = 5.0
LINEAR_TOLERANCE = 1.3  # per-checkpoint cost at the largest size / at the smallest
REPO = Path(__file__).resolve().parent.parent

_CONFIG_YAML = (
    "policy:\n  model_name: demo\n  train_global_batch_size: 512\n"
    "checkpointing:\n  enabled: true\n  metric_name: val_reward\n  higher_is_better: true\n"
    "  keep_top_k: 20\n  save_period: 100\n"
)


# -- layout ---------------------------------------------------------------------------------


def make_fleet(base: Path, roots: int, steps: int = STEPS, *, seed: int = 3) -> list[Path]:
    """``roots`` run directories under ``base``, each with ``steps`` finalized checkpoints."""
    rng = random.Random(seed)
    out: list[Path] = []
    for r in range(roots):
        root = base / f"run-{r:04d}"
        root.mkdir(parents=True)
        for i in range(1, steps + 1):
            step = i * STEP_STRIDE
            d = root / f"step_{step}"
            d.mkdir()
            info = {"step": step, "val_reward": round(rng.random(), 6), "consumed_samples": step}
            (d / "training_info.json").write_text(json.dumps(info))
            (d / "config.yaml").write_text(_CONFIG_YAML)
            (d / "model.pt").write_bytes(b"\0" * 256)
            (d / ".complete").write_text('{"time": 0, "host": "bench", "pid": 1}')
        (root / ".ckptkeeper" / "trash").mkdir(parents=True)  # deleted from before, now empty
        (root / ".ckptkeeper" / "lock").touch()
        out.append(root)
    return out


def _drop_caches() -> str | None:
    why = drop_caches()
    return None if why is None else f"{why}: cold = fresh InfoCache only"


# -- the two passes -------------------------------------------------------------------------


class OursPass:
    """The daemon's per-sweep work for a fixed set of roots, with its own InfoCache."""

    def __init__(self, roots: Sequence[Path]) -> None:
        from ckptkeeper import InfoCache
        from ckptkeeperd.config import config_from_flags
        from ckptkeeperd.logs import ProblemLog
        from ckptkeeperd.resolver import SettingsResolver
        from ckptkeeperd.roots import expand

        self.resolve_settings = SettingsResolver().resolve  # the memo, fresh as a new daemon's
        self.config = config_from_flags([str(r) for r in roots], FLAGS)
        self.expanded = expand(self.config)
        self.cache = InfoCache()
        self.problems = ProblemLog()

    def __call__(self) -> int:
        """One full pass; returns the number of checkpoints seen (to check nothing was lost)."""
        from ckptkeeperd.logs import get_logger
        from ckptkeeperd.reconcile import reconcile

        seen = 0
        for where, overrides in self.expanded:
            root = where.path
            resolved = self.resolve_settings(self.config, where, overrides)
            report = reconcile(
                root,
                resolved.settings.policy,
                cache=self.cache,
                log=get_logger(root=str(root)),
                problems=self.problems,
            )
            if report.status != "ok" or report.outcomes or report.removed:
                raise RuntimeError(f"pass over {root} was not a no-op: {report.status}")
            count = report.checkpoint_count  # as the daemon counts (no records made for it)
            assert count is not None
            seen += count
        return seen


def ours_pass(roots: Sequence[Path]) -> OursPass:
    return OursPass(roots)


def naive_root(
    root: Path, keep_top_k: int = KEEP_TOP_K, metric: str = "val_reward"
) -> tuple[int, list[str]]:
    """NeMo-RL's per-call work: glob, json.load each training_info.json, sort, top k (+latest).

    Returns how many checkpoints it ranked and those it would delete (none here)."""
    history: list[tuple[int, str, dict[str, Any]]] = []
    for step_dir in glob.glob(str(root / "step_*")):
        info_file = Path(step_dir) / "training_info.json"
        if info_file.exists():
            with open(info_file) as f:
                info = json.load(f)
            history.append((int(Path(step_dir).name.split("_")[1]), step_dir, info))
    if not history:
        return 0, []
    latest = max(step for step, _, _ in history)
    history.sort(key=lambda h: (h[2].get(metric, float("-inf")), h[0]), reverse=True)
    return len(history), [d for step, d, _ in history[keep_top_k:] if step != latest]


def naive_pass(roots: Sequence[Path]) -> int:
    """The baseline over every root; returns the number of checkpoints ranked."""
    seen = 0
    for root in roots:
        ranked, doomed = naive_root(root)
        if doomed:
            raise RuntimeError(f"naive pass would delete {doomed[:3]} in {root}")
        seen += ranked
    return seen


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def floor_pass(roots: Sequence[Path]) -> int:
    """The system calls a warm pass makes per root, with next to no Python around them:
    lstat ckptkeeper.toml and the root, open the root, list it, fstatat each step directory and
    its training_info.json, open .ckptkeeper and trash and list it. Returns the steps seen."""
    seen = 0
    for root in roots:
        r = str(root)
        with contextlib.suppress(FileNotFoundError):
            os.lstat(r + "/ckptkeeper.toml")
        os.lstat(r)
        fd = os.open(r, _DIR)
        try:
            with os.scandir(r) as it:
                names = [e.name for e in it if e.name.startswith("step_")]
            for name in names:
                os.stat(name, dir_fd=fd, follow_symlinks=False)
                os.stat(name + "/training_info.json", dir_fd=fd, follow_symlinks=False)
            seen += len(names)
            area = os.open(".ckptkeeper", _DIR, dir_fd=fd)
            trash = os.open("trash", _DIR, dir_fd=area)
            os.close(area)
            with os.scandir(trash) as it:
                for _ in it:
                    pass
            os.close(trash)
        finally:
            os.close(fd)
    return seen


# -- measurement ----------------------------------------------------------------------------


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Collect first, then keep the collector out of the timed region (as timeit does)."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _time(fn: Any) -> tuple[float, Any]:
    with _no_gc():
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out


def _measure(
    roots: Sequence[Path], sizes: Sequence[int], *, warm_runs: int, cold_runs: int
) -> dict[str, Any]:
    """Cold pass times over all ``roots``; warm pass times over the first ``n`` roots for each
    ``n`` in ``sizes`` (interleaved, so a burst of load elsewhere hits every size alike)."""
    OursPass(roots)()  # make sure .ckptkeeper exists everywhere (steady state)
    cold_ours: list[float] = []
    cold_naive: list[float] = []
    note: str | None = None
    ours = OursPass(roots)
    for _ in range(cold_runs):
        note = _drop_caches() or note
        ours = OursPass(roots)
        t, seen = _time(ours)
        if seen != len(roots) * STEPS:
            raise RuntimeError(f"cold pass saw {seen} checkpoints, not {len(roots) * STEPS}")
        cold_ours.append(t)
        note = _drop_caches() or note
        cold_naive.append(_time(lambda: naive_pass(roots))[0])
    passes = {n: ours if n == len(roots) else OursPass(roots[:n]) for n in sizes}
    for p in passes.values():
        p()  # the cache of the biggest is the last cold pass's; the page cache is warm now
    # A step directory's memo entry is trusted once its last change is MEMO_TRUST_S old: the
    # fleet was just built, so wait that long and pass once more (the daemon's steady state).
    from ckptkeeper.scan import MEMO_TRUST_S

    time.sleep(MEMO_TRUST_S)
    for p in passes.values():
        p()
    parses_before = ours.cache.parses
    hits_before = ours.cache.memo_hits
    warm_ours: dict[int, list[float]] = {n: [] for n in sizes}
    warm_naive: dict[int, list[float]] = {n: [] for n in sizes}
    floor: list[float] = []
    for _ in range(warm_runs):
        for n in sizes:
            warm_ours[n].append(_time(passes[n])[0])
            warm_naive[n].append(_time(lambda n=n: naive_pass(roots[:n]))[0])
        floor.append(_time(lambda: floor_pass(roots))[0])
    memo_hits = ours.cache.memo_hits - hits_before  # the biggest size's passes (its own cache)
    # Where a warm pass goes: each piece alone over every root, same cache (warm).
    from ckptkeeper import scan_root

    resolve = ours.resolve_settings
    policy = resolve(ours.config, ours.expanded[0][0], {}).settings.policy
    marker = policy.complete_marker
    settled = _settled_look()
    now = time.time()
    split = {
        "resolve_settings": lambda: [resolve(ours.config, r, o) for r, o in ours.expanded],
        # first: the scans below replace the memo each verdict stands on
        "the settled look": lambda: [settled(ours.cache, str(r), policy, now) for r in roots],
        "scan_root(memo=True)": lambda: [
            scan_root(r.path, marker=marker, cache=ours.cache, memo=True) for r, _ in ours.expanded
        ],
        "scan_root without the memo (as under the lock)": lambda: [
            scan_root(r.path, marker=marker, cache=ours.cache) for r, _ in ours.expanded
        ],
    }
    pieces = {k: median([_time(fn)[0] for _ in range(warm_runs)]) for k, fn in split.items()}
    return {
        "pieces": pieces,
        "cold_ours": median(cold_ours),
        "cold_naive": median(cold_naive),
        "warm_ours": {n: median(v) for n, v in warm_ours.items()},
        "warm_naive": {n: median(v) for n, v in warm_naive.items()},
        "warm_parses": ours.cache.parses - parses_before,
        "memo_hits": memo_hits,
        "memo_steps": warm_runs * len(roots) * STEPS,
        "floor": median(floor),
        "drop_note": note,
    }


def _settled_look() -> Any:
    """`ckptkeeper.settled.settled` (a no-op where this code has none: no verdict)."""
    try:
        from ckptkeeper.settled import settled
    except ImportError:
        return lambda *_: None
    return settled


def peak_rss(roots_dir: Path, count: int) -> dict[str, int]:
    """Peak RSS (KiB) of a child that imports the daemon, then makes a cold and a warm pass over
    the first ``count`` roots in ``roots_dir``."""
    code = (
        "import json, resource, sys\n"
        "from pathlib import Path\n"
        "from bench.p3_pass import OursPass, _vm_hwm_kib\n"
        "import ckptkeeperd.reconcile, ckptkeeperd.config\n"
        "base = _vm_hwm_kib()\n"
        "roots = sorted(Path(sys.argv[1]).iterdir())[: int(sys.argv[2])]\n"
        "p = OursPass(roots); p(); p()\n"
        "print(json.dumps({'imports_kib': base, 'vmhwm_kib': _vm_hwm_kib(),\n"
        "    'ru_maxrss_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), *sys.path]))}
    out = subprocess.run(
        [sys.executable, "-c", code, str(roots_dir), str(count)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _vm_hwm_kib() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _fs_line(path: Path) -> str:
    best = ("", "?")
    real = os.path.realpath(path)
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            point = parts[1]
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best[0]):
                best = (point, parts[2])
    return f"{best[1]} at {best[0] or '?'}"


def _ratio(speedup: float) -> str:
    """``baseline time / our time`` in words."""
    return f"{speedup:.1f}x faster" if speedup >= 1 else f"{1 / speedup:.1f}x slower"


def run(quick: bool = False, base_dir: str | None = None) -> list[Row]:
    sizes = (25, 50) if quick else (250, 500, 1000)
    runs = 3 if quick else 5
    biggest = sizes[-1]
    work = Path(tempfile.mkdtemp(prefix="ckptkeeper-p3-", dir=base_dir))
    try:
        fleet_dir = work / "fleet"
        t0 = time.perf_counter()
        roots = make_fleet(fleet_dir, biggest)
        build_s = time.perf_counter() - t0
        m = _measure(roots, sizes, warm_runs=runs, cold_runs=1 if quick else 3)
        rss = peak_rss(fleet_dir, biggest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_size = [(n, m["warm_ours"][n], m["warm_naive"][n]) for n in sizes]
    warm_ours, warm_naive = m["warm_ours"][biggest], m["warm_naive"][biggest]

    ckpts = biggest * STEPS
    label = f"{biggest:,} roots x {STEPS} steps ({ckpts:,} checkpoints)"
    common = [
        f"layout on {_fs_line(work.parent)}; built in {build_s:.1f} s (not timed)",
        "pass = resolve_settings + reconcile per root (scan + plan without the lock: nothing to "
        "do, so no lock and nothing applied)",
        "naive = NeMo-RL remove_old_checkpoints per root: glob step_*, json.load each, sort",
    ]
    pieces = list(m["pieces"].items())
    warm_ratio = warm_naive / warm_ours
    cold_ratio = m["cold_naive"] / m["cold_ours"]
    warm_met = warm_ours <= (WARM_GOAL_S * biggest / 1000) and warm_ratio >= SPEEDUP_GOAL
    misses: list[str] = []
    if warm_ratio < SPEEDUP_GOAL:
        allowed = warm_naive / SPEEDUP_GOAL
        misses.append(
            f"Misses >= {SPEEDUP_GOAL:g}x: that allows {allowed:.3f} s, and the system calls of a "
            f"warm pass alone take {m['floor']:.3f} s ({2 * STEPS} fstatat per root: a step "
            "directory for new/removed KEEP files, its training_info.json for rewrites in place), "
            f"leaving {max(allowed - m['floor'], 0) * 1e3:.0f} ms for all Python; what bounds it: "
            "BENCHMARKS.md, Analysis"
        )
    if warm_ours > WARM_GOAL_S * biggest / 1000:
        misses.append(f"Misses <= {WARM_GOAL_S * biggest / 1000:g} s: see BENCHMARKS.md, Analysis")
    rows = [
        Row(
            "P3",
            f"full pass, nothing to do, warm cache: {label}",
            f"{warm_ours:.3f} s",
            f"{warm_naive:.3f} s",
            _ratio(warm_ratio),
            f"<= {WARM_GOAL_S * biggest / 1000:g} s and >= {SPEEDUP_GOAL:g}x faster than naive",
            warm_met,
            [
                *common,
                f"median of {runs}; JSON files parsed in warm passes: {m['warm_parses']}; step "
                f"directories taken from the scan memo: {m['memo_hits']:,} of "
                f"{m['memo_steps']:,}",
                "of a warm pass, alone: "
                + ", ".join(f"{k} {v:.3f} s" for k, v in pieces[:2])
                + " (its system calls, no records, no plan: `ckptkeeper.settled`); the rest is "
                "report + logger; a root changed since its last look is scanned and planned: "
                + ", ".join(f"{k} {v:.3f} s" for k, v in pieces[2:])
                + " (+ plan)",
                f"system-call floor (a warm pass's {2 * STEPS} fstatat per root + the per-root "
                f"calls, next to no Python): {m['floor']:.3f} s = "
                f"{m['floor'] / warm_ours:.0%} of ours",
                f"per checkpoint: ours {warm_ours / ckpts * 1e6:.1f} us, "
                f"naive {warm_naive / ckpts * 1e6:.1f} us, floor {m['floor'] / ckpts * 1e6:.1f} us",
                "load average at the end: " + ", ".join(f"{x:.1f}" for x in os.getloadavg()),
                *misses,
            ],
        ),
        Row(
            "P3-cold",
            f"full pass, nothing to do, cold (fresh InfoCache, caches dropped): {label}",
            f"{m['cold_ours']:.3f} s",
            f"{m['cold_naive']:.3f} s",
            _ratio(cold_ratio),
            "— (informational)",
            None,
            [m["drop_note"] or "page/dentry/inode caches dropped before each cold pass"],
        ),
    ]
    per_ckpt = [(n, o / (n * STEPS) * 1e6, nv / (n * STEPS) * 1e6) for n, o, nv in per_size]
    growth = per_size[-1][1] / per_size[0][1]
    size_ratio = sizes[-1] / sizes[0]
    linear_met = per_ckpt[-1][1] <= per_ckpt[0][1] * LINEAR_TOLERANCE
    rows.append(
        Row(
            "P3-linear",
            f"warm pass time per checkpoint at {'/'.join(str(n) for n in sizes)} roots "
            f"x {STEPS} steps",
            " / ".join(f"{us:.1f}" for _, us, _ in per_ckpt) + " us",
            " / ".join(f"{us:.1f}" for _, _, us in per_ckpt) + " us",
            f"{sizes[0] * STEPS:,} -> {ckpts:,} checkpoints: time x{growth:.2f} "
            f"(linear: x{size_ratio:g})",
            f"linear in checkpoints (per-checkpoint cost within {LINEAR_TOLERANCE:g}x)",
            linear_met,
            [f"ours / naive per checkpoint, median of {runs} warm passes each, sizes interleaved"],
        )
    )
    rows.append(
        Row(
            "P3-rss",
            f"peak RSS of a daemon process making a cold + warm pass over {ckpts:,} checkpoints",
            f"{rss['vmhwm_kib'] / 1024:.1f} MiB",
            f"{rss['imports_kib'] / 1024:.1f} MiB after imports",
            f"+{(rss['vmhwm_kib'] - rss['imports_kib']) / 1024:.1f} MiB for the passes",
            "— (informational)",
            None,
            [
                "VmHWM of a child process (its ru_maxrss "
                f"{rss['ru_maxrss_kib'] / 1024:.1f} MiB also counts the parent's image it was "
                "spawned from, so VmHWM is the figure)"
            ],
        )
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print_rows(run(quick=args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
