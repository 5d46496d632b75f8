"""Every framework layout through the command line as NeMo-RL roots go: ``status --json`` names
the layout and why, ``sweep --dry-run`` deletes nothing, a pin keeps a checkpoint, ``sweep``
deletes through the trash; ``auto`` picks the layout and refuses a root with two."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import CKPTKEEPER


def _dirs(root: Path, names: list[str], inside: dict[str, bytes]) -> list[str]:
    for name in names:
        (root / name).mkdir()
        for rel, data in inside.items():
            (root / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / name / rel).write_bytes(data)
    return names


def torchtitan(root: Path) -> list[str]:
    return _dirs(root, [f"step-{n}" for n in (1, 2, 3, 4)], {".metadata": b"m"})


def megatron(root: Path) -> list[str]:
    (root / "latest_checkpointed_iteration.txt").write_text("4")
    return _dirs(root, [f"iter_{n:07d}" for n in (1, 2, 3, 4)], {"mp_rank_00/x.pt": b"w"})


def deepspeed(root: Path) -> list[str]:
    (root / "latest").write_text("global_step4")
    return _dirs(root, [f"global_step{n}" for n in (1, 2, 3, 4)], {"x.pt": b"w"})


def orbax(root: Path) -> list[str]:
    return _dirs(root, ["1", "2", "3", "4"], {"_CHECKPOINT_METADATA": b"{}"})


def hf_trainer(root: Path) -> list[str]:
    names = _dirs(root, [f"checkpoint-{n}" for n in (1, 2, 3, 4)], {})
    for n, name in enumerate(names, 1):
        state = {"log_history": [{"step": n, "eval_loss": 1.0 / n}], "best_model_checkpoint": None}
        (root / name / "trainer_state.json").write_text(json.dumps(state))
    return names


def lightning(root: Path) -> list[str]:
    names = [f"epoch=0-step={n}-val_loss=0.{n}000.ckpt" for n in (1, 2, 3, 4)]
    for name in names:
        (root / name).write_bytes(b"w")
    return names


LAYOUTS: dict[str, Callable[[Path], list[str]]] = {
    "torchtitan": torchtitan,
    "megatron": megatron,
    "deepspeed": deepspeed,
    "orbax": orbax,
    "hf-trainer": hf_trainer,
    "lightning": lightning,
}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CKPTKEEPER, *args], capture_output=True, text=True, timeout=60)


def doc(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The one root's report of ``--json`` (log lines may come before the document)."""
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    first = lines.index("{")
    report: dict[str, Any] = json.loads("\n".join(lines[first:]))["roots"][0]
    return report


def entries(root: Path) -> set[str]:
    return {n for n in os.listdir(root) if n != ".ckptkeeper"}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_status_dry_run_pin_and_sweep_per_layout(tmp_path: Path, layout: str) -> None:
    names = LAYOUTS[layout](tmp_path)
    pin = tmp_path / (names[0] + ".KEEP") if layout == "lightning" else tmp_path / names[0] / "KEEP"
    pin.touch()
    flags = [
        "--layout",
        "auto",
        "--keep-latest-n",
        "1",
        "--settle-after",
        "0s",
    ]  # settling: unit tests
    status = doc(cli("status", str(tmp_path), "--json", *flags))
    assert status["layout"]["name"] == layout
    assert status["layout"]["why"].startswith("auto: ") and layout in status["layout"]["why"]
    before = entries(tmp_path)
    dry = doc(cli("sweep", str(tmp_path), "--dry-run", "--json", *flags))
    would = {Path(d["path"]).name for d in dry["decisions"] if d["action"] == "delete"}
    assert would == {names[1], names[2]}
    assert entries(tmp_path) == before
    pinned = next(d for d in dry["decisions"] if Path(d["path"]).name == names[0])
    assert pinned["action"] == "keep" and any("pinned" in r for r in pinned["reasons"])

    swept = cli("sweep", str(tmp_path), *flags)
    assert swept.returncode == 0, swept.stdout + swept.stderr
    assert entries(tmp_path) == before - {names[1], names[2]}
    trash = tmp_path / ".ckptkeeper" / "trash"
    assert not trash.exists() or os.listdir(trash) == []


def test_auto_refuses_two_layouts_and_deletes_nothing(tmp_path: Path) -> None:
    torchtitan(tmp_path)
    lightning(tmp_path)
    before = entries(tmp_path)
    flags = ["--layout", "auto", "--keep-latest-n", "1"]
    proc = cli("sweep", str(tmp_path), "--json", *flags)
    assert entries(tmp_path) == before
    report = doc(proc)
    reasons = " ".join(r for d in report["decisions"] for r in d["reasons"])
    assert "several layouts" in reasons and "lightning" in reasons and "torchtitan" in reasons


@pytest.mark.parametrize("where", ["defaults", "discover"])
def test_discover_finds_roots_by_the_layout_they_are_kept_as(tmp_path: Path, where: str) -> None:
    from ckptkeeperd.config import load_config
    from ckptkeeperd.roots import expand_roots

    runs = tmp_path / "runs"
    for name, build in (("dcp", torchtitan), ("nemo", None), ("ltn", lightning)):
        (runs / name).mkdir(parents=True)
        if build is not None:
            build(runs / name)
    (runs / "nemo" / "step_1").mkdir()
    layout = 'layout = "torchtitan"\n'
    text = (
        f"[defaults]\n{layout}[[discover]]\nglob = '{runs}/*'\n"
        if where == "defaults"
        else f"[[discover]]\nglob = '{runs}/*'\n{layout}"
    )
    (tmp_path / "c.toml").write_text(text)
    found = [p.name for p, _ in expand_roots(load_config(tmp_path / "c.toml"))]
    assert found == ["dcp"]
    auto = text.replace("torchtitan", "auto")
    (tmp_path / "c.toml").write_text(auto)
    assert [p.name for p, _ in expand_roots(load_config(tmp_path / "c.toml"))] == [
        "dcp",
        "ltn",
        "nemo",
    ]


def test_metrics_from_is_the_policy_key_and_metrics_file_stays_the_textfile(tmp_path: Path) -> None:
    """``--metrics-from`` sets ``metrics_file`` (a JSON file inside each checkpoint); ``sweep
    --metrics-file`` still writes the Prometheus textfile, with no duplicate-option warning."""
    for n, loss in ((1, 0.1), (2, 0.9), (3, 0.5)):
        (tmp_path / f"step-{n}").mkdir()
        (tmp_path / f"step-{n}" / ".metadata").write_bytes(b"m")
        (tmp_path / f"step-{n}" / "eval.json").write_text(json.dumps({"loss": loss}))
    textfile = tmp_path.parent / f"{tmp_path.name}.prom"
    proc = cli(
        "sweep",
        str(tmp_path),
        "--layout",
        "torchtitan",
        "--keep-top-k",
        "1",
        "--metric",
        "loss",
        "--lower-is-better",
        "--metrics-from",
        "eval.json",
        "--metrics-file",
        str(textfile),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "more than once" not in proc.stderr
    assert entries(tmp_path) == {"step-1", "step-3"}
    assert "ckptkeeper_" in textfile.read_text()
