"""P6: the status page and the disk-pressure measurements.

- P6-render: `render_page` of one root with 1,000 checkpoints (decisions table + SVG chart), from a
  real scan and plan (the median of several renders; the scan and plan are not counted).
- P6-browser: headless Chromium loading that page (``--dump-dom``: parse, style, layout, and the
  DOM written out), minus the same browser loading an empty page (its start-up), medians of runs
  with a fresh profile each. Skipped with the reason when no ``chromium`` is on PATH.
- P6-size: what ``min_free`` costs a pass: the first size walk (`tree_bytes`; the OS's caches
  are warm, as after a save) of one checkpoint of 1,000 files next to the scan of a root, and
  the cached pass afterwards (`disk_facts` with the keeper's cache: one ``lstat`` per
  checkpoint, no walk).

``python -m bench.p6_page [--quick]`` runs it alone.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import Row, median

__all__ = ["run"]

RENDER_GOAL_S = 1.0


def _root(base: Path, steps: int) -> Path:
    root = base / "run"
    for step in range(1, steps + 1):
        d = root / f"step_{step}"
        d.mkdir(parents=True)
        info = {"step": step, "val_reward": round((step * 7919 % 1000) / 1000, 4)}
        (d / "training_info.json").write_text(json.dumps(info))
    (root / "step_7" / "KEEP").touch()
    return root


def _render(base: Path, steps: int, repeats: int) -> tuple[float, Path, int]:
    from ckptkeeper import Policy
    from ckptkeeperd.page import render_page
    from ckptkeeperd.reconcile import preview

    root = _root(base, steps)
    policy = Policy(keep_top_k=5, metric_name="val_reward", higher_is_better=True)
    report = preview(root, policy)
    times = []
    page = ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        page = render_page([(report, policy)])
        times.append(time.perf_counter() - t0)
    out = base / "status.html"
    out.write_text(page)
    return median(times), out, len(page.encode())


def _browser(page: Path, base: Path, repeats: int) -> tuple[float, float] | str:
    from tests.chromium import find_chromium, run_chromium

    exe = find_chromium()
    if exe is None:
        return "no chromium on PATH (Debian: apt-get install chromium)"
    empty = base / "empty.html"
    empty.write_text("<!DOCTYPE html><html><body></body></html>")

    def load(target: Path) -> float:
        t0 = time.perf_counter()
        proc = run_chromium(exe, target, "--dump-dom")
        if proc.returncode != 0:
            raise RuntimeError(f"chromium exit {proc.returncode}: {proc.stderr[-200:]!r}")
        return time.perf_counter() - t0

    load(empty)  # warms the page cache for the browser's own files, outside the figures
    full = median([load(page) for _ in range(repeats)])
    bare = median([load(empty) for _ in range(repeats)])
    return full, bare


def _sizes(base: Path, files: int) -> tuple[float, float, float]:
    from ckptkeeper import InfoCache, Policy, scan_root
    from ckptkeeper.space import disk_facts, tree_bytes

    root = base / "sized"
    step = root / "step_1"
    for i in range(files):
        sub = step / f"shard_{i // 100}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"part_{i}.bin").write_bytes(b"\0" * 4096)
    (step / "training_info.json").write_text('{"step": 1}')
    t0 = time.perf_counter()
    scan = scan_root(root)
    scan_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tree_bytes(step)
    walk_s = time.perf_counter() - t0
    cache, policy = InfoCache(), Policy(min_free="1")
    disk_facts(scan, policy, 0.0, cache)
    t0 = time.perf_counter()
    disk_facts(scan, policy, 0.0, cache)
    cached_s = time.perf_counter() - t0
    return scan_s, walk_s, cached_s


def run(quick: bool = False) -> list[Row]:
    steps, repeats, files = (1000, 3, 300) if quick else (1000, 7, 1000)
    with tempfile.TemporaryDirectory(prefix="ckptkeeper-p6-") as tmp:
        base = Path(tmp)
        render_s, page, size = _render(base, steps, repeats)
        browser = _browser(page, base, 2 if quick else 5)
        scan_s, walk_s, cached_s = _sizes(base, files)
    rows = [
        Row(
            "P6-render",
            f"render_page(): one root, {steps:,} checkpoints (table + SVG chart)",
            f"{render_s * 1000:.0f} ms ({size / 1e6:.2f} MB of HTML)",
            "—",
            "—",
            f"< {RENDER_GOAL_S:.0f} s",
            render_s < RENDER_GOAL_S,
        )
    ]
    if isinstance(browser, str):
        rows.append(
            Row(
                "P6-browser",
                "headless Chromium loads the page",
                "skipped",
                "—",
                "—",
                f"< {RENDER_GOAL_S:.0f} s",
                None,
                [browser],
            )
        )
    else:
        full, bare = browser
        rows.append(
            Row(
                "P6-browser",
                f"headless Chromium loads the {steps:,}-checkpoint page (--dump-dom)",
                f"{max(full - bare, 0) * 1000:.0f} ms beyond start-up",
                f"empty page: {bare * 1000:.0f} ms (start-up)",
                "—",
                f"< {RENDER_GOAL_S:.0f} s",
                full - bare < RENDER_GOAL_S,
                [f"whole run with the page {full * 1000:.0f} ms, medians of runs"],
            )
        )
    rows.append(
        Row(
            "P6-size",
            f"min_free sizing: first walk of one {files:,}-file checkpoint, then a cached pass",
            f"walk {walk_s * 1000:.1f} ms; cached {cached_s * 1000:.2f} ms",
            f"scan of the root: {scan_s * 1000:.1f} ms",
            "—",
            "each checkpoint walked once in its life",
            None,
            [
                "sizes are st_blocks sums cached by (st_dev, st_ino, st_ctime_ns): a finalized "
                "checkpoint is walked once; a cached pass costs one lstat per checkpoint measured",
            ],
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.p6_page")
    parser.add_argument("--quick", action="store_true")
    for row in run(parser.parse_args().quick):
        print(f"{row.id}: {row.what}: {row.ours} (baseline {row.baseline}; goal {row.goal})")


if __name__ == "__main__":
    main()
