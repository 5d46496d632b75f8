"""Settings resolved per plan: a pass decides with the settings as they are, and acts (under the
lock) with the settings as they are then, never a mix of the two (issue 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckptkeeper import Policy
from ckptkeeper.storage import POSIX
from ckptkeeper.stores import Root
from ckptkeeperd.config import config_from_flags
from ckptkeeperd.reconcile import reconcile
from ckptkeeperd.resolver import SettingsResolver

FLAGS = {"metric_name": "reward", "higher_is_better": True}


def run(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    for step, reward in ((1, 0.9), (2, 0.1), (3, 0.5)):  # keep_top_k = 1 deletes step_2
        (root / f"step_{step}").mkdir(parents=True)
        (root / f"step_{step}" / "training_info.json").write_text(json.dumps({"reward": reward}))
    (root / "ckptkeeper.toml").write_text("keep_top_k = 1\n")
    return root


@pytest.mark.parametrize(
    ("edit", "acted_on"),
    [
        ("keep_top_k = 10\n", (10, None)),  # raised: nothing of the new policy is deleted
        ("keep_top_k = [\n", (None, None)),  # now invalid: deletions paused
        ('keep_top_k = 1\ncomplete_marker = "DONE"\n', (1, None)),  # same bound: still deletes
    ],
)
def test_a_run_file_edited_after_the_plan_is_what_the_locked_plan_uses(
    tmp_path: Path, edit: str, acted_on: tuple[int | None, None]
) -> None:
    root = run(tmp_path)
    config = config_from_flags([root], FLAGS)
    resolver = SettingsResolver()
    seen: list[Policy] = []

    def policy() -> Policy:
        seen.append(resolver.resolve(config, Root(root, POSIX), {}).settings.policy)
        if len(seen) == 1:  # the owner saves the file right after the unlocked plan
            (root / "ckptkeeper.toml").write_text(edit)
        return seen[-1]

    report = reconcile(root, policy)
    assert [p.keep_top_k for p in seen] == [1, acted_on[0]]
    assert report.plan is not None and report.plan.policy is seen[1]  # one policy: the newer
    deleted = {o.decision.step for o in report.outcomes if o.status == "done"}
    assert deleted == ({2} if acted_on[0] == 1 else set())
    assert all((root / f"step_{s}").is_dir() for s in (1, 3))


def test_a_pass_with_nothing_to_do_resolves_once(tmp_path: Path) -> None:
    root = run(tmp_path)
    (root / "ckptkeeper.toml").write_text("keep_top_k = 5\n")
    config = config_from_flags([root], FLAGS)
    resolver = SettingsResolver()
    calls: list[int] = []

    def policy() -> Policy:
        calls.append(1)
        return resolver.resolve(config, Root(root, POSIX), {}).settings.policy

    report = reconcile(root, policy)
    assert report.status == "ok" and not report.outcomes and len(calls) == 1
