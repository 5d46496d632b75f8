"""P7: the cost of a pass per checkpoint for each layout, next to nemo-rl's.

Each layout gets one root of ``CHECKPOINTS`` complete checkpoints as its trainer writes them (the
files a real save leaves: nemo-rl's training_info.json, config.yaml and weights; HF's eight files
with trainer_state.json; DCP's .metadata and a shard; Orbax's metadata and metrics item;
Megatron's and DeepSpeed's rank directories and tracker file; Lightning's ``.ckpt`` files). The
policy keeps them all, so a pass only reads (``settle_after`` 0: every checkpoint counts). Two
figures per layout, each the best of ``ROUNDS`` passes (taken in turns with the other layouts)
divided by the number of checkpoints:

- **locked pass**: `locked_pass` with a fresh `InfoCache` (what a sweep or the daemon's acting
  pass does: the lock, a full scan, the plan, nothing to apply);
- **daemon look**: a memoized scan and the plan with a warm cache (the unlocked look the daemon
  makes on every event and sweep before deciding to take the lock).

The goal from the issue: no layout makes a pass more than 1.5x costlier per checkpoint than
nemo-rl's. ``python -m bench.p7_layouts [--quick]`` runs it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import Row
from ckptkeeper.plan import Action

__all__ = ["ROOTS", "measure", "run"]

CHECKPOINTS = 200
ROUNDS = 15
GOAL = 1.5


def _files(path: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)


def _nemo(root: Path, n: int) -> None:
    for i in range(1, n + 1):
        info = json.dumps({"step": i, "val_reward": i / n}).encode()
        cfg = b"checkpointing:\n  metric_name: val_reward\n"
        _files(
            root / f"step_{i}",
            {
                "training_info.json": info,
                "config.yaml": cfg,
                ".complete": b"{}",
                "policy/weights.pt": b"w",
            },
        )


def _hf(root: Path, n: int) -> None:
    for i in range(1, n + 1):
        state = {"log_history": [{"step": i, "loss": 1.0}, {"step": i, "eval_loss": 1.0 / i}]}
        names = (
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "optimizer.pt",
            "rng_state.pth",
            "scheduler.pt",
            "training_args.bin",
        )
        files = {name: b"w" for name in names}
        files["trainer_state.json"] = json.dumps(state).encode()
        _files(root / f"checkpoint-{i}", files)


def _dcp(root: Path, n: int) -> None:
    for i in range(1, n + 1):
        _files(root / f"step-{i}", {"__0_0.distcp": b"w", ".metadata": b"m"})


def _orbax(root: Path, n: int) -> None:
    for i in range(1, n + 1):
        meta = b'{"metrics": {}}'
        files = {
            "_CHECKPOINT_METADATA": meta,
            "commit_success.txt": b"",
            "metrics/metrics": json.dumps({"loss": 1 / i}).encode(),
            "default/_METADATA": b"{}",
        }
        _files(root / str(i), files)


def _megatron(root: Path, n: int) -> None:
    for i in range(1, n + 1):
        _files(root / f"iter_{i:07d}", {"mp_rank_00/model_optim_rng.pt": b"w"})
    (root / "latest_checkpointed_iteration.txt").write_text(str(n))


def _deepspeed(root: Path, n: int) -> None:
    for i in range(1, n + 1):
        _files(root / f"global_step{i}", {"mp_rank_00_model_states.pt": b"w"})
    (root / "latest").write_text(f"global_step{n}")


def _lightning(root: Path, n: int) -> None:
    for i in range(1, n + 1):
        (root / f"epoch=0-step={i}-val_loss={1 / i:.4f}.ckpt").write_bytes(b"w")


ROOTS: dict[str, tuple[Callable[[Path, int], None], dict[str, object]]] = {
    "nemo-rl": (_nemo, {"metric_name": "val_reward", "higher_is_better": True}),
    "hf-trainer": (_hf, {"metric_name": "eval_loss", "settle_after": 0.0}),
    "torchtitan": (_dcp, {}),
    "orbax": (_orbax, {"metric_name": "loss"}),
    "megatron": (_megatron, {}),
    "deepspeed": (_deepspeed, {}),
    "lightning": (_lightning, {"metric_name": "val_loss", "settle_after": 0.0}),
}


class _Root:
    """One layout's root and the two ways a pass reads it."""

    def __init__(self, base: Path, layout: str, n: int) -> None:
        from ckptkeeper import Policy
        from ckptkeeper.info import InfoCache
        from ckptkeeper.passes import locked_pass

        build, keys = ROOTS[layout]
        self.root, self.n = base / layout, n
        self.root.mkdir()
        build(self.root, n)
        self.policy = Policy(layout=layout, keep_top_k=n + 1, **keys)  # type: ignore[arg-type]
        locked_pass(self.root, self.policy)  # creates .ckptkeeper/, as a keeper that ran before
        self.cache = InfoCache(clock_ns=lambda: time.time_ns() + 10**10)  # memo trusted at once
        self.look()

    def locked(self) -> float:
        from ckptkeeper.info import InfoCache
        from ckptkeeper.passes import locked_pass

        started = time.perf_counter()
        result = locked_pass(self.root, self.policy, cache=InfoCache())
        took = time.perf_counter() - started
        assert result.plan is not None and not result.plan.deleted_steps
        assert not result.plan.by_action(Action.WAIT), "every checkpoint must count"
        return took / self.n

    def look(self) -> float:
        from ckptkeeper.plan import plan
        from ckptkeeper.scan import scan_root

        started = time.perf_counter()
        now = time.time()
        scan = scan_root(
            self.root,
            layout=self.policy.scan_layout(),
            marker=self.policy.complete_marker,
            cache=self.cache,
            stale_before=now - self.policy.stale_after,
            memo=True,
        )
        plan(scan, self.policy, now)
        return (time.perf_counter() - started) / self.n


def measure(n: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Per layout (locked pass, daemon look): the best of ``rounds`` seconds per checkpoint.
    The layouts take turns within each round, so a load from elsewhere on a shared machine
    weighs on all of them alike; the best of the rounds is the least disturbed."""
    base = Path(tempfile.mkdtemp(prefix="p7-"))
    try:
        roots = {layout: _Root(base, layout, n) for layout in ROOTS}
        locked: dict[str, list[float]] = {layout: [] for layout in ROOTS}
        looks: dict[str, list[float]] = {layout: [] for layout in ROOTS}
        for _ in range(rounds):
            for layout, root in roots.items():
                locked[layout].append(root.locked())
                looks[layout].append(root.look())
        return {layout: (min(locked[layout]), min(looks[layout])) for layout in ROOTS}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(quick: bool = False) -> list[Row]:
    n, rounds = (40, 5) if quick else (CHECKPOINTS, ROUNDS)
    figures = measure(n, rounds)
    base_locked, base_look = figures["nemo-rl"]
    rows: list[Row] = []
    for layout, (locked, look) in figures.items():
        ratio = max(locked / base_locked, look / base_look)
        rows.append(
            Row(
                f"P7-{layout}",
                f"pass cost per checkpoint, {n} checkpoints: locked pass / daemon look",
                f"{locked * 1e6:.0f} / {look * 1e6:.1f} us",
                f"nemo-rl {base_locked * 1e6:.0f} / {base_look * 1e6:.1f} us",
                f"{locked / base_locked:.2f}x / {look / base_look:.2f}x",
                f"<= {GOAL}x nemo-rl's",
                None if layout == "nemo-rl" else ratio <= GOAL,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for row in run(quick=args.quick):
        verdict = "" if row.met is None else ("met" if row.met else "NOT MET")
        print(f"{row.id:14} {row.ours:>22}  vs {row.baseline:26} {row.ratio:>14}  {verdict}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
