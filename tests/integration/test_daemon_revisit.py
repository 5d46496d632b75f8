"""A real ``ckptkeeper run`` decides what time alone makes decidable (`Plan.revisit_at`): an
hf-trainer checkpoint once it settles, an abandoned nemo-rl save once stale, with no event after
the last write and the periodic pass an hour away."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.helpers import Daemon, step_names, wait_until, write_checkpoint

SETTLE = 4.0  # longer than the relisting pass that follows a change (MEMO_TRUST_S)
SLACK = 6.0  # a pass, its scan and the deletion, on a loaded machine
HF_FLAGS = ["--layout", "hf-trainer", "--keep-top-k", "1", "--settle-after", f"{SETTLE}s"]
HF_FLAGS += ["--sweep-interval", "1h", "--log-level", "debug"]


def _last_change(path: Path) -> float:
    return max(max(st.st_mtime, st.st_ctime) for st in map(os.lstat, [path, *path.rglob("*")]))


def _logged_at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def _hf_checkpoint(staging: Path, root: Path, step: int, eval_loss: float) -> Path:
    """``checkpoint-N`` with its ``trainer_state.json``, moved in whole: the root's watch sees
    it once, complete (a pass then sees it settling, never half-written)."""
    built = staging / f"checkpoint-{step}"
    built.mkdir(parents=True)
    (built / "model.safetensors").write_bytes(b"w" * 1024)
    history = [{"step": step, "eval_loss": eval_loss}]
    (built / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    return built.rename(root / built.name)


def test_hf_trainer_checkpoints_are_decided_once_settled_without_an_event(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    root, staging = tmp_path / "run", tmp_path / "staging"
    root.mkdir()
    d = Daemon([str(root), *HF_FLAGS])
    daemons.append(d)
    d.wait_ready()
    written = [_hf_checkpoint(staging, root, s, loss) for s, loss in ((1, 0.1), (2, 0.5), (3, 0.3))]
    last = max(map(_last_change, written))  # nothing touches the root after this
    # Top-1 by recency, the newest (HF resumes from it): the others go once they count.
    wait_until(
        lambda: {p.name for p in root.iterdir()} == {"checkpoint-3", ".ckptkeeper"},
        timeout=SETTLE + SLACK,
        what="checkpoint-1 and -2 deleted once settled",
    )
    decided = time.time()
    assert decided - last <= SETTLE + SLACK
    assert decided - last >= SETTLE - 0.5  # not before they settled
    deleted = d.wait_for("deleted", count=2)
    assert sorted(e["path"] for e in deleted) == [str(root / f"checkpoint-{n}") for n in (1, 2)]
    revisits = d.find("revisit_scheduled", root=str(root))
    assert revisits and {e["level"] for e in revisits} == {"debug"}
    assert d.stop() == 0


def test_abandoned_nemo_rl_save_is_collected_once_stale_without_an_event(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    stale_after = 4.0  # longer than the relisting pass (MEMO_TRUST_S) after a change
    root = tmp_path / "run"
    root.mkdir()
    args = ["--keep-latest-n", "2", "--stale-after", f"{stale_after}s", "--sweep-interval", "1h"]
    d = Daemon([str(root), *args, "--log-level", "debug"])
    daemons.append(d)
    d.wait_ready()
    write_checkpoint(root, 1)
    d.wait_for("finalized", step=1)
    abandoned = write_checkpoint(root, 2, complete=False)  # the trainer died: no marker, ever
    last = _last_change(abandoned)
    event = d.wait_for("garbage_collected", step=2, timeout=stale_after + SLACK)[0]
    assert time.time() - last <= stale_after + SLACK
    assert "stale" in event["reason"]
    assert step_names(root) == {"step_1"}
    assert d.stop() == 0


def test_hf_trainer_checkpoint_written_in_place_is_decided_once_settled(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """As HF writes: ``checkpoint-N/`` first (the pass its creation triggers sees it without
    trainer_state.json, and watches it), then its files, trainer_state.json last. Its arrival is
    news (the layout's commit file, `ckptkeeper.layouts.commit_files`); from then on no event,
    and the checkpoint counts once settled."""
    root, staging = tmp_path / "run", tmp_path / "staging"
    root.mkdir()
    d = Daemon([str(root), *HF_FLAGS])
    daemons.append(d)
    d.wait_ready()
    for step, loss in ((1, 0.1), (2, 0.5)):
        _hf_checkpoint(staging, root, step, loss)
    # The pass at their settle time, after which nothing is pending.
    at = d.wait_for("revisit_scheduled", root=str(root))[-1]["at"]
    wait_until(
        lambda: any(_logged_at(e) >= at for e in d.find("pass_done", root=str(root))),
        timeout=SETTLE + SLACK,
        what="the pass once the first two checkpoints settled",
    )
    path = root / "checkpoint-3"
    passes = len(d.find("pass_done", root=str(root)))
    path.mkdir()
    d.wait_for("pass_done", root=str(root), count=passes + 1, timeout=SLACK)
    (path / "model.safetensors").write_bytes(b"w" * 1024)
    (path / "trainer_state.json").write_text(json.dumps({"log_history": []}))
    last = _last_change(path)
    # checkpoint-2 stays top-1 by recency until checkpoint-3 counts.
    wait_until(
        lambda: not (root / "checkpoint-2").exists(),
        timeout=SETTLE + SLACK,
        what="checkpoint-2 deleted once checkpoint-3 settled",
    )
    assert time.time() - last >= SETTLE - 0.5  # not before it settled
    assert time.time() - last <= SETTLE + SLACK
    assert {p.name for p in root.iterdir()} <= {"checkpoint-3", ".ckptkeeper"}
    assert d.stop() == 0
