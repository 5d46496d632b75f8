"""The NeMo-RL compatible CheckpointManager (inline retention), from the behavioural spec.

Every filesystem effect is checked on a real temporary directory. torch and numpy are not needed:
`FakeTensor` stands in for anything with ``.item()``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
import types
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import pytest
import yaml
from tests.helpers import manager_config

import ckptkeeper.manager as manager_module
from ckptkeeper import Kind, Policy, RootLock, parse_name
from ckptkeeper.manager import CheckpointingConfig, CheckpointManager, _load_checkpoint_history


class FakeTensor:
    """A 0-d tensor/array look-alike: only ``.item()``."""

    def __init__(self, value: float) -> None:
        self.value = value

    def item(self) -> float:
        return self.value


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path.resolve() / "checkpoints"


def make_config(root: Path | str, **overrides: Any) -> dict[str, Any]:
    return manager_config(root, **{"keep_top_k": 3, "save_optimizer": True, **overrides})


@pytest.fixture
def manager(root: Path) -> CheckpointManager:
    return CheckpointManager(make_config(root))


def save(mgr: CheckpointManager, step: int, info: dict[str, Any]) -> Path:
    tmp = mgr.init_tmp_checkpoint(step, info)
    mgr.finalize_checkpoint(tmp)
    return mgr.checkpoint_dir / f"step_{step}"


def steps_on_disk(root: Path) -> list[int]:
    parsed = (parse_name(p.name) for p in root.glob("step_*"))
    return sorted(n.step for n in parsed if n is not None and n.kind is Kind.STEP)


def loss_of(path: str | Path | None) -> float:
    assert path is not None
    return float(json.loads((Path(path) / "training_info.json").read_text())["loss"])


# -- init_tmp_checkpoint ----------------------------------------------------------------------


def test_init_tmp_returns_absolute_path_and_converts_item_values_on_a_copy(
    manager: CheckpointManager,
) -> None:
    info = {"loss": 0.5, "tensor": FakeTensor(0.25), "array": FakeTensor(3), "nested": [1, 2]}
    path = manager.init_tmp_checkpoint(1, info)
    assert isinstance(path, Path) and path.is_absolute()
    assert path.exists() and path.name == "tmp_step_1"
    saved = json.loads((path / "training_info.json").read_text())
    assert saved == {"loss": 0.5, "tensor": 0.25, "array": 3, "nested": [1, 2]}
    assert isinstance(info["tensor"], FakeTensor)  # the caller's dict is untouched
    assert not (path / "config.yaml").exists()  # only written when a run config is given


@pytest.mark.parametrize("kind", ["mock", "model", "dict"])
def test_init_tmp_writes_config_yaml_with_safe_yaml(manager: CheckpointManager, kind: str) -> None:
    data = {"policy": {"model_name": "m", "lr": 1e-5}, "steps": [1, 2]}

    class Model:
        def model_dump(self, mode: str = "python") -> dict[str, Any]:
            assert mode == "json"
            return data

    run_config: Any
    if kind == "mock":
        run_config = MagicMock()
        run_config.model_dump.return_value = data
    elif kind == "model":
        run_config = Model()
    else:
        run_config = dict(data)
    path = manager.init_tmp_checkpoint(1, {"loss": 0.5}, run_config)
    assert yaml.safe_load((path / "config.yaml").read_text()) == data


def test_init_tmp_removes_a_stale_tmp_dir_first(
    manager: CheckpointManager, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = manager.init_tmp_checkpoint(3, {"loss": 0.9})
    (first / "partial.bin").write_bytes(b"x" * 100)
    second = manager.init_tmp_checkpoint(3, {"loss": 0.1})
    assert second == first and not (second / "partial.bin").exists()
    assert loss_of(second) == 0.1
    assert "Removed stale tmp_step_3 in " in capsys.readouterr().out
    assert list((root / ".ckptkeeper" / "trash").iterdir()) == []


# -- finalize and retention -------------------------------------------------------------------


def test_finalize_renames_and_keeps_the_marker(manager: CheckpointManager, root: Path) -> None:
    tmp = manager.init_tmp_checkpoint(1, {"loss": 0.5})
    manager.finalize_checkpoint(tmp)
    assert not tmp.exists()
    assert (root / "step_1" / "training_info.json").exists()
    assert (root / "step_1" / ".complete").exists()


def test_keeps_top_k_plus_latest(manager: CheckpointManager, root: Path) -> None:
    losses = [0.5, 0.3, 0.7, 0.2, 0.4, 0.8]
    for step, loss in enumerate(losses, start=1):
        save(manager, step, {"loss": loss})
    assert steps_on_disk(root) == [2, 4, 5, 6]  # top-3 by loss, plus the latest (0.8)
    assert sorted(loss_of(p) for p in root.glob("step_*")) == [0.2, 0.3, 0.4, 0.8]


def test_equal_metric_keeps_the_newer_steps(manager: CheckpointManager, root: Path) -> None:
    for step in [1, 2, 3, 4, 10, 12]:
        save(manager, step, {"loss": 0.5})
    assert steps_on_disk(root) == [4, 10, 12]


def test_steps_compare_numerically_across_digit_boundaries(
    manager: CheckpointManager, root: Path
) -> None:
    for step in [8, 9, 10, 11]:
        save(manager, step, {"loss": 0.5})
    latest = manager.get_latest_checkpoint_path()
    assert latest is not None and Path(latest).name == "step_11"
    assert steps_on_disk(root) == [9, 10, 11]


def test_missing_metric_ranks_worst_some_missing(manager: CheckpointManager, root: Path) -> None:
    infos = [{"loss": 0.5}, {"loss": 0.3}, {"other": 0.8}, {"loss": 0.2}, {}, {"loss": 1.0}, {}]
    for step, info in zip([1, 2, 3, 4, 10, 11, 12], infos, strict=True):
        save(manager, step, info)
    assert steps_on_disk(root) == [1, 2, 4, 12]


def test_missing_metric_ranks_worst_most_missing_step_by_step(
    manager: CheckpointManager, root: Path
) -> None:
    # Pruning runs after every finalize: ties among missing metrics go to the newer step.
    infos: list[dict[str, Any]] = [{"loss": 0.2}, {}, {"other": 0.8}, {}, {}, {}]
    expected_after = [[1], [1, 2], [1, 2, 3], [1, 3, 4], [1, 4, 10], [1, 10, 12]]
    for step, info, expected in zip([1, 2, 3, 4, 10, 12], infos, expected_after, strict=True):
        save(manager, step, info)
        assert steps_on_disk(root) == expected


def test_non_numeric_metrics_rank_last_instead_of_crashing(
    manager: CheckpointManager, root: Path
) -> None:
    infos = [{"loss": 0.4}, {"loss": "n/a"}, {"loss": math.nan}, {"loss": True}, {"loss": 0.6}]
    for step, info in enumerate(infos, start=1):
        save(manager, step, info)
    # top-3 among numbers first (0.4, 0.6), then the newest unranked (step 4); step 5 is latest
    assert steps_on_disk(root) == [1, 4, 5]


def test_keep_top_k_none_keeps_everything(tmp_path: Path) -> None:
    root = tmp_path.resolve() / "checkpoints"
    mgr = CheckpointManager(make_config(str(root), keep_top_k=None))
    for step in [1, 2, 3]:
        save(mgr, step, {"loss": 0.5})
    assert steps_on_disk(root) == [1, 2, 3]


def test_missing_optional_keys_take_defaults(root: Path) -> None:
    config = make_config(root)
    for key in ("save_period", "keep_top_k", "save_optimizer"):
        del config[key]
    mgr = CheckpointManager(config)
    assert mgr.keep_top_k is None and mgr.save_period == 1 and mgr.save_optimizer is True
    assert mgr.retention == "inline" and mgr.complete_marker == ".complete"


def test_save_optimizer_flag_is_stored_as_given(root: Path) -> None:
    assert CheckpointManager(make_config(root)).save_optimizer is True
    assert CheckpointManager(make_config(root, save_optimizer=False)).save_optimizer is False


@pytest.mark.parametrize(
    ("options", "values", "expected"),
    [
        ({}, [1.0] * 5, [1, 2, 3, 4, 5]),
        ({"ft_keep_latest_k": 1, "save_period": 100}, [1.0] * 5, [5]),
        ({"ft_keep_latest_k": 2, "save_period": 100}, [1.0] * 7, [6, 7]),
        ({"keep_top_k": 2}, [1.0] * 5, [4, 5]),
        ({"keep_top_k": 1, "ft_keep_latest_k": 1}, [1.0] * 9, [9]),
        (
            {"keep_top_k": 1, "ft_keep_latest_k": 1, "metric_name": "reward"},
            [0.5, 0.9, 0.3, 0.1, 0.2, 0.4],
            [2, 6],
        ),
        (
            {"keep_top_k": 2, "ft_keep_latest_k": 2, "metric_name": "reward"},
            [0.1, 0.2, 0.3, 0.9, 0.8, 0.4],
            [4, 5, 6],
        ),
        ({"ft_keep_latest_k": 1, "save_period": 2}, [1.0] * 6, [2, 4, 6]),
        ({"keep_top_k": 1, "ft_keep_latest_k": 1, "save_period": 2}, [1.0] * 8, [8]),
        (
            {"keep_top_k": 1, "ft_keep_latest_k": 1, "metric_name": "reward", "save_period": 2},
            [0.95, 0.5, 0.99, 0.9, 0.2, 0.3, 0.25, 0.4],
            [4, 8],
        ),
        (
            {"keep_top_k": 2, "ft_keep_latest_k": 2, "metric_name": "reward"},
            [0.9, 0.8, 0.1, 0.2, 0.3, 0.4],
            [1, 2, 5, 6],
        ),
    ],
)
def test_ft_keep_latest_k_union(
    root: Path, options: dict[str, Any], values: list[float], expected: list[int]
) -> None:
    config = make_config(root, metric_name=None, keep_top_k=None, ft_keep_latest_k=None)
    config.update(options)
    config["higher_is_better"] = config["metric_name"] == "reward"
    mgr = CheckpointManager(config)
    for step, value in enumerate(values, start=1):
        save(mgr, step, {"reward": value, "loss": value})
    assert steps_on_disk(root) == expected


def test_policy_mapping(root: Path) -> None:
    mgr = CheckpointManager(make_config(root, keep_top_k=None, ft_keep_latest_k=2, save_period=5))
    policy = mgr._policy(exclude_latest=False)
    assert policy == Policy(
        keep_top_k=None,
        metric_name="loss",
        higher_is_better=False,
        save_period=5,
        keep_latest=False,
        keep_latest_n=2,
        keep_every_n_steps=5,
    )


def test_exclude_latest_false_can_delete_the_latest(root: Path) -> None:
    mgr = CheckpointManager(make_config(root, keep_top_k=1))
    for step, loss in [(1, 0.1), (2, 0.5)]:
        mgr.finalize_checkpoint(mgr.init_tmp_checkpoint(step, {"loss": loss}))
    assert steps_on_disk(root) == [1, 2]  # 2 is the latest
    mgr.remove_old_checkpoints(exclude_latest=False)
    assert steps_on_disk(root) == [1]


def test_pruning_goes_through_trash_and_reports(
    manager: CheckpointManager, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for step in range(1, 6):
        save(manager, step, {"loss": 1.0 / step})
    out = capsys.readouterr().out
    assert f"Removing checkpoint {root / 'step_1'} (step 1)" in out
    assert list((root / ".ckptkeeper" / "trash").iterdir()) == []
    assert steps_on_disk(root) == [3, 4, 5]


def test_pruning_never_touches_other_entries(manager: CheckpointManager, root: Path) -> None:
    root.mkdir(parents=True)
    for name in ["step_1-hf", "step_x", "step_01a", "notes"]:
        (root / name).mkdir()
    (root / "step_0").mkdir()  # no training_info.json: never deleted, never ranked
    pinned = save(manager, 1, {"loss": 9.0})
    (pinned / "KEEP").touch()  # a ckptkeeper pin survives NeMo-RL retention too
    for step in range(2, 8):
        save(manager, step, {"loss": 1.0})
    assert steps_on_disk(root) == [0, 1, 5, 6, 7]
    assert all((root / n).is_dir() for n in ["step_1-hf", "step_x", "step_01a", "notes"])


def test_replace_existing_step_leaves_no_old_step(manager: CheckpointManager, root: Path) -> None:
    step_dir = save(manager, 1, {"loss": 0.5})
    (step_dir / "stale_marker").write_text("old")
    save(manager, 1, {"loss": 0.2})
    assert not (root / "old_step_1").exists() and not (root / "tmp_step_1").exists()
    assert not (step_dir / "stale_marker").exists()
    assert loss_of(step_dir) == 0.2
    assert list((root / ".ckptkeeper" / "trash").iterdir()) == []


def test_rename_finishes_over_a_leftover_old_step(manager: CheckpointManager, root: Path) -> None:
    save(manager, 1, {"loss": 0.5})
    (root / "step_1").rename(root / "old_step_1")  # as if a replace crashed between renames
    save(manager, 1, {"loss": 0.2})
    assert not (root / "old_step_1").exists()
    assert loss_of(root / "step_1") == 0.2


def test_marker_is_written_before_any_rename(manager: CheckpointManager, root: Path) -> None:
    # A regular file named step_1 makes the finalize refuse (never renamed over a non-checkpoint):
    # the save is left as tmp_step_1 with its marker, which a later pass can always finish.
    tmp = manager.init_tmp_checkpoint(1, {"loss": 0.5})
    (root / "step_1").write_text("not a checkpoint")
    with pytest.raises(OSError, match="not finalized"):
        manager.finalize_checkpoint(tmp)
    assert (tmp / ".complete").is_file()
    assert (root / "step_1").read_text() == "not a checkpoint"


def test_rename_of_a_missing_tmp_dir_raises(manager: CheckpointManager, root: Path) -> None:
    root.mkdir(parents=True)
    with pytest.raises(FileNotFoundError):
        manager._rename_checkpoint(root / "tmp_step_4")
    with pytest.raises(ValueError, match="tmp_step"):
        manager._rename_checkpoint(root / "step_4")


# -- lookups ----------------------------------------------------------------------------------


def test_empty_root(manager: CheckpointManager, root: Path) -> None:
    assert not root.exists()
    assert manager.get_latest_checkpoint_path() is None
    assert manager.get_best_checkpoint_path() is None
    assert manager.load_training_info(None) is None
    assert _load_checkpoint_history(root) == []


def test_load_training_info_returns_the_saved_dict(manager: CheckpointManager, root: Path) -> None:
    save(manager, 1, {"loss": 0.5, "step": 1})
    assert manager.load_training_info(root / "step_1") == {"loss": 0.5, "step": 1}


def test_latest_ignores_names_outside_the_grammar(manager: CheckpointManager, root: Path) -> None:
    save(manager, 1, {"loss": 0.5})
    (root / "step_1-hf").mkdir()
    (root / "step_99-hf").mkdir()
    (root / "step_\u0661\u0662").mkdir()  # Arabic-Indic digits are not ASCII digits
    latest = manager.get_latest_checkpoint_path()
    assert latest is not None and Path(latest).name == "step_1"


def test_history_needs_training_info(manager: CheckpointManager, root: Path) -> None:
    save(manager, 2, {"loss": 0.5})
    (root / "step_3").mkdir()
    history = _load_checkpoint_history(root)
    assert [(s, Path(p).name, i) for s, p, i in history] == [(2, "step_2", {"loss": 0.5})]
    assert isinstance(history[0][1], str)


def test_best_by_metric(manager: CheckpointManager) -> None:
    for step, loss in [(1, 0.5), (2, 0.3), (3, 0.7)]:
        save(manager, step, {"loss": loss})
    assert loss_of(manager.get_best_checkpoint_path()) == 0.3


def test_best_higher_is_better(root: Path) -> None:
    mgr = CheckpointManager(
        make_config(root, metric_name="accuracy", higher_is_better=True, keep_top_k=None)
    )
    for step, acc in [(1, 0.7), (2, 0.9), (3, 0.8)]:
        save(mgr, step, {"accuracy": acc})
    best = mgr.get_best_checkpoint_path()
    assert best is not None and Path(best).name == "step_2"


def test_best_warns_once_about_missing_metric(root: Path) -> None:
    mgr = CheckpointManager(make_config(str(root), keep_top_k=None))
    for step, info in enumerate([{"loss": 0.5}, {"other": 0.8}, {"loss": 0.3}, {}], start=1):
        save(mgr, step, info)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        best = mgr.get_best_checkpoint_path()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "Ignoring 2 checkpoint(s) at step(s) [" in message and "val_at_end" in message
    assert loss_of(best) == 0.3


def test_best_warns_twice_and_returns_latest_when_no_metric(root: Path) -> None:
    mgr = CheckpointManager(make_config(str(root), keep_top_k=None))
    for step, info in enumerate([{"other": 0.5}, {}, {"different": 0.3}], start=1):
        save(mgr, step, info)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        best = mgr.get_best_checkpoint_path()
    assert len(caught) == 2
    assert "Ignoring 3 checkpoint(s)" in str(caught[0].message)
    second = str(caught[1].message)
    assert "No checkpoints contain metric 'loss'" in second
    assert "Returning latest checkpoint" in second and "val_at_end" in second
    assert best is not None and Path(best).name == "step_3"


def test_best_ranks_non_numeric_values_last(root: Path) -> None:
    mgr = CheckpointManager(make_config(root, keep_top_k=None))
    for step, loss in [(1, 0.9), (2, math.nan), (3, "bad")]:
        save(mgr, step, {"loss": loss})
    best = mgr.get_best_checkpoint_path()
    assert best is not None and Path(best).name == "step_1"


@pytest.fixture
def shimmed(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """``import nemo_rl.utils.checkpoint`` gives ckptkeeper.manager (how NeMo-RL tests run)."""
    for name in ("nemo_rl", "nemo_rl.utils"):
        package = types.ModuleType(name)
        package.__path__ = []
        monkeypatch.setitem(sys.modules, name, package)
    monkeypatch.setitem(sys.modules, "nemo_rl.utils.checkpoint", manager_module)
    import nemo_rl.utils.checkpoint as checkpoint_module  # type: ignore[import-not-found]

    assert checkpoint_module is manager_module
    return checkpoint_module  # type: ignore[no-any-return]


@pytest.mark.parametrize("reverse", [False, True])
def test_best_tie_goes_to_newer_step_whatever_glob_order(
    shimmed: types.ModuleType, root: Path, monkeypatch: pytest.MonkeyPatch, reverse: bool
) -> None:
    from nemo_rl.utils.checkpoint import (  # type: ignore[import-not-found]
        CheckpointManager as ShimManager,
    )

    mgr = ShimManager(make_config(root))
    for step, loss in [(1, 0.2), (5, 0.5), (10, 0.2)]:
        save(mgr, step, {"loss": loss})
    original = shimmed.glob.glob
    calls: list[str] = []

    def ordered(pattern: str) -> list[str]:
        calls.append(pattern)
        found = original(pattern)
        return sorted(found, key=lambda p: int(Path(p).name.split("_")[1]), reverse=reverse)

    monkeypatch.setattr(shimmed.glob, "glob", ordered)
    best = mgr.get_best_checkpoint_path()
    assert calls, "the manager must list steps through module.glob.glob"
    assert best is not None and Path(best).name == "step_10"


# -- resume paths -----------------------------------------------------------------------------


@pytest.mark.parametrize("component", ["policy", "value"])
def test_resume_paths_dtensor_optimizer_wins_without_touching_megatron(
    root: Path, component: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = root / "step_1"
    (ckpt / component / "optimizer").mkdir(parents=True)
    (ckpt / component / "weights" / "iter_0000000").mkdir(parents=True)
    (ckpt / component / "weights" / "iter_0000000" / "metadata.json").touch()
    loader = MagicMock(side_effect=AssertionError("must not be called"))
    monkeypatch.setattr(manager_module, "_load_megatron_common_state_dict", loader)
    weights, optimizer = CheckpointManager.get_resume_paths(ckpt, model_component=component)
    assert (weights, optimizer) == (ckpt / component / "weights", ckpt / component / "optimizer")
    loader.assert_not_called()


def test_resume_paths_default_to_policy_and_falsy_path(root: Path) -> None:
    assert CheckpointManager.get_resume_paths(None) == (None, None)
    assert CheckpointManager.get_resume_paths("") == (None, None)
    (root / "step_1" / "policy" / "weights").mkdir(parents=True)
    (root / "step_1" / "policy" / "optimizer").mkdir()
    weights, optimizer = CheckpointManager.get_resume_paths(root / "step_1")
    assert optimizer == root / "step_1" / "policy" / "optimizer"
    assert weights == root / "step_1" / "policy" / "weights"


@pytest.mark.parametrize("marker", ["common.pt", "metadata.json"])
@pytest.mark.parametrize(("state", "found"), [({"optimizer": {}}, True), ({"args": {}}, False)])
def test_resume_paths_megatron_common_state(
    root: Path, monkeypatch: pytest.MonkeyPatch, marker: str, state: dict[str, Any], found: bool
) -> None:
    ckpt = root / "step_1"
    iteration = ckpt / "value" / "weights" / "iter_0000000"
    iteration.mkdir(parents=True)
    (iteration / marker).touch()
    loader = MagicMock(return_value=state)
    monkeypatch.setattr(manager_module, "_load_megatron_common_state_dict", loader)
    if found:
        result = CheckpointManager.get_resume_paths(ckpt, model_component="value")
    else:
        with pytest.warns(UserWarning, match="Optimizer state not found"):
            result = CheckpointManager.get_resume_paths(ckpt, model_component="value")
    assert result == (ckpt / "value" / "weights", ckpt / "value" / "optimizer" if found else None)
    loader.assert_called_once_with(iteration)


@pytest.mark.parametrize("error", [RuntimeError("Megatron-Core is required"), OSError("bad")])
def test_resume_paths_propagate_loader_errors(
    root: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    iteration = root / "step_1" / "policy" / "weights" / "iter_0000000"
    iteration.mkdir(parents=True)
    (iteration / "metadata.json").touch()
    monkeypatch.setattr(
        manager_module, "_load_megatron_common_state_dict", MagicMock(side_effect=error)
    )
    with pytest.raises(type(error), match=str(error)):
        CheckpointManager.get_resume_paths(root / "step_1")


def test_resume_paths_run_config_fallback(root: Path) -> None:
    iteration = root / "step_1" / "policy" / "weights" / "iter_0000000"
    iteration.mkdir(parents=True)
    (iteration / "run_config.yaml").write_text(yaml.safe_dump({"checkpoint": {"save_optim": True}}))
    _, optimizer = CheckpointManager.get_resume_paths(root / "step_1")
    assert optimizer == root / "step_1" / "policy" / "optimizer"


def test_resume_paths_warn_when_nothing_found(manager: CheckpointManager, root: Path) -> None:
    save(manager, 1, {"loss": 0.5})
    (root / "step_1" / "policy" / "weights").mkdir(parents=True)
    with pytest.warns(UserWarning, match="Optimizer state not found"):
        weights, optimizer = manager.get_resume_paths(root / "step_1")
    assert weights == root / "step_1" / "policy" / "weights" and optimizer is None


def test_megatron_loader_without_megatron_or_torch(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("megatron", "megatron.core", "megatron.core.dist_checkpointing", "torch"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import raise ImportError
    root.mkdir()
    (root / "common.pt").touch()
    with pytest.raises(RuntimeError, match=r"Megatron-Core is required .* `mcore` extra\."):
        manager_module._load_megatron_common_state_dict(root)


# -- async finalization -----------------------------------------------------------------------


@pytest.fixture
def async_manager(root: Path) -> Any:
    mgr = CheckpointManager(make_config(root, metric_name=None, keep_top_k=None))
    yield mgr
    mgr.shutdown()


def test_begin_finalization_renames_after_wait_fn(async_manager: Any, root: Path) -> None:
    order: list[str] = []

    def wait() -> None:
        order.append("start")
        time.sleep(0.05)
        order.append(f"end:{(root / 'step_1').exists()}")

    tmp = async_manager.init_tmp_checkpoint(1, {"loss": 0.1})
    async_manager.begin_finalization(tmp, wait_fn=wait)
    async_manager.finalize_pending()
    assert order == ["start", "end:False"]
    assert (root / "step_1").exists() and not tmp.exists()


def test_begin_waits_for_the_previous_one(async_manager: Any, root: Path) -> None:
    gate = threading.Event()
    async_manager.begin_finalization(
        async_manager.init_tmp_checkpoint(1, {}), wait_fn=lambda: gate.wait(5)
    )
    assert async_manager.has_pending_finalization
    tmp2 = async_manager.init_tmp_checkpoint(2, {})
    gate.set()
    async_manager.begin_finalization(tmp2)
    async_manager.finalize_pending()
    assert steps_on_disk(root) == [1, 2]
    assert not async_manager.has_pending_finalization


def test_finalize_pending_is_idempotent_and_reraises_once(async_manager: Any, root: Path) -> None:
    async_manager.finalize_pending()  # nothing pending: no-op

    def fail() -> None:
        raise ValueError("async write failed")

    async_manager.begin_finalization(async_manager.init_tmp_checkpoint(1, {}), wait_fn=fail)
    with pytest.raises(RuntimeError, match="Background checkpoint finalization failed") as info:
        async_manager.finalize_pending()
    assert isinstance(info.value.__cause__, ValueError)
    assert not async_manager.has_pending_finalization
    async_manager.finalize_pending()  # the error was cleared
    async_manager.begin_finalization(async_manager.init_tmp_checkpoint(2, {}))
    async_manager.finalize_pending()
    assert steps_on_disk(root) == [2]


@pytest.mark.parametrize("keep", [1, 2])
def test_shutdown_waits_for_rename_and_deletion(root: Path, keep: int) -> None:
    mgr = CheckpointManager(make_config(root, metric_name=None, keep_top_k=keep))
    for step in range(1, 6):
        mgr.begin_finalization(mgr.init_tmp_checkpoint(step, {"loss": float(step)}))
    mgr.shutdown()
    mgr.shutdown()  # idempotent
    assert steps_on_disk(root) == list(range(6 - keep, 6))
    mgr.begin_finalization(mgr.init_tmp_checkpoint(6, {}))  # still usable
    mgr.shutdown()
    assert 6 in steps_on_disk(root)


def test_delete_failure_is_a_warning(async_manager: Any, root: Path) -> None:
    failed: Future[None] = Future()
    failed.set_exception(RuntimeError("rmtree boom"))
    ok: Future[None] = Future()
    ok.set_result(None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CheckpointManager._warn_on_delete_failure(ok)
        assert caught == []
        CheckpointManager._warn_on_delete_failure(failed)
    assert len(caught) == 1
    assert "prune old checkpoints" in str(caught[0].message)
    assert "rmtree boom" in str(caught[0].message)


def test_failing_prune_does_not_break_finalization(
    async_manager: Any, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom() -> None:
        raise RuntimeError("simulated prune failure")

    monkeypatch.setattr(async_manager, "remove_old_checkpoints", boom)
    tmp = async_manager.init_tmp_checkpoint(1, {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async_manager.begin_finalization(tmp)
        async_manager.finalize_pending()
        async_manager.shutdown()
    assert (root / "step_1").exists() and not tmp.exists()
    assert any("simulated prune failure" in str(w.message) for w in caught)


def test_context_manager_flushes_on_exit_and_on_error(root: Path) -> None:
    config = make_config(root, metric_name=None, keep_top_k=None)
    with CheckpointManager(config) as mgr:
        mgr.begin_finalization(mgr.init_tmp_checkpoint(1, {}))
        assert mgr.has_pending_finalization
    assert (root / "step_1").exists()

    with pytest.raises(ValueError, match="training blew up"), CheckpointManager(config) as mgr:
        mgr.begin_finalization(mgr.init_tmp_checkpoint(2, {}))
        raise ValueError("training blew up")
    assert (root / "step_2").exists()


def test_context_manager_with_failing_finalization(root: Path) -> None:
    config = make_config(root, metric_name=None, keep_top_k=None)

    def fail() -> None:
        raise OSError("async write failed")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="training blew up"), CheckpointManager(config) as mgr:
            mgr.begin_finalization(mgr.init_tmp_checkpoint(1, {}), wait_fn=fail)
            raise ValueError("training blew up")
    assert any("finalization failed" in str(w.message).lower() for w in caught)

    with (
        pytest.raises(RuntimeError, match="Background checkpoint finalization failed"),
        CheckpointManager(config) as mgr,
    ):
        mgr.begin_finalization(mgr.init_tmp_checkpoint(2, {}), wait_fn=fail)


def test_background_rename_serialises_with_a_held_root_lock(async_manager: Any, root: Path) -> None:
    tmp = async_manager.init_tmp_checkpoint(1, {})
    with RootLock(root):
        async_manager.begin_finalization(tmp)
        time.sleep(0.2)
        assert tmp.exists() and async_manager.has_pending_finalization
    async_manager.finalize_pending()
    assert (root / "step_1").exists()


# -- config forms -----------------------------------------------------------------------------


def test_typeadapter_accepts_null_keep_top_k() -> None:
    from pydantic import TypeAdapter

    raw = {
        "enabled": True,
        "checkpoint_dir": "/tmp/checkpoints",
        "metric_name": "val_loss",
        "higher_is_better": False,
        "save_period": 10,
        "keep_top_k": None,
    }
    validated = TypeAdapter(CheckpointingConfig).validate_python(raw)
    assert validated["keep_top_k"] is None and validated["checkpoint_dir"] == "/tmp/checkpoints"
    with_retention = TypeAdapter(CheckpointingConfig).validate_python(
        {**raw, "retention": "daemon"}
    )
    assert with_retention["retention"] == "daemon"


def test_attribute_style_configs(root: Path) -> None:
    from pydantic import BaseModel, ConfigDict

    class Model(BaseModel):
        model_config = ConfigDict(extra="allow")
        enabled: bool = True
        checkpoint_dir: str
        metric_name: str | None
        higher_is_better: bool
        save_period: int
        keep_top_k: int | None = None

    model = Model(
        checkpoint_dir=str(root),
        metric_name="loss",
        higher_is_better=False,
        save_period=1,
        keep_top_k=1,
        retention="inline",
    )
    namespace = types.SimpleNamespace(
        checkpoint_dir=root, metric_name="loss", higher_is_better=False, keep_top_k=1
    )
    for config in (model, namespace):
        mgr = CheckpointManager(config)
        assert mgr.keep_top_k == 1 and mgr.save_optimizer is True and mgr.save_period == 1
        for step, loss in [(1, 0.3), (2, 0.1), (3, 0.2)]:
            save(mgr, step, {"loss": loss})
        assert steps_on_disk(root) == [2, 3]
        CheckpointManager(make_config(root, keep_top_k=0)).remove_old_checkpoints(
            exclude_latest=False
        )
        assert steps_on_disk(root) == []


def test_invalid_values_name_the_key(root: Path) -> None:
    with pytest.raises(ValueError, match="retention"):
        CheckpointManager(make_config(root, retention="sometimes"))
    with pytest.raises(ValueError, match="keep_top_k"):
        CheckpointManager(make_config(root, keep_top_k=-1))
    with pytest.raises(ValueError, match="complete_marker"):
        CheckpointManager(make_config(root, complete_marker="a/b"))
    with pytest.raises(KeyError):
        CheckpointManager({"checkpoint_dir": root})


def test_import_pulls_in_no_heavy_or_daemon_modules() -> None:
    code = (
        "import sys, ckptkeeper, ckptkeeper.manager; "
        "print(sorted(m for m in ('torch', 'numpy', 'watchdog', 'apscheduler', 'structlog') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
