"""ckptkeeper against the real checkpoint writers (torch DCP as torchtitan uses it, Lightning,
transformers' Trainer, Orbax on JAX CPU), run in subprocesses; each test skips, saying why, when
its framework is not installed (``pip install -e '.[test,frameworks]'`` installs them all)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ckptkeeper import Action, Policy
from ckptkeeper.info import InfoCache
from ckptkeeper.passes import PassResult, locked_pass
from tests.helpers import CKPTKEEPER, Daemon, wait_until

REPO = Path(__file__).resolve().parents[2]
HOUR = 3600.0


def need(*modules: str) -> None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(
                f"{module} is not installed (pip install -e '.[test,frameworks]' installs it)"
            )


def writer(what: str, root: Path, *args: Any, timeout: float = 240) -> dict[str, Any]:
    """Run one of `tests.frameworks.writers` and return its JSON line."""
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false"
    )
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.frameworks.writers", what, str(root), *map(json.dumps, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, (
        f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def keeper(root: Path, ahead: float = 0.0, **policy: object) -> PassResult:
    """One real locked pass, its clock ``ahead`` seconds in the future."""
    clock = InfoCache(clock_ns=lambda: int((time.time() + ahead) * 1e9))
    return locked_pass(
        root,
        Policy(**policy),  # type: ignore[arg-type]
        clock=lambda: time.time() + ahead,
        cache=clock,
    )


def names(root: Path) -> set[str]:
    return {n for n in os.listdir(root) if n != ".ckptkeeper"}


# -- torch.distributed.checkpoint, the way torchtitan saves ------------------------------------


def test_dcp_steps_kept_by_recency_interrupted_save_collected_when_stale_latest_loads(
    tmp_path: Path,
) -> None:
    need("torch")
    written = writer("dcp_save", tmp_path, [10, 20, 30, 40], 50)["written"]
    assert written == ["step-10", "step-20", "step-30", "step-40", "step-50"]
    assert not (tmp_path / "step-50" / ".metadata").exists()
    assert any(p.suffix == ".distcp" for p in (tmp_path / "step-50").iterdir())

    first = keeper(tmp_path, layout="torchtitan", keep_top_k=2)
    assert names(tmp_path) == {"step-30", "step-40", "step-50"}  # the save is not garbage yet
    assert first.decision_for(tmp_path / "step-50").action is Action.WAIT  # type: ignore[union-attr]
    stale = keeper(tmp_path, ahead=7 * HOUR, layout="torchtitan", keep_top_k=2)
    assert stale.decision_for(tmp_path / "step-50").action is Action.COLLECT  # type: ignore[union-attr]
    assert names(tmp_path) == {"step-30", "step-40"}

    latest = max(int(n.split("-")[1]) for n in names(tmp_path))
    assert writer("dcp_load", tmp_path, latest)["w"] == [40.0] * 4


# -- Lightning ModelCheckpoint ---------------------------------------------------------------

_LOSS = re.compile(r"epoch=\d+-step=(\d+)-val_loss=([0-9.]+)\.ckpt")


@pytest.mark.parametrize("save_last", ["copy", "link"])
def test_lightning_top_k_by_val_loss_and_last_ckpt_untouched(
    tmp_path: Path, save_last: str
) -> None:
    need("torch", "lightning")
    written = writer("lightning_fit", tmp_path, save_last)["written"]
    ckpts = {m[0]: (int(m[1]), float(m[2])) for n in written if (m := _LOSS.fullmatch(n))}
    assert len(ckpts) == 6 and "last.ckpt" in written
    last = tmp_path / "last.ckpt"
    before = os.lstat(last)
    link = os.readlink(last) if save_last == "link" else None

    proc = subprocess.run(
        [
            CKPTKEEPER,
            "sweep",
            str(tmp_path),
            "--layout",
            "lightning",
            "--keep-top-k",
            "1",
            "--metric",
            "val_loss",
            "--lower-is-better",
            "--settle-after",
            "0s",  # the trainer has finished: its files are complete
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    best = min(ckpts, key=lambda n: (ckpts[n][1], -ckpts[n][0]))
    newest = max(ckpts, key=lambda n: ckpts[n][0])
    expected = {best, newest, "last.ckpt"} | ({link} if link else set())
    assert names(tmp_path) == expected
    after = os.lstat(last)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    if link:
        assert os.readlink(last) == link


# -- transformers Trainer, kept by the daemon while it trains ---------------------------------


def _best_and_newest(root: Path) -> tuple[set[str], dict[str, Any]]:
    steps = sorted(int(n.split("-")[1]) for n in names(root) if n.startswith("checkpoint-"))
    state = json.loads((root / f"checkpoint-{steps[-1]}" / "trainer_state.json").read_text())
    evals = {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
    best = min(evals, key=lambda s: (evals[s], -s))
    named = os.path.basename(state["best_model_checkpoint"])
    return {f"checkpoint-{best}", f"checkpoint-{steps[-1]}", named}, state


def test_hf_trainer_daemon_keeps_top_k_newest_and_best_then_training_resumes(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    need("torch", "transformers", "accelerate")
    root = tmp_path / "out"
    root.mkdir()
    daemon = Daemon(
        [
            str(root),
            "--layout",
            "hf-trainer",
            "--keep-top-k",
            "1",
            "--metric",
            "eval_loss",
            "--lower-is-better",
            "--settle-after",
            "1s",
            "--sweep-interval",
            "1s",
        ]
    )
    daemons.append(daemon)
    daemon.wait_ready()
    first = writer("hf_train", root, 12, False)
    assert first["global_step"] == 12
    expected, _ = _best_and_newest(root)
    wait_until(lambda: names(root) == expected, timeout=30, what=f"only {sorted(expected)} left")
    # A deletion is logged once its trash entry is removed, just after the step left the root.
    wait_until(lambda: daemon.find("deleted"), timeout=30, what="deleted logged")
    assert daemon.stop() == 0

    resumed = writer("hf_train", root, 16, True)
    assert resumed["global_step"] == 16
    assert "checkpoint-16" in resumed["written"]


# -- Orbax CheckpointManager on JAX CPU -------------------------------------------------------


def test_orbax_top_k_by_metrics_temporary_collected_and_latest_restores(tmp_path: Path) -> None:
    need("jax", "orbax.checkpoint")
    root = tmp_path / "ckpt"
    losses = {"1": 0.5, "2": 0.1, "3": 0.9, "4": 0.7}
    writer("orbax_save", root, losses, None)
    crashed = writer("orbax_save", root, {}, 5)["written"]
    tmps = [n for n in crashed if n.startswith("5.orbax-checkpoint-tmp")]
    assert tmps, crashed

    keeper(root, layout="orbax", keep_top_k=1, metric_name="loss")
    assert names(root) == {"2", "4", *tmps}  # the best, the latest; the temporary is young
    keeper(root, ahead=7 * HOUR, layout="orbax", keep_top_k=1, metric_name="loss")
    assert names(root) == {"2", "4"}
    restored = writer("orbax_restore", root)
    assert restored == {"step": 4, "w": [4.0] * 4}


# -- DeepSpeed engine.save_checkpoint on CPU ---------------------------------------------------


def test_deepspeed_keeps_the_latest_tag_collects_an_unfinished_one_and_latest_loads(
    tmp_path: Path,
) -> None:
    need("torch", "deepspeed")
    written = writer("deepspeed_save", tmp_path, 4, True)["written"]
    assert {"global_step4", "global_step5", "latest"} <= set(written)
    assert (tmp_path / "latest").read_text().strip() == "global_step4"

    first = keeper(tmp_path, layout="deepspeed", keep_latest_n=1)
    assert "named by latest" in "; ".join(first.decision_for(tmp_path / "global_step4").reasons)  # type: ignore[union-attr]
    assert {n for n in names(tmp_path) if n.startswith("global_step")} == {
        "global_step4",
        "global_step5",  # above latest, but young: a save in progress
    }
    keeper(tmp_path, ahead=7 * HOUR, layout="deepspeed", keep_latest_n=1)
    assert {n for n in names(tmp_path) if n.startswith("global_step")} == {"global_step4"}
    assert writer("deepspeed_load", tmp_path) == {"tag": "global_step4", "step": 4}
