"""``min_free`` and ``min_keep`` through the config file, a run's ckptkeeper.toml and the flags."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from tests.helpers import CKPTKEEPER

from ckptkeeper.storage import POSIX
from ckptkeeper.stores import Root
from ckptkeeperd.config import ConfigError, config_from_flags, load_config
from ckptkeeperd.resolver import resolve_settings


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_config_file_takes_min_free_and_min_keep(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path / "c.toml",
            '[defaults]\nmin_free = "15%"\nmin_keep = 2\n'
            '[[root]]\npath = "/a"\nmin_free = 500_000_000_000\n',
        )
    )
    assert config.defaults.policy.min_free == "15%"
    assert config.defaults.policy.min_keep == 2
    resolved = resolve_settings(config, config.roots[0].root, config.roots[0].overrides)
    assert resolved.settings.policy.min_free == "500000000000"


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('[defaults]\nmin_free = "lots"\n', "defaults.min_free", "expected a share"),
        ('[defaults]\nmin_free = "0%"\n', "defaults.min_free", "between 0% and 100%"),
        ('[[root]]\npath = "/a"\nmin_keep = 0\n', "root[0].min_keep", "must be >= 1"),
    ],
)
def test_bad_values_name_file_key_and_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    path = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [(where, why)] = info.value.problems
    assert where == key
    assert reason in why
    assert str(info.value).startswith(f"{path}: {key}: ")


def test_an_invalid_run_file_pauses_pressure_deletions_too(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "step_1").mkdir(parents=True)
    write(run / "ckptkeeper.toml", "keep_top_k = 10\nkeep_latst_n = 2\n")  # typo: paused
    config = config_from_flags([str(run)], {"keep_top_k": 1, "min_free": "15%"})
    resolved = resolve_settings(config, Root(run, POSIX), {})
    assert resolved.settings.policy.min_free is None
    assert any("paused" in p for p in resolved.problems)


def test_flags_min_free_and_min_keep(tmp_path: Path) -> None:
    (tmp_path / "run" / "step_1").mkdir(parents=True)
    ok = subprocess.run(
        [CKPTKEEPER, "status", str(tmp_path / "run"), "--min-free", "1%", "--min-keep", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "min_free=1%" in ok.stdout
    bad = subprocess.run(
        [CKPTKEEPER, "status", str(tmp_path / "run"), "--min-free", "plenty"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "command line: min_free: expected a share of the filesystem like '15%'" in bad.stderr
