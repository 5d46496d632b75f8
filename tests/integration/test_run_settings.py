"""A root's settings as the real `ckptkeeper` processes resolve them: the metric from the newest
usable config.yaml, a run's ckptkeeper.toml applied in the very next pass, the completion marker's
name, a root listed twice, a root the keeper cannot search."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import CKPTKEEPER, Daemon, step_names, steps, wait_until, write_checkpoint

NOBODY = 65534
SETPRIV = shutil.which("setpriv")
CONFIG = (
    "policy:\n  model_name: x\ncheckpointing:\n  metric_name: reward\n  higher_is_better: true\n"
)


def sweep(*args: str, prefix: tuple[str, ...] = ()) -> tuple[int, list[dict[str, Any]], str]:
    proc = subprocess.run(
        [*prefix, CKPTKEEPER, "sweep", *args], capture_output=True, text=True, timeout=60
    )
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, events, proc.stderr


def nemo_run(root: Path) -> Path:
    """Steps 1-4, each with training_info.json and the run's config.yaml naming the metric."""
    for step, reward in {1: 0.9, 2: 0.8, 3: 0.1, 4: 0.2}.items():
        write_checkpoint(root, step, {"step": step, "reward": reward}, final=True)
        (root / f"step_{step}" / "config.yaml").write_text(CONFIG)
    return root


# -- issue 1: the metric from the newest usable config.yaml ------------------------------------


@pytest.mark.parametrize("step_5", ["mkdir", "no config.yaml", "corrupt config.yaml"])
def test_sweep_keeps_the_best_checkpoint_when_the_newest_step_has_no_usable_config_yaml(
    tmp_path: Path, step_5: str
) -> None:
    root = nemo_run(tmp_path / "run")
    (root / "step_5").mkdir()
    if step_5 != "mkdir":
        (root / "step_5" / "training_info.json").write_text('{"step": 5, "reward": 0.5}')
    if step_5 == "corrupt config.yaml":
        (root / "step_5" / "config.yaml").write_text("checkpointing: [metric_name\n")
    code, events, stderr = sweep(str(root), "--keep-top-k", "2")
    assert code == 0, stderr
    assert {"step_1", "step_2"} <= step_names(root)  # the best two by reward
    deleted = {e["step"]: e["reason"] for e in events if e["event"] == "deleted"}
    assert deleted.keys() == ({3} if step_5 == "mkdir" else {3, 4})
    assert all("by reward=" in why for why in deleted.values())
    problems = [e["reason"] for e in events if e["event"] == "config_problem"]
    if step_5 == "corrupt config.yaml":
        [problem] = problems
        assert problem.startswith(f"{root / 'step_5' / 'config.yaml'}: invalid YAML")
        assert problem.endswith(f"metric 'reward' taken from {root / 'step_4' / 'config.yaml'}")
    else:
        assert problems == []


def test_sweep_pauses_deletions_when_no_config_yaml_can_name_the_metric(tmp_path: Path) -> None:
    root = nemo_run(tmp_path / "run")
    for step in (1, 2, 3, 4):
        (root / f"step_{step}" / "config.yaml").write_text("checkpointing: [\n")
    (root / "step_5").mkdir()
    code, events, stderr = sweep(str(root), "--keep-top-k", "2")
    assert code == 0, stderr
    assert step_names(root) == {f"step_{n}" for n in range(1, 6)}
    assert not [e for e in events if e["event"] == "deleted"]
    problems = [e["reason"] for e in events if e["event"] == "config_problem"]
    assert len(problems) == 4 and all("deletions in this root paused" in p for p in problems)


# -- issue 7: a changed ckptkeeper.toml applies to the next pass -------------------------------


def _quiet_after(d: Daemon, event: str, root: Path, **match: Any) -> None:
    """Wait for ``event`` and then for the end of the pass it belongs to (a pass logs its
    actions before its ``pass_done``)."""
    d.wait_for(event, root=str(root), **match)

    def pass_done_after() -> bool:
        events = list(d.events)
        at = next(
            i
            for i, e in enumerate(events)
            if e.get("event") == event
            and all(e.get(k) == v for k, v in {"root": str(root), **match}.items())
        )
        return any(
            e.get("event") == "pass_done" and e.get("root") == str(root) for e in events[at:]
        )

    wait_until(pass_done_after, timeout=10, what=f"the pass of {event} {match} to end")


@pytest.fixture
def keep_one(tmp_path: Path, daemons: list[Daemon]) -> Iterator[tuple[Path, Daemon]]:
    """A daemon (refreshing only every hour) over a root whose ckptkeeper.toml keeps one step
    by reward, after a pass that proved it: steps 1 (best) and 3 (latest) left, 2 deleted."""
    root = tmp_path / "run"
    root.mkdir()
    (root / "ckptkeeper.toml").write_text("keep_top_k = 1\n")
    args = [str(root), "--metric", "reward", "--higher-is-better", "--sweep-interval", "1h"]
    d = Daemon([*args, "--log-level", "debug"])
    daemons.append(d)
    d.wait_ready()
    for step, reward in ((1, 0.9), (2, 0.1), (3, 0.5)):
        write_checkpoint(root, step, {"reward": reward})
        d.wait_for("finalized", step=step)
    d.wait_for("deleted", step=2)
    assert steps(root) == {1, 3}
    yield root, d
    assert d.stop() == 0


def test_raised_keep_top_k_applies_to_the_next_pass(keep_one: tuple[Path, Daemon]) -> None:
    root, d = keep_one
    (root / "ckptkeeper.toml").write_text("keep_top_k = 10\n")
    for step, reward in ((4, 0.1), (5, 0.2), (6, 0.3)):  # each one would cost a step at k=1
        write_checkpoint(root, step, {"reward": reward})
        _quiet_after(d, "finalized", root, step=step)
    assert steps(root) == {1, 3, 4, 5, 6}
    assert [e["step"] for e in d.find("deleted")] == [2]


def test_an_invalid_run_file_written_mid_run_pauses_deletions_at_once(
    keep_one: tuple[Path, Daemon],
) -> None:
    root, d = keep_one
    (root / "ckptkeeper.toml").write_text("keep_top_k = 1\nkeep_latst_n = 2\n")
    [problem] = d.wait_for("config_problem", timeout=10)
    assert problem["reason"].startswith(f"{root / 'ckptkeeper.toml'}: keep_latst_n: unknown key")
    assert "deletions in this root paused" in problem["reason"]
    for step, reward in ((4, 0.1), (5, 0.2)):
        write_checkpoint(root, step, {"reward": reward})
        _quiet_after(d, "finalized", root, step=step)
    assert steps(root) == {1, 3, 4, 5}
    assert [e["step"] for e in d.find("deleted")] == [2]


def test_a_new_steps_config_yaml_names_the_metric_in_the_next_pass(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    d = Daemon([str(root), "--keep-top-k", "1", "--sweep-interval", "1h", "--log-level", "debug"])
    daemons.append(d)
    d.wait_ready()
    for step, reward in ((1, 0.9), (2, 0.1)):
        tmp = write_checkpoint(root, step, {"reward": reward}, complete=False)
        (tmp / "config.yaml").write_text(CONFIG)
        write_checkpoint(root, step, {"reward": reward})  # now the marker
        _quiet_after(d, "finalized", root, step=step)
    assert steps(root) == {1, 2}  # by reward (higher is better): 1 is the best, 2 the latest
    assert d.stop() == 0


# -- issue 11: the completion marker may not be a protocol file --------------------------------


def test_marker_named_like_a_protocol_file_is_refused_everywhere(tmp_path: Path) -> None:
    root = tmp_path / "run"
    for step in (1, 2, 3):
        write_checkpoint(root, step, final=True)
    started = write_checkpoint(root, 4, complete=False)  # training_info.json is written first
    code, _, stderr = sweep(str(root), "--complete-marker", "training_info.json")
    assert code == 2
    assert "command line: complete_marker: 'training_info.json' is a file the checkpoint" in stderr
    cfg = tmp_path / "keeper.toml"
    cfg.write_text(f'[[root]]\npath = "{root}"\ncomplete_marker = "KEEP"\n')
    for command in ("sweep", "status"):
        proc = subprocess.run([CKPTKEEPER, command, "--config", str(cfg)], capture_output=True)
        assert proc.returncode == 2
        assert f"{cfg}: root[0].complete_marker: 'KEEP' is a file" in proc.stderr.decode()

    (root / "ckptkeeper.toml").write_text('complete_marker = "training_info.json"\n')
    code, events, stderr = sweep(str(root), "--keep-latest-n", "1")
    assert code == 0, stderr
    assert started.is_dir() and step_names(root) == {"step_1", "step_2", "step_3", "tmp_step_4"}
    [problem] = [e["reason"] for e in events if e["event"] == "config_problem"]
    assert problem.startswith(f"{root / 'ckptkeeper.toml'}: complete_marker: ")
    assert problem.endswith("deletions in this root paused until it is fixed")


# -- issue 12: one root through a symlink and through its real path ----------------------------


def test_a_root_given_through_a_symlink_and_its_real_path_is_managed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    for step in (1, 2, 3):
        write_checkpoint(real, step, final=True)
    link = tmp_path / "link"
    link.symlink_to(real)
    code, events, stderr = sweep(str(link), str(real), "--keep-latest-n", "1")
    assert code == 0, stderr
    assert step_names(real) == {"step_3"}
    assert {e["root"] for e in events if e["event"] == "deleted"} == {str(real)}
    assert not [e for e in events if e["event"] == "root_problem"]


# -- issue 14: a root the keeper cannot search reports the root's problem only ------------------


def _as_nobody_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "not running as root: cannot switch to another uid"
    if SETPRIV is None:
        return "setpriv not installed"
    probe = [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", CKPTKEEPER]
    if subprocess.run([*probe, "--version"], capture_output=True).returncode != 0:
        return "cannot run ckptkeeper as another uid here"
    return None


@pytest.mark.parametrize("denied", ["mode 0700, owned by root", "mode 000, owned by the keeper"])
def test_a_root_the_keeper_cannot_search_reports_only_its_own_problem(denied: str) -> None:
    if (why := _as_nobody_unavailable()) is not None:
        pytest.skip(why)
    base = Path(tempfile.mkdtemp(prefix="ckptkeeper-denied-"))
    try:
        base.chmod(0o755)  # the keeper (nobody) reaches the root, not into it
        root = base / "run"
        for step in (1, 2, 3):
            write_checkpoint(root, step, {"reward": step}, final=True)
        if denied.endswith("the keeper"):
            os.chown(root, NOBODY, NOBODY)
            root.chmod(0o000)
        else:
            root.chmod(0o700)
        prefix = (SETPRIV or "", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
        code, events, stderr = sweep(str(root), "--keep-top-k", "1", prefix=prefix)
        assert code == 1, stderr
        [problem] = [e for e in events if e["event"] == "root_problem"]
        assert "EACCES" in problem["reason"]
        assert [e for e in events if e["level"] in ("warning", "error")] == [problem]
        assert steps(root) == {1, 2, 3}
    finally:
        root.chmod(0o755)
        shutil.rmtree(base)
