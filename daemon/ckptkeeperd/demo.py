"""``ckptkeeper demo``: a simulated trainer writes checkpoints while the keeper keeps the root.

It shows event-driven finalize, garbage collection of an abandoned save and pruning by
``keep_top_k`` as they happen, then the final ``status`` table. No arguments, under 30 s.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console

from ckptkeeper import CheckpointManager, scan_root

from .config import config_from_flags, with_metrics_address
from .logs import configure_logging
from .reconcile import preview
from .render import print_reports
from .resolver import resolve_settings
from .service import Keeper

__all__ = ["run_demo"]


def _wait(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def _trainer(root: Path, steps: int, console: Console, done: threading.Event) -> None:
    manager = CheckpointManager(
        {
            "enabled": True,
            "checkpoint_dir": str(root),
            "metric_name": "val_reward",
            "higher_is_better": True,
            "keep_top_k": 3,
            "save_period": 1,
            "retention": "daemon",
        }
    )
    for step in range(1, steps + 1):
        reward = round(0.5 + 0.4 * math.sin(step * 1.3) * (1 - step / (3 * steps)), 3)
        path = manager.init_tmp_checkpoint(step, {"step": step, "val_reward": reward})
        weights = Path(path) / "policy" / "weights"
        weights.mkdir(parents=True)
        for shard in range(4):
            (weights / f"shard_{shard}.pt").write_bytes(os.urandom(64 * 1024))
        if step == steps // 2:
            console.print(
                f"[yellow]trainer[/]: step {step} crashes mid-save ({path.name} never completes)"
            )
            old = time.time() - 3600
            os.utime(path, (old, old))
            for p in Path(path).rglob("*"):
                os.utime(p, (old, old), follow_symlinks=False)
            continue
        t0 = time.perf_counter()
        manager.finalize_checkpoint(path)
        stall_ms = (time.perf_counter() - t0) * 1000
        console.print(
            f"[cyan]trainer[/]: saved step {step} val_reward={reward}  "
            f"(finalize_checkpoint took {stall_ms:.2f} ms)"
        )
        time.sleep(0.25)  # the trainer's "training" between saves
    done.set()


def run_demo(steps: int = 12) -> int:
    console = Console(stderr=False)
    configure_logging("info", json_output=False)
    with tempfile.TemporaryDirectory(prefix="ckptkeeper-demo-") as tmp:
        root = Path(tmp) / "run-a"
        root.mkdir()
        console.rule("ckptkeeper demo")
        console.print(f"root: {root}")
        console.print(
            "policy: keep_top_k=3 by val_reward (higher is better) + latest; stale_after=2s\n"
        )
        config = config_from_flags(
            [str(root)],
            {
                "keep_top_k": 3,
                "metric_name": "val_reward",
                "higher_is_better": True,
                "stale_after": "2s",
                "sweep_interval": "1s",
            },
        )
        keeper = Keeper(with_metrics_address(config, ""))  # the demo serves no metrics
        keeper.start()
        done = threading.Event()
        trainer = threading.Thread(target=_trainer, args=(root, steps, console, done), daemon=True)
        trainer.start()
        try:
            trainer.join(timeout=20)

            def settled() -> bool:
                scan = scan_root(root)
                return not scan.in_flight and not scan.trash and len(scan.steps) <= 4

            ok = _wait(settled, timeout=8)
        finally:
            keeper.shutdown()
        console.print()
        console.rule("final status")
        resolved = resolve_settings(config, config.roots[0].root, {})
        report = preview(root, resolved.settings.policy)
        print_reports([(report, resolved.settings.policy)], console)
        if not (done.is_set() and ok):
            console.print("[red]demo did not settle in time[/]")
            return 1
        return 0
