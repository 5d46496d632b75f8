"""A save held back by something that stays (a ``step_N`` symlink in the way of its finalize) is
reported once by the daemon, with the real reason, not as a skip on every pass."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from ckptkeeper import InfoCache, Policy, write_marker
from ckptkeeperd.logs import ProblemLog
from ckptkeeperd.reconcile import reconcile

POLICY = Policy(keep_top_k=1, metric_name="val", higher_is_better=True)


def make_save(path: Path, val: float, *, marker: bool) -> Path:
    path.mkdir(parents=True)
    (path / "weights.bin").write_bytes(b"w" * 64)
    (path / "training_info.json").write_text(json.dumps({"val": val}))
    if marker:
        write_marker(path, ".complete")
    return path


def about(logs: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("path") == str(path)]


def test_a_complete_save_beside_a_step_symlink_is_reported_once_with_the_reason(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    make_save(root / "step_4", 0.4, marker=False)
    save = make_save(root / "tmp_step_5", 0.5, marker=True)
    outside = make_save(tmp_path / "elsewhere", 0.0, marker=False)
    (root / "step_5").symlink_to(outside)
    problems, cache = ProblemLog(), InfoCache()
    with capture_logs() as logs:
        for _ in range(3):
            report = reconcile(root, POLICY, cache=cache, problems=problems)
            assert report.status == "ok" and report.outcomes == []
    (event,) = about(logs, save)
    assert event == {
        "event": "skipped",
        "log_level": "warning",
        "root": str(root),
        "action": "finalize",
        "step": 5,
        "path": str(save),
        "reason": "step_5 is in the way (symlink: not followed): not finalized over it",
    }
    assert [e["event"] for e in about(logs, root / "step_5")] == ["ignored"]  # once too
    assert not [e for e in logs if "appeared since the plan" in str(e.get("reason"))]
    assert (root / "step_5").is_symlink() and (save / ".complete").exists()

    # Once the symlink is gone, the save is finalized; a new obstacle is reported again.
    (root / "step_5").unlink()
    with capture_logs() as logs:
        reconcile(root, POLICY, cache=cache, problems=problems)
    assert [e["event"] for e in about(logs, save)] == ["finalized"]
    assert (root / "step_5").is_dir() and not (root / "step_5").is_symlink()


def test_without_a_problem_log_every_sweep_reports_it(tmp_path: Path) -> None:
    root = tmp_path / "run"
    save = make_save(root / "tmp_step_5", 0.5, marker=True)
    (root / "step_5").write_text("not a directory\n")
    for _ in range(2):
        with capture_logs() as logs:
            reconcile(root, POLICY)
        assert [(e["event"], e["action"]) for e in about(logs, save)] == [("skipped", "finalize")]
        assert "step_5 is in the way (not a directory)" in about(logs, save)[0]["reason"]
