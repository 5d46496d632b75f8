"""The metric comes from the newest step that has a usable config.yaml; once a root's checkpoints
name a metric, keep_top_k never silently falls back to recency (issue 1). Resolution + the real
scan + the pure planner, as a pass does them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from ckptkeeper import Action, plan, scan_root
from ckptkeeper.storage import POSIX
from ckptkeeper.stores import Root
from ckptkeeperd.config import MAX_YAML_BYTES, config_from_flags
from ckptkeeperd.resolver import WALK_LIMIT, resolve_settings

REWARDS = {1: 0.9, 2: 0.8, 3: 0.1, 4: 0.2}
CONFIG = (
    "policy:\n  model_name: x\ncheckpointing:\n  metric_name: reward\n  higher_is_better: true\n"
)


def run(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    for step, reward in REWARDS.items():
        d = root / f"step_{step}"
        d.mkdir(parents=True)
        (d / "training_info.json").write_text(json.dumps({"step": step, "reward": reward}))
        (d / "config.yaml").write_text(CONFIG)
    return root


def newest_step(root: Path, kind: str) -> Path | None:
    """step_5 as each way of writing it leaves it (None: the step is not there)."""
    if kind == "none":
        return None
    step = root / "step_5"
    step.mkdir()  # "mkdir": a save written in place, nothing in it yet
    if kind == "mkdir":
        return None
    (step / "training_info.json").write_text(json.dumps({"step": 5, "reward": 0.5}))
    cfg = step / "config.yaml"
    if kind == "run_config=None":  # NeMo-RL's save without a run config: no config.yaml
        return None
    if kind == "corrupt":
        cfg.write_text("policy:\n  model_name: x\ncheckpointing: [metric_name\n")
    elif kind == "truncated":
        cfg.write_text("")
    elif kind == "fifo":
        os.mkfifo(cfg)
    elif kind == "huge":
        cfg.write_bytes(b"#" * (MAX_YAML_BYTES + 1))
    elif kind == "directory":
        cfg.mkdir()
    return cfg


KINDS = ["none", "mkdir", "run_config=None", "corrupt", "truncated", "fifo", "huge", "directory"]


@pytest.mark.parametrize("kind", KINDS)
def test_best_checkpoint_survives_a_newest_step_without_usable_config_yaml(
    tmp_path: Path, kind: str
) -> None:
    root = run(tmp_path)
    bad = newest_step(root, kind)
    resolved = resolve_settings(config_from_flags([], {"keep_top_k": 2}), Root(root, POSIX), {})
    policy = resolved.settings.policy
    assert (policy.metric_name, policy.higher_is_better, policy.keep_top_k) == ("reward", True, 2)
    if bad is None:
        assert resolved.problems == []
    else:  # the unusable file is reported, and where the metric came from
        [problem] = resolved.problems
        assert problem.startswith(f"{bad}: ")
        assert problem.endswith(f"metric 'reward' taken from {root / 'step_4' / 'config.yaml'}")
    decided = plan(scan_root(root), policy, time.time())
    assert 1 in decided.kept_steps and 2 in decided.kept_steps
    # Ranked by reward: the two best and the latest stay (step_5 takes part once it has info).
    assert decided.deleted_steps == ({3} if kind in ("none", "mkdir") else {3, 4})
    for d in decided.by_action(Action.DELETE):
        assert "by reward=" in d.reasons[0]


@pytest.mark.parametrize("metric_flag", [None, "reward"])
def test_no_usable_config_yaml_left_pauses_deletions_and_says_why(
    tmp_path: Path, metric_flag: str | None
) -> None:
    root = run(tmp_path)
    for step in REWARDS:  # every config.yaml is now corrupt: the metric (or direction) is unknown
        (root / f"step_{step}" / "config.yaml").write_text("checkpointing: [\n")
    flags = {"keep_top_k": 2, "keep_latest_n": 1, "metric_name": metric_flag}
    resolved = resolve_settings(config_from_flags([], flags), Root(root, POSIX), {})
    assert not resolved.settings.policy.bounded
    assert len(resolved.problems) == len(REWARDS)
    key = "metric_name" if metric_flag is None else "higher_is_better"
    for problem in resolved.problems:
        assert "config.yaml: invalid YAML: " in problem
        assert f"deletions in this root paused until a config.yaml names it or {key} is set" in (
            problem
        )
    decided = plan(scan_root(root), resolved.settings.policy, time.time())
    assert decided.deleted_steps == frozenset()


def test_unusable_config_yaml_is_only_reported_when_nothing_ranks_by_the_metric(
    tmp_path: Path,
) -> None:
    root = run(tmp_path)
    for step in REWARDS:
        (root / f"step_{step}" / "config.yaml").write_text("checkpointing: [\n")
    resolved = resolve_settings(config_from_flags([], {"keep_latest_n": 2}), Root(root, POSIX), {})
    assert resolved.settings.policy.keep_latest_n == 2  # recency is what keep_latest_n means
    assert all(p.endswith("; ignored") for p in resolved.problems) and resolved.problems
    assert plan(scan_root(root), resolved.settings.policy, time.time()).deleted_steps == {1, 2}


def test_config_yaml_without_a_metric_does_not_hide_an_older_one(tmp_path: Path) -> None:
    root = run(tmp_path)
    newest_step(root, "run_config=None")
    (root / "step_5" / "config.yaml").write_text("policy:\n  model_name: x\n")  # cut short
    resolved = resolve_settings(config_from_flags([], {"keep_top_k": 2}), Root(root, POSIX), {})
    assert resolved.settings.policy.metric_name == "reward"
    assert resolved.problems == []


def test_steps_that_never_named_a_metric_rank_by_recency(tmp_path: Path) -> None:
    root = run(tmp_path)
    for step in REWARDS:
        (root / f"step_{step}" / "config.yaml").unlink()
    resolved = resolve_settings(config_from_flags([], {"keep_top_k": 2}), Root(root, POSIX), {})
    assert resolved.settings.policy.metric_name is None and resolved.problems == []
    assert plan(scan_root(root), resolved.settings.policy, time.time()).deleted_steps == {1, 2}


def test_a_walk_cut_short_by_its_limit_pauses_rather_than_guess(tmp_path: Path) -> None:
    root = run(tmp_path)
    for step in range(5, 5 + WALK_LIMIT):  # the newest WALK_LIMIT steps have no config.yaml
        (root / f"step_{step}").mkdir()
    resolved = resolve_settings(config_from_flags([], {"keep_top_k": 2}), Root(root, POSIX), {})
    assert not resolved.settings.policy.bounded
    [problem] = resolved.problems
    assert problem.startswith(f"{root}: no config.yaml names checkpointing.metric_name in the ")
    assert "deletions in this root paused" in problem
    configured = config_from_flags([], {"keep_top_k": 2, "metric_name": "reward"})
    assert resolve_settings(configured, Root(root, POSIX), {}).settings.policy.keep_top_k == 2
    (root / "step_4" / "config.yaml").rename(root / f"step_{4 + WALK_LIMIT}" / "config.yaml")
    assert (
        resolve_settings(config_from_flags([], {"keep_top_k": 2}), Root(root, POSIX), {}).problems
        == []
    )
