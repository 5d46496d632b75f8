"""Kill -9 loop (DESIGN section 3, invariants 1, 2, 3 and 5).

A simulated trainer (``trainer_sim.py``, CheckpointManager in daemon mode) saves checkpoints of
several random-size files, recording a sha256 manifest outside the root. Meanwhile ``ckptkeeper
run`` keeps the root and a seeded driver SIGKILLs it at random moments and restarts it:

* ``uniform``: a uniform random delay after the keeper was started (import, first pass, or later);
* ``after_ready``: a short random delay after its first pass ended;
* ``on_event``: right after it logs an action (``finalized``, ``deleted``, ``purged``...), i.e.
  in the middle of applying a plan or between two removals;
* ``on_trash``: as soon as a new entry appears in ``.ckptkeeper/trash``, i.e. between the rename
  into trash and the end of its removal.

After every kill (the trainer frozen with SIGSTOP for a consistent look) and at the end:

* every visible ``step_N`` (and every complete ``tmp_step_N``) matches the manifest byte for byte,
  all files, nothing missing or extra except the marker / KEEP;
* every step the policy keeps, computed independently from the manifest metrics of the saves whose
  marker exists so far, is present (as ``step_N`` or a complete ``tmp_step_N``); no ``old_step_N``;
* the keeper never died by itself, never printed to stderr, never logged a failed action.

Then one ``ckptkeeper sweep`` with the same policy must leave exactly the plan: the kept steps and
nothing else (no tmp_step_N, no old_step_N, empty trash, ``status`` has nothing left to do).

Seed: ``CKPTKEEPER_KILL_SEED`` (printed). Slow variant: ``pytest -m slow tests/reliability``
(200 kills over 100 checkpoints; ``CKPTKEEPER_KILLS`` overrides the count).
"""

from __future__ import annotations

import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from trainer_sim import (
    HIGHER_IS_BETTER,
    LATEST_N,
    MARKER,
    TOP_K,
    expected_kept,
    keeper_policy,
    load_manifest,
    verify_against,
)

POLICY = keeper_policy("30s")
KEEPER_ARGS = [*POLICY, "--sweep-interval", "1s", "--observer", "inotify"]
ACTION_EVENTS = ("finalized", "replaced", "deleted", "garbage_collected", "purged", "recovered")
BAD_EVENTS = ("action_failed", "pass_crashed", "removal_incomplete", "root_problem")
STRATEGIES = {"uniform": 3, "after_ready": 2, "on_event": 3, "on_trash": 2}
_NAME = re.compile(r"(step_|tmp_step_|old_step_)([0-9]+)")


@dataclass
class Loop:
    seed: int
    kills: int = 0
    checks: int = 0
    strategies: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def violation(self, where: str, what: str) -> None:
        self.violations.append(f"[{where}] {what}")


def _kept_entries(man: dict[str, Any], root: Path) -> tuple[dict[int, dict[str, Any]], set[int]]:
    """Manifest entries by step, and the steps whose completion marker has been written."""
    entries = {int(s): e for s, e in man["steps"].items()}
    marked = {s for s, e in entries.items() if e["marked"]}
    for s, e in entries.items():
        # Frozen between the marker and the manifest update: the disk tells.
        if not e["marked"] and (
            (root / f"tmp_step_{s}" / MARKER).exists() or (root / f"step_{s}").is_dir()
        ):
            marked.add(s)
    return entries, marked


def check_root(root: Path, manifest: Path, loop: Loop, where: str) -> set[int]:
    """Check the invariants on a quiet root (keeper dead, trainer frozen). Returns the steps
    present as step_N or complete tmp_step_N."""
    loop.checks += 1
    entries, marked = _kept_entries(load_manifest(manifest), root)
    present: set[int] = set()
    for name in sorted(os.listdir(root)):
        m = _NAME.fullmatch(name)
        if m is None:
            continue
        kind, step, path = m[1], int(m[2]), root / name
        if path.is_symlink() or not path.is_dir():
            loop.violation(where, f"{name} is not a directory")
            continue
        if kind == "old_step_":
            loop.violation(where, f"{name} exists (no replace ever happens in this run)")
        elif kind == "step_":
            if step not in marked:
                loop.violation(where, f"{name} visible but its save was never completed")
                continue
            for problem in verify_against(path, entries[step]["files"]):
                loop.violation(where, problem)
            present.add(step)
        elif (path / MARKER).exists():
            if step not in marked:
                loop.violation(where, f"{name} has a marker the trainer never wrote")
                continue
            for problem in verify_against(path, entries[step]["files"]):
                loop.violation(where, problem)
            present.add(step)
    metrics = {s: float(entries[s]["metric"]) for s in marked}
    kept = expected_kept(metrics, top_k=TOP_K, higher_is_better=HIGHER_IS_BETTER, latest_n=LATEST_N)
    for step in sorted(kept - present):
        loop.violation(where, f"step {step} is kept by the policy but missing from the root")
    return present


def _new_trash_entry(trash: Path, before: set[str]) -> bool:
    try:
        return bool(set(os.listdir(trash)) - before)
    except FileNotFoundError:
        return False


def _await_moment(keeper: Any, strategy: str, rng: random.Random, root: Path, wait: float) -> str:
    """Block until the moment ``strategy`` picks for the kill (event-driven strategies give up
    after ``wait`` s); returns a short label."""
    if strategy == "uniform":
        keeper.alive_for(rng.uniform(0.0, 1.5))
        return strategy
    if strategy == "after_ready":
        if keeper.wait_any(["ready"], timeout=20.0) is None:
            return "after_ready:timeout"
        keeper.alive_for(rng.uniform(0.0, 0.5))
        return strategy
    timeout = wait
    if strategy == "on_event":
        event = keeper.wait_any(ACTION_EVENTS, timeout=timeout)
        return f"on_event:{event['event']}" if event else "on_event:timeout"
    # on_trash: poll (1 ms) until a trash entry appears that was not there at the start.
    trash = root / ".ckptkeeper" / "trash"
    before = set(os.listdir(trash)) if trash.is_dir() else set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _new_trash_entry(trash, before):
            return "on_trash"
        if not keeper.alive_for(0.001):
            break
    return "on_trash:timeout"


def run_kill_loop(
    tmp_path: Path,
    harness: Any,
    *,
    kills_target: int,
    checkpoints: int,
    pace: float,
    budget: float,
) -> Loop:
    seed = harness.seed("CKPTKEEPER_KILL_SEED")
    print(f"kill9: seed={seed} (set CKPTKEEPER_KILL_SEED={seed} to reproduce)", flush=True)
    rng = random.Random(seed)
    loop = Loop(seed)
    root = tmp_path / "run"
    root.mkdir()
    manifest = tmp_path / "manifest.json"  # outside the root
    trainer = harness.trainer(
        root,
        *("--steps", str(checkpoints), "--seed", str(seed), "--manifest", str(manifest)),
        *("--interval", str(pace), "--files-min", "2", "--files-max", "8"),
        *("--size-max", str(384 * 1024)),
    )
    started = time.monotonic()
    while loop.kills < kills_target or trainer.poll() is None:
        elapsed = time.monotonic() - started
        assert elapsed < budget, (
            f"kill loop over budget: {loop.kills} kills in {elapsed:.0f}s "
            f"(trainer {'done' if trainer.poll() is not None else 'running'}); seed={seed}"
        )
        keeper = harness.keeper([str(root), *KEEPER_ARGS])
        strategy = rng.choices(list(STRATEGIES), weights=list(STRATEGIES.values()))[0]
        # While the trainer saves, an action comes within one save interval; afterwards only
        # leftovers of the previous kill remain, so do not wait long for one.
        wait = pace + 1.0 if trainer.poll() is None else 1.0
        label = _await_moment(keeper, strategy, rng, root, wait)
        where = f"kill {loop.kills + 1} ({label})"
        if keeper.proc.poll() is not None:
            loop.violation(where, f"keeper exited by itself with {keeper.proc.returncode}")
        keeper.kill()
        loop.kills += 1
        loop.strategies[label] += 1
        for e in keeper.events_named(*ACTION_EVENTS, *BAD_EVENTS):
            loop.events[e["event"]] += 1
            if e["event"] in BAD_EVENTS:
                loop.violation(where, f"keeper logged {e}")
        if any(line.strip() for line in keeper.stderr):
            loop.violation(where, f"keeper stderr: {''.join(keeper.stderr)[-2000:]}")
        with harness.frozen(trainer):
            check_root(root, manifest, loop, where)
    out, err = trainer.communicate(timeout=60)
    assert trainer.returncode == 0 and not err.strip(), f"trainer failed: {out}\n{err}"
    loop_seconds = time.monotonic() - started

    # The final pass: one sweep with the same policy converges to exactly the plan.
    swept = harness.cli("sweep", str(root), *POLICY, "--json")
    assert swept.returncode == 0, f"final sweep failed: {swept.stdout}\n{swept.stderr}"
    present = check_root(root, manifest, loop, "after the final sweep")
    entries, marked = _kept_entries(load_manifest(manifest), root)
    assert len(marked) == len(entries) == checkpoints
    plan = expected_kept(
        {s: float(entries[s]["metric"]) for s in marked},
        top_k=TOP_K,
        higher_is_better=HIGHER_IS_BETTER,
        latest_n=LATEST_N,
    )
    names = {n for n in os.listdir(root) if _NAME.fullmatch(n)}
    if names != {f"step_{s}" for s in plan} or present != plan:
        loop.violation("final", f"root holds {sorted(names)}, the plan keeps {sorted(plan)}")
    trash = root / ".ckptkeeper" / "trash"
    if trash.exists() and os.listdir(trash):
        loop.violation("final", f"trash not empty: {os.listdir(trash)}")
    left = harness.pending_actions(root, POLICY)
    if left:
        loop.violation("final", f"status still plans {left}")

    harness.summarize(
        f"kill9: kills={loop.kills} seed={seed} checkpoints={checkpoints} "
        f"violations={len(loop.violations)} duration={loop_seconds:.1f}s checks={loop.checks} "
        f"moments={dict(sorted(loop.strategies.items()))} "
        f"keeper_actions_seen={dict(sorted(loop.events.items()))}"
    )
    return loop


def _assert_clean(loop: Loop) -> None:
    assert not loop.violations, (
        f"{len(loop.violations)} violations (CKPTKEEPER_KILL_SEED={loop.seed}):\n"
        + "\n".join(loop.violations[:40])
    )


def test_the_checker_sees_corruption_missing_kept_steps_and_leftovers(
    tmp_path: Path, harness: Any
) -> None:
    """The harness's own check must fail on what it is meant to catch (no keeper involved)."""
    root, manifest = tmp_path / "run", tmp_path / "manifest.json"
    root.mkdir()
    trainer = harness.trainer(
        root, "--steps", "6", "--seed", "5", "--manifest", str(manifest), "--size-max", "64"
    )
    assert trainer.wait(60) == 0
    clean = Loop(5)
    assert check_root(root, manifest, clean, "clean") == {10, 20, 30, 40, 50, 60}
    assert clean.violations == []

    entries, marked = _kept_entries(load_manifest(manifest), root)
    kept = expected_kept(
        {s: float(entries[s]["metric"]) for s in marked},
        top_k=TOP_K,
        higher_is_better=HIGHER_IS_BETTER,
        latest_n=LATEST_N,
    )
    victim = min(kept)
    shard = next((root / f"tmp_step_{victim}").rglob("shard_*.bin"))
    os.rename(root / f"tmp_step_{victim}", root / f"step_{victim}")  # as the keeper would
    shard = root / f"step_{victim}" / shard.relative_to(root / f"tmp_step_{victim}")
    shard.write_bytes(b"!" + shard.read_bytes()[1:])  # same size, other content
    (root / "step_60" if (root / "step_60").exists() else root / "tmp_step_60").joinpath(
        "extra.bin"
    ).write_bytes(b"x")
    (root / "old_step_10").mkdir()
    gone = next(s for s in sorted(kept) if s != victim and s != 60)
    os.rename(root / f"tmp_step_{gone}", tmp_path / "elsewhere")
    dirty = Loop(5)
    check_root(root, manifest, dirty, "dirty")
    text = "\n".join(dirty.violations)
    assert "content differs" in text and "unexpected file extra.bin" in text
    assert "old_step_10 exists" in text
    assert f"step {gone} is kept by the policy but missing" in text


def test_kill9_loop_keeps_every_invariant(tmp_path: Path, harness: Any) -> None:
    """CI: at least 30 SIGKILLs of the keeper over 30 checkpoints, in under 2 minutes."""
    loop = run_kill_loop(tmp_path, harness, kills_target=30, checkpoints=30, pace=0.9, budget=110.0)
    assert loop.kills >= 30
    _assert_clean(loop)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_kill9_loop_many_kills(tmp_path: Path, harness: Any) -> None:
    """200+ SIGKILLs (``CKPTKEEPER_KILLS`` to change) over 100 checkpoints."""
    kills = int(os.environ.get("CKPTKEEPER_KILLS", "200"))
    checkpoints = 100
    loop = run_kill_loop(
        tmp_path,
        harness,
        kills_target=kills,
        checkpoints=checkpoints,
        pace=kills * 1.0 / checkpoints,
        budget=max(900.0, kills * 4.0),
    )
    assert loop.kills >= kills
    _assert_clean(loop)
