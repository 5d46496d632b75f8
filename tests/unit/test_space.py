"""Measuring free space and checkpoint sizes (`ckptkeeper.space`) and the pass that uses them, on
real files and real small filesystems (tmpfs mounted by the test)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from tests.smallfs import small_tmpfs

from ckptkeeper import InfoCache, Policy, scan_root
from ckptkeeper.space import disk_facts, filesystem_space, tree_bytes
from ckptkeeperd.logs import ProblemLog
from ckptkeeperd.reconcile import preview, reconcile

MiB = 1024 * 1024


def fill(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(b"\1" * size)


def make_step(root: Path, step: int, size: int, metric: float, *, pinned: bool = False) -> Path:
    d = root / f"step_{step}"
    fill(d / "policy" / "weights.bin", size)
    (d / "training_info.json").write_text(f'{{"step": {step}, "val_loss": {metric}}}')
    if pinned:
        (d / "KEEP").touch()
    return d


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def test_tree_bytes_is_what_du_says(tmp_path: Path) -> None:
    d = tmp_path / "step_1"
    fill(d / "a" / "b" / "x.bin", 3 * MiB + 17)
    fill(d / "y.bin", 5000)
    os.link(d / "y.bin", d / "a" / "y-again.bin")  # one inode, counted once
    fill(tmp_path / "outside" / "big.bin", 8 * MiB)
    os.symlink(tmp_path / "outside", d / "link")  # never followed
    assert tree_bytes(d) == du_bytes(d)
    assert tree_bytes(d) < 4 * MiB
    assert tree_bytes(tmp_path / "gone") is None


def test_sizes_only_with_min_free_newest_only_without_pressure(tmp_path: Path) -> None:
    root = tmp_path / "run"
    for step in (1, 2, 3):
        make_step(root, step, MiB, 0.5)
    scan = scan_root(root)
    total = filesystem_space(root)[1]
    plain = disk_facts(scan, Policy(), 0.0)
    assert plain is not None and plain.sizes == {}
    calm = disk_facts(scan, Policy(min_free="1"), 0.0)
    assert calm is not None and calm.total_bytes == total
    newest = next(c for c in scan.steps if c.step == 3)
    assert calm.sizes == {newest.identity: du_bytes(root / "step_3")}
    tight = disk_facts(scan, Policy(min_free="99.9%"), 0.0)
    assert tight is not None
    assert tight.sizes == {c.identity: du_bytes(c.path) for c in scan.steps}


def test_a_finalized_checkpoint_is_walked_once(tmp_path: Path) -> None:
    root = tmp_path / "run"
    step = make_step(root, 1, MiB, 0.5)
    cache = InfoCache()
    policy = Policy(min_free="1")
    first = disk_facts(scan_root(root), policy, 0.0, cache)
    assert first is not None
    [size] = first.sizes.values()
    fill(step / "policy" / "weights.bin", 2 * MiB)  # deep inside: the top directory is unchanged
    again = disk_facts(scan_root(root), policy, 0.0, cache)
    assert again is not None and list(again.sizes.values()) == [size]  # from the cache
    fill(step / "extra.bin", MiB)  # a new entry changes the directory's ctime: measured again
    later = disk_facts(scan_root(root), policy, 0.0, cache)
    assert later is not None and list(later.sizes.values()) == [du_bytes(step)]


def test_a_pass_under_pressure_deletes_the_worst_and_says_why(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "fs", "8m") as fs:
        root = fs / "run"
        for step, loss in ((1, 0.9), (2, 0.1), (3, 0.7), (4, 0.8), (5, 0.5)):
            make_step(root, step, MiB, loss)
        policy = Policy(metric_name="val_loss", min_free="50%")
        before = preview(root, policy)
        assert before.plan is not None and before.plan.pressure is not None
        with capture_logs() as logs:
            report = reconcile(root, policy)
        deleted = [e for e in logs if e["event"] == "deleted"]
        # ~3 MiB free of 8 MiB: 1 MiB more is needed; the worst (1: 0.9) goes, then 4 (0.8).
        assert [e["step"] for e in deleted] == [1, 4]
        assert all(e["reason"].startswith("disk pressure: ") for e in deleted)
        assert {p.name for p in root.iterdir() if p.name.startswith("step_")} == {
            "step_2",
            "step_3",
            "step_5",
        }
        free, total = filesystem_space(root)
        assert free >= total // 2
        assert report.plan is not None and report.plan.pressure is not None


def test_next_save_may_not_fit_is_logged_once_per_step(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "fs", "4m") as fs:
        root = fs / "run"
        make_step(root, 1, int(2.5 * MiB), 0.5, pinned=True)
        policy = Policy(metric_name="val_loss", min_free="1%")
        cache, problems = InfoCache(), ProblemLog()
        with capture_logs() as logs:
            for _ in range(3):
                assert reconcile(root, policy, cache=cache, problems=problems).plan is not None
        warned = [e for e in logs if e["event"] == "next_save_may_not_fit"]
        assert [(e["step"], e["log_level"]) for e in warned] == [(1, "warning")]
        assert warned[0]["bytes"] > warned[0]["free_bytes"]
        make_step(root, 2, MiB, 0.4, pinned=True)  # about 0.5 MiB left: 1 MiB would not fit
        with capture_logs() as logs:
            for _ in range(2):
                reconcile(root, policy, cache=cache, problems=problems)
        assert [e["step"] for e in logs if e["event"] == "next_save_may_not_fit"] == [2]


@pytest.mark.parametrize("min_free", [None, "1%"])
def test_status_json_reports_the_free_space(tmp_path: Path, min_free: str | None) -> None:
    from ckptkeeperd.render import report_to_dict

    root = tmp_path / "run"
    make_step(root, 1, 1000, 0.5)
    report = preview(root, Policy(min_free=min_free))
    doc = report_to_dict(report)
    assert doc["free"]["total_bytes"] == filesystem_space(root)[1]
    assert doc["disk_pressure"] is None
    assert doc["next_save_may_not_fit"] is False
