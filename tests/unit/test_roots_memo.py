"""resolve_settings' memo: a run's ckptkeeper.toml and the config.yaml fallback are read again
whenever they (or the root's listing) changed, and not otherwise."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from ckptkeeper.scan import MEMO_TRUST_S
from ckptkeeperd import roots as roots_mod
from ckptkeeperd.config import config_from_flags
from ckptkeeperd.roots import resolve_settings


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files resolve_settings opens (ckptkeeper.toml, config.yaml)."""
    seen: list[str] = []
    real = roots_mod._read_regular

    def spy(path: Path, limit: int) -> Any:
        seen.append(Path(path).name)
        return real(path, limit)

    monkeypatch.setattr(roots_mod, "_read_regular", spy)
    monkeypatch.setattr(roots_mod, "_MEMO", {})
    return seen


@pytest.fixture
def later(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the files had been written a minute before each resolve."""
    ahead = int((MEMO_TRUST_S + 60) * 1e9)
    monkeypatch.setattr(roots_mod, "_now_ns", lambda: time.time_ns() + ahead)


def run_dir(tmp_path: Path, toml: str | None = None, *steps: str) -> Path:
    root = tmp_path / "run"
    root.mkdir()
    for s in steps:
        (root / s).mkdir()
    if toml is not None:
        (root / "ckptkeeper.toml").write_text(toml)
    return root


FLAGS = {"metric_name": "val", "higher_is_better": True}


def test_an_unchanged_run_file_is_read_once(tmp_path: Path, reads: list[str], later: None) -> None:
    root = run_dir(tmp_path, "keep_top_k = 3\n")
    config = config_from_flags([root], FLAGS)
    first = resolve_settings(config, root, {})
    again = [resolve_settings(config, root, {}) for _ in range(3)]
    assert reads == ["ckptkeeper.toml"]
    assert all(r == first for r in again)
    assert first.settings.policy.keep_top_k == 3


def test_an_edited_run_file_is_seen_by_the_next_resolve(
    tmp_path: Path, reads: list[str], later: None
) -> None:
    root = run_dir(tmp_path, "keep_top_k = 3\n")
    config = config_from_flags([root], FLAGS)
    resolve_settings(config, root, {})
    path = root / "ckptkeeper.toml"
    before = os.stat(path)
    path.write_text("keep_top_k = 4\n")  # same size; its ctime moves whatever its mtime does
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert resolve_settings(config, root, {}).settings.policy.keep_top_k == 4
    path.write_text("keep_top_k = [\n")  # now invalid: deletions paused, reported
    broken = resolve_settings(config, root, {})
    assert broken.settings.policy.keep_top_k is None and broken.problems
    path.unlink()
    assert resolve_settings(config, root, {}).settings.policy.keep_top_k is None
    assert resolve_settings(config, root, {}).problems == []
    assert reads == ["ckptkeeper.toml"] * 4


def test_a_run_file_that_appears_is_seen_by_the_next_resolve(
    tmp_path: Path, reads: list[str], later: None
) -> None:
    root = run_dir(tmp_path)
    config = config_from_flags([root], FLAGS)
    assert resolve_settings(config, root, {}).settings.policy.keep_top_k is None
    assert resolve_settings(config, root, {}).settings.policy.keep_top_k is None
    (root / "ckptkeeper.toml").write_text("keep_top_k = 1\n")
    assert resolve_settings(config, root, {}).settings.policy.keep_top_k == 1
    assert reads == ["ckptkeeper.toml", "ckptkeeper.toml"]  # absent once, then the new file


def test_a_run_file_changed_just_now_is_read_every_time(tmp_path: Path, reads: list[str]) -> None:
    root = run_dir(tmp_path, "keep_top_k = 3\n")
    config = config_from_flags([root], FLAGS)
    for _ in range(3):
        resolve_settings(config, root, {})
    assert reads == ["ckptkeeper.toml"] * 3


def test_other_defaults_or_entry_overrides_are_resolved_afresh(
    tmp_path: Path, reads: list[str], later: None
) -> None:
    root = run_dir(tmp_path)
    config = config_from_flags([root], FLAGS)
    assert resolve_settings(config, root, {}).settings.policy.keep_top_k is None
    assert resolve_settings(config, root, {"keep_top_k": 2}).settings.policy.keep_top_k == 2
    other = config_from_flags([root], {**FLAGS, "keep_top_k": 7})
    assert resolve_settings(other, root, {}).settings.policy.keep_top_k == 7
    assert resolve_settings(config, root, {}).settings.policy.keep_top_k is None


def test_the_config_yaml_fallback_follows_a_new_step_and_an_edited_file(
    tmp_path: Path, reads: list[str], later: None
) -> None:
    root = run_dir(tmp_path, None, "step_1")
    (root / "step_1" / "config.yaml").write_text("checkpointing:\n  metric_name: loss\n")
    config = config_from_flags([root], {})
    assert resolve_settings(config, root, {}).settings.policy.metric_name == "loss"
    assert resolve_settings(config, root, {}).settings.policy.metric_name == "loss"
    assert reads == ["ckptkeeper.toml", "config.yaml"]

    (root / "step_1" / "config.yaml").write_text("checkpointing:\n  metric_name: acc\n")
    assert resolve_settings(config, root, {}).settings.policy.metric_name == "acc"

    (root / "step_2").mkdir()  # a newer step: its (missing) config.yaml is the one that counts
    assert resolve_settings(config, root, {}).settings.policy.metric_name is None
    (root / "step_2" / "config.yaml").write_text("checkpointing:\n  metric_name: bleu\n")
    assert resolve_settings(config, root, {}).settings.policy.metric_name == "bleu"


def test_the_memo_hands_out_independent_results(
    tmp_path: Path, reads: list[str], later: None
) -> None:
    root = run_dir(tmp_path, "keep_top_k = 'x'\n")
    config = config_from_flags([root], FLAGS)
    first = resolve_settings(config, root, {})
    assert first.problems
    first.problems.clear()
    assert resolve_settings(config, root, {}).problems  # the memo's copy is untouched
    assert reads == ["ckptkeeper.toml"]
