"""Concurrent actors on one root (DESIGN section 3, invariant 6).

A trainer in daemon mode (whose resume lookups finalize complete saves themselves, under the root
lock), ``ckptkeeper run``, and two ``ckptkeeper sweep --json`` loops act on one root while the
trainer saves 1,000 small checkpoints. Then the same with two daemons on one root. Checked:

* the trainer sees no exception (exit 0, nothing on stderr);
* no step is deleted twice: ``deleted`` events of the daemons plus ``delete``/``done`` outcomes of
  every sweep, counted per step, are exactly 1 for every step the policy drops (a second actor
  that finds the directory gone reports ``skipped``/``gone``, never a second delete), and 0 for
  the steps it keeps; no step is finalized twice;
* no step is resurrected: a sampler lists the root every few ms; once a ``step_N`` seen earlier is
  confirmed gone by ``lstat``, no later listing may show it again;
* the final set is the plan: ``ckptkeeper status --json`` has nothing but ``keep`` left, and the
  kept steps are the policy's (computed independently from the trainer's seeded metrics);
* the daemons stay up the whole time and stop cleanly.

Seed: ``CKPTKEEPER_CONCURRENCY_SEED`` (printed). Slow variant (5,000 checkpoints): ``-m slow``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import wait_until
from trainer_sim import (
    HIGHER_IS_BETTER,
    LATEST_N,
    TOP_K,
    expected_kept,
    keeper_policy,
    metric_for,
)

from ckptkeeper import Action, CheckpointManager, Policy
from ckptkeeperd.reconcile import reconcile

POLICY = keeper_policy("1h")
DAEMON_ARGS = [*POLICY, "--sweep-interval", "1s", "--observer", "inotify"]
_STEP = re.compile(r"step_([0-9]+)")
BAD_EVENTS = ("action_failed", "pass_crashed", "root_problem")


class Sampler(threading.Thread):
    """Lists the root every few ms and flags any step_N that comes back after it was gone."""

    def __init__(self, root: Path) -> None:
        super().__init__(name="sampler", daemon=True)
        self.root = root
        self.stop = threading.Event()
        self.samples = 0
        self.seen: set[int] = set()
        self.gone: set[int] = set()
        self.violations: list[str] = []

    def run(self) -> None:
        while not self.stop.wait(0.003):
            try:
                names = os.listdir(self.root)
            except OSError as exc:
                self.violations.append(f"cannot list the root: {exc}")
                continue
            present = {int(m[1]) for n in names if (m := _STEP.fullmatch(n))}
            for step in sorted(present & self.gone):
                self.violations.append(f"step_{step} reappeared after it was deleted")
            for step in self.seen - present - self.gone:
                try:
                    os.lstat(self.root / f"step_{step}")
                except OSError as exc:
                    if exc.errno == errno.ENOENT:
                        self.gone.add(step)
            self.seen |= present
            self.samples += 1


class Sweeper(threading.Thread):
    """Runs ``ckptkeeper sweep ROOT --json`` in a loop until stopped."""

    def __init__(self, harness: Any, root: Path, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.harness = harness
        self.root = root
        self.stop = threading.Event()
        self.runs = 0
        self.deleted: Counter[int] = Counter()
        self.finalized: Counter[int] = Counter()
        self.statuses: Counter[str] = Counter()
        self.problems: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            done = self.harness.cli("sweep", str(self.root), *POLICY, "--json", timeout=120)
            self.runs += 1
            try:
                doc = json.loads(done.stdout)
            except ValueError:
                self.problems.append(f"{self.name}: no JSON (rc={done.returncode}) {done.stderr}")
                continue
            for report in doc["roots"]:
                for o in report.get("outcomes", []):
                    self.statuses[f"{o['action']}:{o['status']}"] += 1
                    if o["status"] == "done" and o["action"] == "delete":
                        self.deleted[o["step"]] += 1
                    if o["status"] == "done" and o["action"] == "finalize":
                        self.finalized[o["step"]] += 1
                    if o["status"] == "failed":
                        self.problems.append(f"{self.name}: failed outcome {o}")
                for removed in report.get("removed", []):
                    if removed["left"]:
                        self.problems.append(f"{self.name}: removal left {removed}")
            for e in self.harness.json_lines(done.stderr):
                if e.get("event") in BAD_EVENTS:
                    self.problems.append(f"{self.name}: {e}")
            junk = [ln for ln in done.stderr.splitlines() if ln.strip() and not ln.startswith("{")]
            if junk:
                self.problems.append(f"{self.name}: stderr {junk[:10]}")
            if done.returncode != 0:
                self.problems.append(f"{self.name}: exit {done.returncode}")


def run_actors(
    tmp_path: Path,
    harness: Any,
    *,
    checkpoints: int,
    daemons: int,
    sweepers: int,
    budget: float,
    pace: float = 0.0,
) -> None:
    seed = harness.seed("CKPTKEEPER_CONCURRENCY_SEED")
    print(f"concurrency: seed={seed} (CKPTKEEPER_CONCURRENCY_SEED={seed} reproduces)", flush=True)
    root = tmp_path / "run"
    root.mkdir()
    started = time.monotonic()
    keepers = [harness.keeper([str(root), *DAEMON_ARGS]) for _ in range(daemons)]
    for k in keepers:
        k.wait_ready()
    sampler = Sampler(root)
    loops = [Sweeper(harness, root, f"sweep-{i + 1}") for i in range(sweepers)]
    try:
        sampler.start()
        for s in loops:
            s.start()
        trainer = harness.trainer(
            root,
            *("--steps", str(checkpoints), "--stride", "1", "--seed", str(seed)),
            *("--files-min", "1", "--files-max", "2", "--size-max", "256"),
            *("--lookup-every", "50", "--interval", str(pace)),
        )
        out, err = trainer.communicate(timeout=budget)
        trainer_seconds = time.monotonic() - started
        for s in loops:
            s.stop.set()
        for s in loops:
            s.join(timeout=150)
        assert trainer.returncode == 0, f"trainer exit {trainer.returncode}\n{out}\n{err}"
        assert not err.strip(), f"trainer wrote to stderr:\n{err}"

        # Every actor but the daemons has stopped: they finish the job on their own.
        wait_until(
            lambda: not harness.pending_actions(root, POLICY),
            timeout=60,
            interval=0.3,
            what="the daemons to converge on the plan",
        )
    finally:
        for s in loops:
            s.stop.set()
        sampler.stop.set()
        sampler.join(timeout=10)
        for s in loops:
            s.join(timeout=150)
    for k in keepers:
        assert k.proc.poll() is None, f"a daemon died: {''.join(k.stderr)[-2000:]}"
    for k in keepers:
        assert k.stop() == 0

    all_steps = set(range(1, checkpoints + 1))
    plan = expected_kept(
        {s: metric_for(seed, s) for s in all_steps},
        top_k=TOP_K,
        higher_is_better=HIGHER_IS_BETTER,
        latest_n=LATEST_N,
    )
    deleted: Counter[int] = Counter()
    finalized: Counter[int] = Counter()
    locked_skips = 0
    problems: list[str] = []
    for i, k in enumerate(keepers):
        deleted.update(e["step"] for e in k.find("deleted"))
        finalized.update(e["step"] for e in k.find("finalized"))
        locked_skips += len(k.find("skipped", reason="root locked by another actor"))
        problems += [f"daemon-{i + 1}: {e}" for e in k.events_named(*BAD_EVENTS)]
        problems += [f"daemon-{i + 1} stderr: {ln}" for ln in k.stderr if ln.strip()]
    for s in loops:
        deleted.update(s.deleted)
        finalized.update(s.finalized)
        problems += s.problems

    twice = {step: n for step, n in deleted.items() if n > 1}
    assert not twice, f"steps deleted more than once: {twice}"
    assert not {s: n for s, n in finalized.items() if n > 1}, "a step was finalized twice"
    assert set(deleted) == all_steps - plan, (
        f"deleted {len(deleted)} steps, the plan drops {len(all_steps - plan)}: "
        f"kept but deleted {sorted(set(deleted) & plan)}, "
        f"dropped but never deleted {sorted(all_steps - plan - set(deleted))[:20]}"
    )
    assert sampler.violations == [], sampler.violations[:20]
    on_disk = {n for n in os.listdir(root) if n.startswith(("step_", "tmp_step_", "old_step_"))}
    assert on_disk == {f"step_{s}" for s in plan}
    trash = root / ".ckptkeeper" / "trash"
    assert not trash.exists() or os.listdir(trash) == []
    assert not problems, "\n".join(problems[:30])

    sweeps = sum(s.runs for s in loops)
    outcome_kinds: Counter[str] = Counter()
    for s in loops:
        outcome_kinds.update(s.statuses)
    harness.summarize(
        f"concurrency: checkpoints={checkpoints} daemons={daemons} sweepers={sweepers} "
        f"sweeps={sweeps} trainer_lookups={checkpoints // 50} seed={seed} "
        f"duration={trainer_seconds:.1f}s deleted={sum(deleted.values())} "
        f"kept={len(plan)} samples={sampler.samples} locked_skips={locked_skips} "
        f"sweep_outcomes={dict(sorted(outcome_kinds.items()))}"
    )


def test_finalize_checkpoint_racing_the_keeper_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic form of a race the concurrency runs hit: the keeper's pass runs the instant
    the marker is durable, before ``finalize_checkpoint`` has returned (invariant 6: a lost race
    is success, not an error)."""
    root = tmp_path / "run"
    root.mkdir()
    manager = CheckpointManager(
        {
            "enabled": True,
            "checkpoint_dir": str(root),
            "metric_name": "val_loss",
            "higher_is_better": False,
            "retention": "daemon",
        }
    )
    save = manager.init_tmp_checkpoint(1, {"val_loss": 0.5})
    real_rename = os.rename
    passes: list[Any] = []
    started: list[bool] = []

    def rename_then_keeper_pass(src: Any, dst: Any, **kw: Any) -> None:
        real_rename(src, dst, **kw)
        if not started and str(dst).endswith("/.complete"):  # the marker just became visible
            started.append(True)
            passes.append(reconcile(root, Policy(keep_top_k=1, metric_name="val_loss")))

    monkeypatch.setattr(os, "rename", rename_then_keeper_pass)
    manager.finalize_checkpoint(save)
    assert passes and passes[0].count(Action.FINALIZE) == 1
    assert (root / "step_1" / ".complete").is_file()


def test_trainer_daemon_and_two_sweeps_share_a_root(tmp_path: Path, harness: Any) -> None:
    run_actors(tmp_path, harness, checkpoints=1000, daemons=1, sweepers=2, budget=120, pace=0.015)


def test_two_daemons_on_one_root(tmp_path: Path, harness: Any) -> None:
    run_actors(tmp_path, harness, checkpoints=600, daemons=2, sweepers=0, budget=120, pace=0.005)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_many_actors_many_checkpoints(tmp_path: Path, harness: Any) -> None:
    run_actors(tmp_path, harness, checkpoints=5000, daemons=2, sweepers=2, budget=900, pace=0.01)
