"""One locked pass: inline and daemon retention give the same tree, pins carry over either way."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import manager_config

from ckptkeeper import Action, Policy
from ckptkeeper.manager import CheckpointManager
from ckptkeeper.passes import EVERYTHING, RECOVERY, locked_pass
from ckptkeeperd.reconcile import reconcile

MARKER = ".complete"


def make_manager(root: Path, retention: str, **overrides: Any) -> CheckpointManager:
    return CheckpointManager(
        manager_config(root, **{"keep_top_k": 2, "retention": retention, **overrides})
    )


def daemon_policy(manager: CheckpointManager) -> Policy:
    """The policy a keeper configured like ``manager`` applies (NeMo-RL keeps the latest)."""
    return Policy(
        keep_top_k=manager.keep_top_k,
        metric_name=manager.metric_name,
        higher_is_better=manager.higher_is_better,
        keep_latest_n=manager.ft_keep_latest_k,
        complete_marker=manager.complete_marker,
    )


def tree(root: Path) -> dict[str, str]:
    """Every file and directory below ``root`` except ckptkeeper's own area, with content hashes.

    The completion marker holds the writer's time, host and pid, so only its presence counts."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel.split("/")[0] == ".ckptkeeper":
            continue
        if path.is_dir():
            out[rel] = "dir"
        elif path.name == MARKER:
            out[rel] = "marker"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def save(manager: CheckpointManager, step: int, loss: float, payload: bytes) -> Path:
    tmp = manager.init_tmp_checkpoint(step, {"loss": loss, "step": step})
    (tmp / "weights.bin").write_bytes(payload)
    manager.finalize_checkpoint(tmp)
    return tmp.parent / f"step_{step}"


def test_a_pin_survives_an_inline_replace(tmp_path: Path) -> None:
    """Re-saving a pinned step inline keeps the pin (the daemon always did)."""
    root = tmp_path / "ckpt"
    manager = make_manager(root, "inline")
    save(manager, 1, 0.5, b"a")
    (root / "step_1" / "KEEP").touch()
    save(manager, 1, 0.9, b"b")
    assert (root / "step_1" / "weights.bin").read_bytes() == b"b"
    assert (root / "step_1" / "KEEP").is_file()
    for step, loss in [(2, 0.1), (3, 0.2), (4, 0.3)]:
        save(manager, step, loss, b"c")
    assert (root / "step_1").is_dir()  # the worst loss, yet pinned


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_inline_and_daemon_give_identical_trees(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    inline_root, daemon_root = tmp_path / "inline", tmp_path / "daemon"
    inline = make_manager(inline_root, "inline", ft_keep_latest_k=1)
    writer = make_manager(daemon_root, "daemon", ft_keep_latest_k=1)
    policy = daemon_policy(writer)
    steps = [1, 2, 3, 3, 4, 5, 2, 6, 7, 7, 8, 9, 10]  # repeats are replaces of an existing step
    pinned: set[int] = set()
    for step in steps:
        loss, payload = round(rng.random(), 3), rng.randbytes(64)
        save(inline, step, loss, payload)
        save(writer, step, loss, payload)
        report = reconcile(daemon_root, policy, lock_timeout=None)
        assert report.errors == 0, report.problems
        if rng.random() < 0.3 and step not in pinned:  # the owner pins the step just saved
            for root in (inline_root, daemon_root):
                (root / f"step_{step}" / "KEEP").touch()
            pinned.add(step)
        assert tree(inline_root) == tree(daemon_root), f"after saving step {step}"
    assert tree(inline_root)  # something was compared
    for step in pinned:
        assert (inline_root / f"step_{step}" / "KEEP").is_file()


def test_locked_pass_applies_only_the_actions_asked(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    writer = make_manager(root, "daemon", keep_top_k=1)
    for step, loss in [(1, 0.1), (2, 0.5), (3, 0.9)]:
        save(writer, step, loss, b"x")
    policy = daemon_policy(writer)
    result = locked_pass(root, policy, actions=RECOVERY)
    assert sorted(p.name for p in root.iterdir()) == [".ckptkeeper", "step_1", "step_2", "step_3"]
    assert {o.decision.action for o in result.outcomes} == {Action.FINALIZE}
    assert result.plan is not None and result.plan.by_action(Action.DELETE)  # decided, not done
    result = locked_pass(root, policy, actions=EVERYTHING)
    assert sorted(p.name for p in root.iterdir()) == [".ckptkeeper", "step_1", "step_3"]
    assert [path for path, removal in result.removed if not removal.left] == [
        o.trash_path for o in result.outcomes
    ]
    assert list((root / ".ckptkeeper" / "trash").iterdir()) == []


def test_locked_pass_is_busy_while_another_actor_holds_the_lock(tmp_path: Path) -> None:
    from ckptkeeper import RootLock

    root = tmp_path / "ckpt"
    writer = make_manager(root, "daemon")
    save(writer, 1, 0.1, b"x")
    with RootLock(root):
        result = locked_pass(root, daemon_policy(writer), lock_timeout=0)
    assert result.status == "busy" and result.plan is None
    assert (root / "tmp_step_1").is_dir()
