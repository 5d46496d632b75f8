"""Layouts: found by name and through the ``ckptkeeper.layouts`` entry-point group; a pass over a
root written in a third-party layout finalizes, keeps and deletes exactly as for nemo-rl."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers import CKPTKEEPER

from ckptkeeper import Action, Policy, PolicyError
from ckptkeeper.layouts import NEMO_RL, Layout, LayoutError, available_layouts, get_layout
from ckptkeeper.names import Kind
from ckptkeeper.passes import locked_pass
from ckptkeeperd.reconcile import preview

TINY = textwrap.dedent(
    '''
    """A tiny trainer's layout: ckpt-N (done), ckpt-N.partial (being written), ckpt-N.prev."""
    import re
    from dataclasses import dataclass

    from ckptkeeper.names import Kind, ParsedName

    _RE = re.compile(r"ckpt-([0-9]+)(\\.partial|\\.prev)?")
    _SUFFIX = {Kind.STEP: "", Kind.TMP: ".partial", Kind.OLD: ".prev"}


    @dataclass(frozen=True)
    class TinyLayout:
        name: str = "tiny"
        default_marker: str = "DONE"
        info_file: str = "metrics.json"
        pin_file: str = "PIN"
        writer_lock: str = ".lock"
        config_file: str = ""

        def parse(self, name):
            m = _RE.fullmatch(name)
            if m is None:
                return None
            kind = {None: Kind.STEP, ".partial": Kind.TMP, ".prev": Kind.OLD}[m[2]]
            step = int(m[1])
            return ParsedName(kind, step, name, name == self.format(kind, step))

        def format(self, kind, step):
            return f"ckpt-{step}{_SUFFIX[kind]}"

        def pointers(self, root):
            return {}
    '''
)


@pytest.fixture
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``tiny_layout`` installed on sys.path with a dist-info naming it in the entry points."""
    site = tmp_path_factory.mktemp("site")
    (site / "tiny_layout.py").write_text(TINY)
    dist = site / "tiny_layout-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-layout\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ckptkeeper.layouts]\ntiny = tiny_layout:TinyLayout\n")
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("tiny_layout", None)
        importlib.invalidate_caches()


def write(root: Path, name: str, metrics: dict[str, float] | None, *, done: bool) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "weights.bin").write_bytes(b"w" * 64)
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    if done:
        (path / "DONE").write_text("{}")
    return path


def test_the_nemo_rl_layout_is_built_in() -> None:
    assert get_layout("nemo-rl") is NEMO_RL
    assert isinstance(NEMO_RL, Layout)
    assert NEMO_RL.format(Kind.TMP, 7) == "tmp_step_7"
    parsed = NEMO_RL.parse("step_07")
    assert parsed is not None and (parsed.kind, parsed.step, parsed.canonical) == (
        Kind.STEP,
        7,
        False,
    )
    with pytest.raises(LayoutError, match="unknown layout 'nope'"):
        get_layout("nope")
    with pytest.raises(PolicyError, match="layout"):
        Policy(layout="nope")


def test_a_layout_registered_through_the_entry_point_group_runs_a_pass(
    tiny_package: Path, tmp_path: Path
) -> None:
    assert "tiny" in available_layouts()
    tiny = get_layout("tiny")
    assert isinstance(tiny, Layout) and tiny.name == "tiny"
    root = tmp_path / "run"
    for step, loss in [(1, 0.5), (2, 0.1), (3, 0.9)]:
        write(root, f"ckpt-{step}", {"loss": loss}, done=True)
    write(root, "ckpt-4.partial", {"loss": 0.7}, done=True)  # complete: finalized
    write(root, "ckpt-5.partial", None, done=False)  # being written: left alone
    (root / "ckpt-3" / "PIN").touch()  # the worst loss, but pinned
    (root / "step_9").mkdir()  # nemo-rl's spelling means nothing here: never touched
    policy = Policy(keep_top_k=1, metric_name="loss", layout="tiny", complete_marker="DONE")

    result = locked_pass(root, policy)

    assert result.plan is not None and result.plan.layout is tiny
    assert {o.decision.action for o in result.outcomes} == {Action.FINALIZE, Action.DELETE}
    names = sorted(p.name for p in root.iterdir() if p.name != ".ckptkeeper")
    # kept: ckpt-2 (best), ckpt-4 (latest), ckpt-3 (pinned); deleted: ckpt-1
    assert names == ["ckpt-2", "ckpt-3", "ckpt-4", "ckpt-5.partial", "step_9"]
    reasons = {d.path.name: d.reasons for d in result.plan.decisions}
    assert any("PIN" in r for r in reasons["ckpt-3"])
    assert "top-1" in " ".join(reasons["ckpt-1"])


def test_status_and_sweep_take_the_layout_from_the_command_line(
    tiny_package: Path, tmp_path: Path
) -> None:
    root = tmp_path / "run"
    for step, loss in [(1, 0.5), (2, 0.1), (3, 0.9)]:
        write(root, f"ckpt-{step}", {"loss": loss}, done=True)
    report = preview(root, Policy(keep_top_k=1, metric_name="loss", layout="tiny"))
    assert report.plan is not None
    assert report.plan.deleted_steps == {1}
    env_path = f"{tiny_package}"
    args = ["--layout", "tiny", "--keep-top-k", "1", "--metric", "loss"]
    run = subprocess.run(
        [CKPTKEEPER, "sweep", str(root), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in root.iterdir() if p.name != ".ckptkeeper") == [
        "ckpt-2",
        "ckpt-3",
    ]
