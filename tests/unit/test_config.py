"""The daemon's configuration: validation messages, durations, per-root resolution, discovery."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ckptkeeper.policy import Policy
from ckptkeeper.storage import POSIX
from ckptkeeper.stores import Root
from ckptkeeperd.config import (
    SETTING_KEYS,
    ConfigError,
    DaemonConfig,
    DaemonOptions,
    Settings,
    config_from_flags,
    load_config,
    merge_flags,
)
from ckptkeeperd.resolver import resolve_settings
from ckptkeeperd.roots import expand_roots


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def make_steps(root: Path, *names: str) -> Path:
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    return root


def config_yaml(metric: str | None, higher: bool | None) -> str:
    lines = ["policy:", "  model_name: x", "checkpointing:", "  enabled: true"]
    if metric is not None:
        lines.append(f"  metric_name: {metric}")
    if higher is not None:
        lines.append(f"  higher_is_better: {str(higher).lower()}")
    return "\n".join(lines) + "\n"


def load_text(tmp_path: Path, text: str) -> DaemonConfig:
    return load_config(write(tmp_path / "ckptkeeper.toml", text))


# -- validation: every error names the file, the key path and the reason ----------------------

BAD_CONFIGS = [
    ("[defaults]\nkeep_top_k = -1\n", "defaults.keep_top_k", "must be >= 0, got -1"),
    (
        '[[root]]\npath = "/a"\n[[root]]\npath = "/b"\nkeep_top_k = -1\n',
        "root[1].keep_top_k",
        "must be >= 0, got -1",
    ),
    ('[defaults]\nstale_after = "6x"\n', "defaults.stale_after", "expected a duration like"),
    ("[defaults]\nstale_after = -5\n", "defaults.stale_after", ">= 0, got -5"),
    ('[defaults]\ntrash_grace = "1w"\n', "defaults.trash_grace", "expected a duration like"),
    ('[defaults]\nsweep_interval = "0s"\n', "defaults.sweep_interval", "must be a duration > 0"),
    ('[defaults]\nobserver = "fanotify"\n', "defaults.observer", "expected one of 'auto'"),
    ("[defaults]\nkeep_every_n_steps = 0\n", "defaults.keep_every_n_steps", "must be >= 1"),
    ("[defaults]\nsave_period = 1.5\n", "defaults.save_period", "expected a whole number"),
    ('[defaults]\nmetric_name = ""\n', "defaults.metric_name", "non-empty string"),
    ('[defaults]\ncomplete_marker = "a/b"\n', "defaults.complete_marker", "plain file name"),
    (
        '[defaults]\ncomplete_marker = "training_info.json"\n',
        "defaults.complete_marker",
        "'training_info.json' is a file the checkpoint protocol already uses",
    ),
    (
        '[[root]]\npath = "/a"\ncomplete_marker = "KEEP"\n',
        "root[0].complete_marker",
        "'KEEP' is a file the checkpoint protocol already uses",
    ),
    (
        '[[discover]]\nglob = "/a/*"\ncomplete_marker = ".writer.lock"\n',
        "discover[0].complete_marker",
        "'.writer.lock' is a file the checkpoint protocol already uses",
    ),
    ('[defaults]\nkeep_latest = "yes"\n', "defaults.keep_latest", "expected true or false"),
    ('[defaults]\npath = "/a"\n', "defaults.path", "unknown key"),
    ("[defaults]\nkeep_topk = 3\n", "defaults.keep_topk", "unknown key (known keys:"),
    ("foo = 1\n", "foo", "unknown key (known keys: defaults, root, discover, daemon)"),
    ("[extra]\nx = 1\n", "extra", "unknown key"),
    ("[[defaults]]\nkeep_top_k = 1\n", "defaults", "expected a table, got an array"),
    ('[root]\npath = "/a"\n', "root", "expected an array of tables ([[root]])"),
    ("[[root]]\nkeep_top_k = 1\n", "root[0].path", "required key is missing"),
    ("[[root]]\npath = 3\n", "root[0].path", "valid string, got 3"),
    ('[[root]]\npath = ""\n', "root[0].path", "at least 1 character"),
    ('[[root]]\npath = "/a"\nglob = "/b/*"\n', "root[0].glob", "unknown key"),
    (
        '[[root]]\npath = "/a"\n[[root]]\npath = "/a/"\n',
        "root[1].path",
        "same directory as root[0]",
    ),
    ("[[discover]]\nkeep_top_k = 1\n", "discover[0].glob", "required key is missing"),
    (
        '[[discover]]\nglob = "/x/*"\nkeep_unranked = 1\n',
        "discover[0].keep_unranked",
        "expected true or false, got 1",
    ),
    ("[daemon]\nworkers = 0\n", "daemon.workers", "must be >= 1, got 0"),
    ("[daemon]\nworkers = true\n", "daemon.workers", "valid integer"),
    ("[daemon]\ndelete_workers = -2\n", "daemon.delete_workers", "must be >= 1, got -2"),
    ('[daemon]\nlog_level = "loud"\n', "daemon.log_level", "'debug', 'info', 'warning' or 'error'"),
    ("[daemon]\nthreads = 2\n", "daemon.threads", "unknown key (known keys: workers,"),
]


@pytest.mark.parametrize(("text", "key", "reason"), BAD_CONFIGS, ids=[c[1] for c in BAD_CONFIGS])
def test_bad_config_error_names_file_key_and_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    path = write(tmp_path / "ckptkeeper.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"{path}: {key}: " in message
    assert reason in message.split(f"{key}: ", 1)[1]
    assert isinstance(info.value, ValueError)
    assert info.value.source == str(path)


@pytest.mark.parametrize("value", ["[1]", "{ a = 1 }", "2024-01-01"])
@pytest.mark.parametrize("key", sorted(SETTING_KEYS))
def test_wrong_toml_type_for_any_key_is_a_config_error(
    tmp_path: Path, key: str, value: str
) -> None:
    path = write(tmp_path / "c.toml", f"[defaults]\n{key} = {value}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: defaults.{key}: ")):
        load_config(path)
    run = make_steps(tmp_path / "run", "step_1")
    write(run / "ckptkeeper.toml", f"{key} = {value}\n")
    resolved = resolve_settings(config_from_flags([], {}), Root(run, POSIX), {})
    assert resolved.settings == Settings()
    assert [p.split(": ")[1] for p in resolved.problems] == [key]


def test_policy_error_text_comes_from_policy(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[[root]]\npath = '/a'\nkeep_top_k = -1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: root[0].keep_top_k: must be >= 0, got -1"


def test_every_bad_key_is_reported_at_once(tmp_path: Path) -> None:
    text = '[defaults]\nkeep_top_k = -1\nstale_after = "x"\n[daemon]\nworkers = 0\n'
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    keys = [key for key, _ in info.value.problems]
    assert keys == ["defaults.keep_top_k", "defaults.stale_after", "daemon.workers"]
    assert len(str(info.value).splitlines()) == 3


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[defaults]\nkeep_top_k = 3\nmetric_name = \n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: invalid TOML: ")
    assert "line 3" in str(info.value)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p, "No such file or directory"),
        (lambda p: (p.mkdir(), p)[1], "Is a directory"),
        (lambda p: (p.write_bytes(b"\xff\xfe = 1"), p)[1], "not valid UTF-8"),
    ],
    ids=["missing", "directory", "not-utf8"],
)
def test_unreadable_file_names_file_and_reason(tmp_path: Path, make: Any, reason: str) -> None:
    path = make(tmp_path / "c.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30.0), ("10m", 600.0), ("6h", 21600.0), ("2d", 172800.0)]
)
@pytest.mark.parametrize("key", ["stale_after", "trash_grace", "sweep_interval"])
def test_durations_accept_seconds_minutes_hours_days(
    tmp_path: Path, key: str, text: str, seconds: float
) -> None:
    config = load_text(tmp_path, f'[defaults]\n{key} = "{text}"\n')
    value = config.defaults.sweep_interval if key == "sweep_interval" else None
    value = getattr(config.defaults.policy, key) if value is None else value
    assert value == seconds


def test_empty_file_gives_builtin_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, "")
    assert config.defaults == Settings(Policy(), 60.0, "auto")
    assert config.daemon == DaemonOptions(workers=4, delete_workers=8, log_level="info")
    assert (config.roots, config.discovers) == ([], [])
    assert config.source == tmp_path / "ckptkeeper.toml"


def test_root_paths_are_relative_to_the_config_directory(tmp_path: Path) -> None:
    text = '[[root]]\npath = "runs/a"\n[[root]]\npath = "/abs/b"\nkeep_top_k = 2\n'
    config = load_config(write(tmp_path / "etc" / "c.toml", text))
    assert [r.path for r in config.roots] == [tmp_path / "etc" / "runs" / "a", Path("/abs/b")]
    assert [dict(r.overrides) for r in config.roots] == [{}, {"keep_top_k": 2}]


def test_daemon_table_values(tmp_path: Path) -> None:
    config = load_text(
        tmp_path, '[daemon]\nworkers = 2\ndelete_workers = 16\nlog_level = "debug"\n'
    )
    assert config.daemon == DaemonOptions(2, 16, "debug")


def test_daemon_max_tmp_watches_bounds_inotify_watches_of_in_flight_saves(tmp_path: Path) -> None:
    assert load_text(tmp_path, "").daemon.max_tmp_watches == 8192
    assert load_text(tmp_path, "[daemon]\nmax_tmp_watches = 0\n").daemon.max_tmp_watches == 0
    path = tmp_path / "ckptkeeper.toml"
    for bad in ("-1", '"many"'):
        with pytest.raises(ConfigError, match=re.escape(f"{path}: daemon.max_tmp_watches: ")):
            load_text(tmp_path, f"[daemon]\nmax_tmp_watches = {bad}\n")


# -- resolution per root -----------------------------------------------------------------------

LEVELS = ["run_file", "entry", "defaults", "config_yaml"]


@pytest.mark.parametrize(
    "present",
    [
        ("run_file", "entry", "defaults", "config_yaml"),
        ("entry", "defaults", "config_yaml"),
        ("defaults", "config_yaml"),
        ("config_yaml",),
        ("run_file", "config_yaml"),
        ("run_file", "defaults"),
        ("entry",),
        (),
    ],
    ids=lambda present: "+".join(present) or "none",
)
def test_precedence_run_file_over_entry_over_defaults_over_config_yaml(
    tmp_path: Path, present: tuple[str, ...]
) -> None:
    root = make_steps(tmp_path / "run", "step_1")
    defaults = ""
    if "defaults" in present:
        defaults = '[defaults]\nmetric_name = "m_defaults"\nkeep_top_k = 3\n'
    config = load_text(tmp_path, defaults)
    entry = {"metric_name": "m_entry"} if "entry" in present else {}
    if "run_file" in present:
        write(root / "ckptkeeper.toml", 'metric_name = "m_run_file"\n')
    if "config_yaml" in present:
        write(root / "step_1" / "config.yaml", config_yaml("m_config_yaml", True))
    resolved = resolve_settings(config, Root(root, POSIX), entry)
    winner = next((level for level in LEVELS if level in present), None)
    assert resolved.settings.policy.metric_name == (winner and f"m_{winner}")
    assert resolved.problems == []
    origin = {"run_file": "ckptkeeper.toml", "config_yaml": "config.yaml"}.get(winner or "", winner)
    assert resolved.origins.get("metric_name") == origin


def test_each_key_resolves_independently(tmp_path: Path) -> None:
    root = make_steps(tmp_path / "run", "step_1")
    config = load_text(
        tmp_path, '[defaults]\nkeep_top_k = 3\nstale_after = "1h"\ntrash_grace = "5m"\n'
    )
    write(root / "ckptkeeper.toml", "keep_top_k = 1\n")
    resolved = resolve_settings(
        config, Root(root, POSIX), {"stale_after": "2h", "observer": "polling"}
    )
    policy = resolved.settings.policy
    assert (policy.keep_top_k, policy.stale_after, policy.trash_grace) == (1, 7200.0, 300.0)
    assert resolved.settings.observer == "polling"
    assert resolved.origins == {
        "keep_top_k": "ckptkeeper.toml",
        "stale_after": "entry",
        "observer": "entry",
        "trash_grace": "defaults",
    }


def test_config_yaml_is_read_from_the_newest_step_only(tmp_path: Path) -> None:
    root = make_steps(tmp_path / "run", "step_2", "step_10", "step_12-hf", "tmp_step_20")
    write(root / "step_2" / "config.yaml", config_yaml("older", False))
    write(root / "step_10" / "config.yaml", config_yaml("newest", True))
    write(root / "step_12-hf" / "config.yaml", config_yaml("not_a_step", False))
    write(root / "tmp_step_20" / "config.yaml", config_yaml("in_flight", False))
    elsewhere = make_steps(tmp_path / "elsewhere", "step_99")
    write(elsewhere / "step_99" / "config.yaml", config_yaml("through_symlink", False))
    (root / "step_99").symlink_to(elsewhere / "step_99")
    resolved = resolve_settings(config_from_flags([], {}), Root(root, POSIX), {})
    assert resolved.settings.policy.metric_name == "newest"
    assert resolved.settings.policy.higher_is_better is True


@pytest.mark.parametrize(
    ("configured", "expected", "origin"),
    [
        ({}, True, "config.yaml"),  # metric and direction both from the YAML
        ({"metric_name": "val_loss"}, True, "config.yaml"),  # the YAML's metric is in effect
        ({"metric_name": "val_reward"}, False, None),  # another metric's direction: not taken
        ({"higher_is_better": False}, False, "defaults"),  # a configured direction wins
    ],
)
def test_config_yaml_direction_only_for_the_metric_in_effect(
    tmp_path: Path, configured: dict[str, Any], expected: bool, origin: str | None
) -> None:
    root = make_steps(tmp_path / "run", "step_5")
    write(root / "step_5" / "config.yaml", config_yaml("val_loss", True))
    resolved = resolve_settings(config_from_flags([], configured), Root(root, POSIX), {})
    assert resolved.settings.policy.higher_is_better is expected
    assert resolved.origins.get("higher_is_better") == origin


CORRUPT_YAML: list[tuple[str, bytes | None]] = [
    ("missing", None),
    ("syntax-error", b"checkpointing: [unclosed\n  metric_name: x\n"),
    ("not-a-mapping", b"- a\n- b\n"),
    ("section-not-a-mapping", b"checkpointing: 3\n"),
    ("wrong-types", b"checkpointing:\n  metric_name: 5\n  higher_is_better: 'yes'\n"),
    ("empty-metric", b"checkpointing:\n  metric_name: ''\n"),
    ("binary", b"\x00\xff\xfe\x00garbage"),
    ("python-tag", b"checkpointing: !!python/object/apply:os.system ['true']\n"),
    ("empty", b""),
]


def test_missing_config_yaml_is_ignored_silently(tmp_path: Path) -> None:
    root = make_steps(tmp_path / "run", "step_1")
    resolved = resolve_settings(config_from_flags([], {"keep_top_k": 2}), Root(root, POSIX), {})
    assert resolved.settings == Settings().apply({"keep_top_k": 2})  # recency: nothing names one
    assert resolved.problems == []


@pytest.mark.parametrize(
    ("name", "content"), CORRUPT_YAML[1:], ids=[c[0] for c in CORRUPT_YAML[1:]]
)
def test_corrupt_config_yaml_is_reported_and_otherwise_ignored(
    tmp_path: Path, name: str, content: bytes
) -> None:
    root = make_steps(tmp_path / "run", "step_1")
    path = root / "step_1" / "config.yaml"
    path.write_bytes(content)
    resolved = resolve_settings(config_from_flags([], {}), Root(root, POSIX), {})
    assert resolved.settings == Settings()  # no keep_top_k: nothing ranks by the metric
    [problem] = resolved.problems
    assert problem.startswith(f"{path}: ") and problem.endswith("; ignored")


def test_config_yaml_symlink_is_not_followed(tmp_path: Path) -> None:
    root = make_steps(tmp_path / "run", "step_1")
    target = write(tmp_path / "real.yaml", config_yaml("val_reward", True))
    (root / "step_1" / "config.yaml").symlink_to(target)
    resolved = resolve_settings(config_from_flags([], {}), Root(root, POSIX), {})
    assert resolved.settings == Settings()
    assert [p.split(": ", 1)[1] for p in resolved.problems] == [
        "a symlink, not a regular file; ignored"
    ]


def test_config_yaml_not_consulted_when_both_keys_are_configured(tmp_path: Path) -> None:
    root = make_steps(tmp_path / "run", "step_1")
    write(root / "step_1" / "config.yaml", config_yaml("from_yaml", True))
    config = config_from_flags([], {"metric_name": "m", "higher_is_better": False})
    policy = resolve_settings(config, Root(root, POSIX), {}).settings.policy
    assert (policy.metric_name, policy.higher_is_better) == ("m", False)


BAD_RUN_FILES = [
    ("keep_top_k = -1\n", "keep_top_k: must be >= 0, got -1"),
    ('stale_after = "soon"\n', "stale_after: expected a duration"),
    ("keep_topk = 1\n", "keep_topk: unknown key"),
    ('sweep_interval = "1s"\n', "sweep_interval: a daemon setting"),
    ('observer = "polling"\n', "observer: a daemon setting"),
    ("[defaults]\nkeep_top_k = 1\n", "defaults: unknown key"),
    ("keep_top_k = \n", "invalid TOML: "),
    ('complete_marker = "training_info.json"\n', "complete_marker: 'training_info.json' is a"),
    ('complete_marker = "config.yaml"\n', "complete_marker: 'config.yaml' is a file the"),
    ('complete_marker = ".."\n', "complete_marker: expected a plain file name"),
]


@pytest.mark.parametrize(("text", "reason"), BAD_RUN_FILES, ids=[b[1] for b in BAD_RUN_FILES])
def test_invalid_run_file_is_reported_not_raised(tmp_path: Path, text: str, reason: str) -> None:
    root = make_steps(tmp_path / "run", "step_1")
    config = load_text(tmp_path, "[defaults]\nkeep_top_k = 3\n")
    run_file = write(root / "ckptkeeper.toml", "keep_latest_n = 4\n" + text)
    resolved = resolve_settings(config, Root(root, POSIX), {"keep_top_k": 5})
    # The whole file is ignored and, as its owner meant to change retention, nothing is deleted.
    expected = config.defaults.apply({"keep_top_k": 5})
    assert resolved.settings.policy == replace(expected.policy, keep_top_k=None, keep_latest_n=None)
    [problem] = resolved.problems
    assert "deletions in this root paused" in problem
    assert problem.startswith(f"{run_file}: ")
    assert reason in problem


@pytest.mark.parametrize("kind", ["symlink", "directory", "fifo"])
def test_run_file_that_is_not_a_regular_file_is_ignored(tmp_path: Path, kind: str) -> None:
    root = make_steps(tmp_path / "run", "step_1")
    run_file = root / "ckptkeeper.toml"
    if kind == "symlink":
        run_file.symlink_to(write(tmp_path / "real.toml", "keep_top_k = 1\n"))
    elif kind == "directory":
        run_file.mkdir()
    else:
        os.mkfifo(run_file)
    resolved = resolve_settings(config_from_flags([], {}), Root(root, POSIX), {})
    assert resolved.settings == Settings()
    [problem] = resolved.problems
    assert problem.startswith(f"{run_file}: ")
    assert ("symlink" if kind == "symlink" else "not a regular file") in problem


def test_resolving_a_missing_root_does_not_raise(tmp_path: Path) -> None:
    config = config_from_flags([], {"keep_top_k": 2})
    resolved = resolve_settings(config, Root(tmp_path / "gone", POSIX), {})
    assert resolved.settings.policy.keep_top_k == 2
    assert resolved.problems == []


# -- command-line flags --------------------------------------------------------------------------


def test_flags_only_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    flags = {
        "keep_top_k": 3,
        "metric_name": "val_reward",
        "higher_is_better": True,
        "stale_after": "6h",
        "keep_latest_n": None,  # not given on the command line
        "sweep_interval": "10s",
    }
    config = config_from_flags(["runs/a", "/abs/b"], flags)
    assert config.source is None
    assert [r.path for r in config.roots] == [tmp_path / "runs" / "a", Path("/abs/b")]
    policy = config.defaults.policy
    assert (policy.keep_top_k, policy.metric_name, policy.higher_is_better) == (
        3,
        "val_reward",
        True,
    )
    assert (policy.stale_after, policy.keep_latest_n, config.defaults.sweep_interval) == (
        21600.0,
        None,
        10.0,
    )
    assert [path for path, _ in expand_roots(config)] == [tmp_path / "runs" / "a", Path("/abs/b")]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"keep_top_k": -1}, "command line: keep_top_k: must be >= 0, got -1"),
        ({"stale_after": "6x"}, "command line: stale_after: expected a duration"),
        ({"observer": "magic"}, "command line: observer: expected one of"),
        ({"keep_topk": 1}, "command line: keep_topk: unknown key"),
        ({"complete_marker": "KEEP"}, "command line: complete_marker: 'KEEP' is a file the"),
    ],
)
def test_bad_flag_raises_config_error(flags: Mapping[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message):
        config_from_flags(["/r"], flags)


def test_flags_override_file_defaults_but_not_entries(tmp_path: Path) -> None:
    text = '[defaults]\nkeep_top_k = 3\nmetric_name = "a"\n[[root]]\npath = "/r"\nkeep_top_k = 5\n'
    config = merge_flags(load_text(tmp_path, text), {"keep_top_k": 1, "metric_name": None})
    assert (config.defaults.policy.keep_top_k, config.defaults.policy.metric_name) == (1, "a")
    [(root, overrides)] = expand_roots(config)
    assert resolve_settings(config, Root(root, POSIX), overrides).settings.policy.keep_top_k == 5
    elsewhere = make_steps(tmp_path / "elsewhere", "step_1")
    assert resolve_settings(config, Root(elsewhere, POSIX), {}).settings.policy.keep_top_k == 1


# -- discovery -----------------------------------------------------------------------------------


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    top = tmp_path / "ckpt"
    make_steps(top / "run-a", "step_3/step_1", "step_3/policy/step_2", ".ckptkeeper/trash/step_1")
    make_steps(top / "run-b", "tmp_step_1")
    make_steps(top / "run-c", "old_step_2")
    write(top / "run-d" / "step_7", "a regular file still marks a run directory\n")
    make_steps(top / "empty")
    make_steps(top / "exports", "step_1-hf", "step_x", "step_01.bak")
    make_steps(top / "step_9", "step_1")  # its own name is a checkpoint name: never a root
    make_steps(top / "group" / "run-e", "step_4")
    (top / "link-to-a").symlink_to(top / "run-a")
    (top / "link-to-group").symlink_to(top / "group")
    make_steps(tmp_path / "outside" / "run-x", "step_1")
    (top / "group" / "link-out").symlink_to(tmp_path / "outside" / "run-x")
    return top


def discover(tmp_path: Path, *globs: str, extra: str = "") -> list[str]:
    text = extra + "".join(f'[[discover]]\nglob = "{g}"\n' for g in globs)
    config = load_text(tmp_path, text)
    return [os.path.relpath(path, tmp_path / "ckpt") for path, _ in expand_roots(config)]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("*", ["run-a", "run-b", "run-c", "run-d"]),
        ("*/*", ["group/run-e"]),  # never run-a/step_3, run-a/.ckptkeeper, or via a symlink
        ("*/*/*", []),  # run-a/step_3/policy, run-a/.ckptkeeper/trash: inside a step or ours
        ("run-a", ["run-a"]),
        ("run-a/step_3", []),
        ("link-to-a", []),
        ("**", ["run-a", "run-b", "run-c", "run-d"]),  # not recursive
    ],
)
def test_discover_finds_run_directories_without_descending(
    tmp_path: Path, runs: Path, pattern: str, expected: list[str]
) -> None:
    assert discover(tmp_path, f"{runs}/{pattern}") == expected


def test_discover_glob_is_relative_to_the_config_directory(tmp_path: Path) -> None:
    base = tmp_path / "etc[1]"  # glob characters in the directory must not act as a pattern
    make_steps(base / "runs" / "r1", "step_1")
    make_steps(base / "runs" / "r2", "tmp_step_1")
    config = load_config(write(base / "c.toml", '[[discover]]\nglob = "runs/*"\n'))
    assert [path for path, _ in expand_roots(config)] == [
        base / "runs" / "r1",
        base / "runs" / "r2",
    ]


def test_explicit_root_wins_over_discover_and_duplicates_collapse(
    tmp_path: Path, runs: Path
) -> None:
    text = (
        f'[[root]]\npath = "{runs}/link-to-a"\nkeep_top_k = 9\n'
        f'[[discover]]\nglob = "{runs}/*"\nkeep_top_k = 1\n'
        f'[[discover]]\nglob = "{runs}/run-b"\nkeep_top_k = 2\n'
    )
    found = {p.name: dict(o) for p, o in expand_roots(load_text(tmp_path, text))}
    assert found == {
        "run-a": {"keep_top_k": 9},  # the explicit root's settings, spelled without the symlink
        "run-b": {"keep_top_k": 1},  # the first discover entry that found it
        "run-c": {"keep_top_k": 1},
        "run-d": {"keep_top_k": 1},
    }


@pytest.mark.parametrize("link_first", [True, False])
def test_a_root_listed_through_a_symlink_and_its_real_path_is_kept_by_its_real_path(
    tmp_path: Path, link_first: bool
) -> None:
    real = make_steps(tmp_path / "real", "step_1")
    link = tmp_path / "link"
    link.symlink_to(real)
    text = "".join(
        f'[[root]]\npath = "{path}"\nkeep_top_k = {k}\n'
        for path, k in ([(link, 1), (real, 2)] if link_first else [(real, 2), (link, 1)])
    )
    [(root, overrides)] = expand_roots(load_text(tmp_path, text))
    assert root == real  # never the symlink: the pass refuses a symlinked root
    assert dict(overrides) == {"keep_top_k": 1 if link_first else 2}  # the first entry's
    [(root, _)] = expand_roots(config_from_flags([str(link), str(real)], {}))
    assert root == real


def test_roots_are_the_same_by_identity_not_by_spelling(tmp_path: Path) -> None:
    real = make_steps(tmp_path / "base" / "run", "step_1")
    (tmp_path / "alias").symlink_to(tmp_path / "base")  # a symlink above the root: accepted
    other = make_steps(tmp_path / "other", "step_1")
    config = config_from_flags([str(tmp_path / "alias" / "run"), str(real), str(other)], {})
    assert [p for p, _ in expand_roots(config)] == [tmp_path / "alias" / "run", other]


def test_discover_of_a_missing_directory_finds_nothing(tmp_path: Path) -> None:
    config = load_text(tmp_path, f'[[discover]]\nglob = "{tmp_path}/nothing-here/*"\n')
    problems: list[str] = []
    assert expand_roots(config, problems) == []
    assert problems == []


def test_merge_flags_adds_command_line_roots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_text(tmp_path, '[[root]]\npath = "/r"\nkeep_top_k = 5\n')
    merged = merge_flags(config, {"keep_top_k": 2}, extra_roots=["extra"])
    assert [(r.path, dict(r.overrides)) for r in merged.roots] == [
        (Path("/r"), {"keep_top_k": 5}),
        (tmp_path / "extra", {}),
    ]
    assert merged.defaults.policy.keep_top_k == 2
    with pytest.raises(ConfigError, match=r"^command line: ROOT\[0\]: "):
        merge_flags(config, {}, extra_roots=[""])


def test_invalid_run_file_pauses_deletions_in_that_root(tmp_path: Path) -> None:
    run = make_steps(tmp_path / "run", "step_1")
    write(run / "ckptkeeper.toml", "keep_top_k = 10\nkeep_latst_n = 2\n")  # typo
    config = config_from_flags([str(run)], {"keep_top_k": 1, "keep_latest_n": 1})
    resolved = resolve_settings(config, Root(run, POSIX), {})
    assert resolved.settings.policy.keep_top_k is None
    assert resolved.settings.policy.keep_latest_n is None
    assert not resolved.settings.policy.bounded
    assert any("keep_latst_n" in p and "paused" in p for p in resolved.problems)
    # Fixed file: deletions resume with the owner's settings.
    write(run / "ckptkeeper.toml", "keep_top_k = 10\n")
    fixed = resolve_settings(config, Root(run, POSIX), {})
    assert fixed.settings.policy.keep_top_k == 10 and fixed.problems == []
