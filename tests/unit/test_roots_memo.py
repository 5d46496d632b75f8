"""The settings memo (`SettingsResolver`): a run's ckptkeeper.toml and the config.yaml files
the metric is read from are read again whenever they (or the root's listing) changed, and not
otherwise. Its clock is injected: "later" is a resolver whose clock runs a minute ahead, as if
the files had been written a minute before each resolve (older than MEMO_TRUST_S)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ckptkeeper.scan import MEMO_TRUST_S
from ckptkeeper.storage import POSIX
from ckptkeeper.stores import Root
from ckptkeeperd.config import config_from_flags
from ckptkeeperd.resolver import SettingsResolver


@pytest.fixture
def later() -> SettingsResolver:
    ahead = int((MEMO_TRUST_S + 60) * 1e9)
    return SettingsResolver(clock_ns=lambda: time.time_ns() + ahead)


def reads(resolver: SettingsResolver) -> list[str]:
    """The files resolving read, by name (ckptkeeper.toml tried, config.yaml parsed)."""
    return sorted(resolver.reads.elements())


def run_dir(tmp_path: Path, toml: str | None = None, *steps: str) -> Path:
    root = tmp_path / "run"
    root.mkdir()
    for s in steps:
        (root / s).mkdir()
    if toml is not None:
        (root / "ckptkeeper.toml").write_text(toml)
    return root


FLAGS = {"metric_name": "val", "higher_is_better": True}


def test_an_unchanged_run_file_is_read_once(tmp_path: Path, later: SettingsResolver) -> None:
    root = run_dir(tmp_path, "keep_top_k = 3\n")
    config = config_from_flags([root], FLAGS)
    first = later.resolve(config, Root(root, POSIX), {})
    again = [later.resolve(config, Root(root, POSIX), {}) for _ in range(3)]
    assert reads(later) == ["ckptkeeper.toml"]
    assert all(r == first for r in again)
    assert first.settings.policy.keep_top_k == 3


def test_an_edited_run_file_is_seen_by_the_next_resolve(
    tmp_path: Path, later: SettingsResolver
) -> None:
    root = run_dir(tmp_path, "keep_top_k = 3\n")
    config = config_from_flags([root], FLAGS)
    later.resolve(config, Root(root, POSIX), {})
    path = root / "ckptkeeper.toml"
    before = os.stat(path)
    path.write_text("keep_top_k = 4\n")  # same size; its ctime moves whatever its mtime does
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert later.resolve(config, Root(root, POSIX), {}).settings.policy.keep_top_k == 4
    path.write_text("keep_top_k = [\n")  # now invalid: deletions paused, reported
    broken = later.resolve(config, Root(root, POSIX), {})
    assert broken.settings.policy.keep_top_k is None and broken.problems
    path.unlink()
    assert later.resolve(config, Root(root, POSIX), {}).settings.policy.keep_top_k is None
    assert later.resolve(config, Root(root, POSIX), {}).problems == []
    assert reads(later) == ["ckptkeeper.toml"] * 4


def test_a_run_file_that_appears_is_seen_by_the_next_resolve(
    tmp_path: Path, later: SettingsResolver
) -> None:
    root = run_dir(tmp_path)
    config = config_from_flags([root], FLAGS)
    assert later.resolve(config, Root(root, POSIX), {}).settings.policy.keep_top_k is None
    assert later.resolve(config, Root(root, POSIX), {}).settings.policy.keep_top_k is None
    (root / "ckptkeeper.toml").write_text("keep_top_k = 1\n")
    assert later.resolve(config, Root(root, POSIX), {}).settings.policy.keep_top_k == 1
    assert reads(later) == ["ckptkeeper.toml", "ckptkeeper.toml"]  # absent once, then the new file


def test_a_run_file_changed_just_now_is_read_every_time(tmp_path: Path) -> None:
    root = run_dir(tmp_path, "keep_top_k = 3\n")
    config = config_from_flags([root], FLAGS)
    now = SettingsResolver()  # the real clock: the file was written just now
    for _ in range(3):
        now.resolve(config, Root(root, POSIX), {})
    assert reads(now) == ["ckptkeeper.toml"] * 3


def test_other_defaults_or_entry_overrides_are_resolved_afresh(
    tmp_path: Path, later: SettingsResolver
) -> None:
    root = run_dir(tmp_path)
    config = config_from_flags([root], FLAGS)
    assert later.resolve(config, Root(root, POSIX), {}).settings.policy.keep_top_k is None
    assert (
        later.resolve(config, Root(root, POSIX), {"keep_top_k": 2}).settings.policy.keep_top_k == 2
    )
    other = config_from_flags([root], {**FLAGS, "keep_top_k": 7})
    assert later.resolve(other, Root(root, POSIX), {}).settings.policy.keep_top_k == 7
    assert later.resolve(config, Root(root, POSIX), {}).settings.policy.keep_top_k is None


def test_the_config_yaml_fallback_follows_a_new_step_and_an_edited_file(
    tmp_path: Path, later: SettingsResolver
) -> None:
    root = run_dir(tmp_path, None, "step_1")
    (root / "step_1" / "config.yaml").write_text("checkpointing:\n  metric_name: loss\n")
    config = config_from_flags([root], {})
    assert later.resolve(config, Root(root, POSIX), {}).settings.policy.metric_name == "loss"
    assert later.resolve(config, Root(root, POSIX), {}).settings.policy.metric_name == "loss"
    assert reads(later) == ["ckptkeeper.toml", "config.yaml"]

    (root / "step_1" / "config.yaml").write_text("checkpointing:\n  metric_name: acc\n")
    assert later.resolve(config, Root(root, POSIX), {}).settings.policy.metric_name == "acc"

    (root / "step_2").mkdir()  # a newer step without config.yaml: the older one still counts
    assert later.resolve(config, Root(root, POSIX), {}).settings.policy.metric_name == "acc"
    (root / "step_2" / "config.yaml").write_text("checkpointing:\n  metric_name: bleu\n")
    assert later.resolve(config, Root(root, POSIX), {}).settings.policy.metric_name == "bleu"
    (root / "step_2" / "config.yaml").write_text("checkpointing: [\n")  # corrupt: reported
    resolved = later.resolve(config, Root(root, POSIX), {})
    assert resolved.settings.policy.metric_name == "acc"
    assert [p.split(": ", 1)[0] for p in resolved.problems] == [str(root / "step_2/config.yaml")]


def test_the_walk_reads_only_down_to_the_newest_usable_config_yaml(
    tmp_path: Path, later: SettingsResolver
) -> None:
    root = run_dir(tmp_path, None, *(f"step_{n}" for n in range(1, 41)))
    for n in range(1, 21):  # steps 21..40 were saved without a config.yaml
        (root / f"step_{n}" / "config.yaml").write_text("checkpointing:\n  metric_name: m\n")
    config = config_from_flags([root], {"keep_top_k": 2})
    for _ in range(5):
        assert later.resolve(config, Root(root, POSIX), {}).settings.policy.metric_name == "m"
    assert reads(later) == ["ckptkeeper.toml", "config.yaml"]  # step_20's, parsed once

    (root / "step_30" / "config.yaml").write_text("checkpointing:\n  metric_name: n\n")
    # not memo-hidden:
    assert later.resolve(config, Root(root, POSIX), {}).settings.policy.metric_name == "n"
    later.forget()  # a fresh keeper: the parsed file is still known by its identity
    assert later.resolve(config, Root(root, POSIX), {}).settings.policy.metric_name == "n"
    assert reads(later).count("config.yaml") == 2


def test_a_fixed_config_yaml_resumes_deletions(tmp_path: Path, later: SettingsResolver) -> None:
    root = run_dir(tmp_path, None, "step_1", "step_2")
    for n in (1, 2):
        (root / f"step_{n}" / "config.yaml").write_text("checkpointing: [broken\n")
    config = config_from_flags([root], {"keep_top_k": 1})
    paused = later.resolve(config, Root(root, POSIX), {})
    assert not paused.settings.policy.bounded
    assert len(paused.problems) == 2 and all("paused" in p for p in paused.problems)
    assert later.resolve(config, Root(root, POSIX), {}) == paused  # memoized while nothing changes
    (root / "step_1" / "config.yaml").write_text("checkpointing:\n  metric_name: m\n")
    resumed = later.resolve(config, Root(root, POSIX), {})
    assert (resumed.settings.policy.keep_top_k, resumed.settings.policy.metric_name) == (1, "m")
    assert [
        p.endswith("metric 'm' taken from " + str(root / "step_1/config.yaml"))
        for p in resumed.problems
    ] == [True]


def test_the_memo_hands_out_independent_results(tmp_path: Path, later: SettingsResolver) -> None:
    root = run_dir(tmp_path, "keep_top_k = 'x'\n")
    config = config_from_flags([root], FLAGS)
    first = later.resolve(config, Root(root, POSIX), {})
    assert first.problems
    first.problems.clear()
    assert later.resolve(config, Root(root, POSIX), {}).problems  # the memo's copy is untouched
    assert reads(later) == ["ckptkeeper.toml"]


def test_roots_configured_alike_share_settings_and_each_problem_names_its_root(
    tmp_path: Path, later: SettingsResolver
) -> None:
    """Settings validated once for roots whose layers are alike are still each root's: a value
    that differs only in type (1, 1.0, true) is judged on its own, and a problem names the root
    it is in (a problem is never taken from another root's layers)."""
    runs = {}
    for name, value in (("a", "1"), ("b", "1"), ("c", "true"), ("d", "true"), ("e", "1.0")):
        root = tmp_path / name
        root.mkdir()
        (root / "ckptkeeper.toml").write_text(f"keep_top_k = {value}\n")
        runs[name] = root
    config = config_from_flags(list(runs.values()), FLAGS)
    got = {name: later.resolve(config, Root(root, POSIX), {}) for name, root in runs.items()}
    assert got["a"].settings == got["b"].settings and got["a"].settings.policy.keep_top_k == 1
    assert not got["a"].problems and not got["b"].problems
    for bad in ("c", "d", "e"):
        problems = got[bad].problems
        assert len(problems) == 1 and str(runs[bad] / "ckptkeeper.toml") in problems[0], problems
        assert got[bad].settings.policy.keep_top_k is None  # deletions paused
