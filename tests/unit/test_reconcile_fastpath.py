"""reconcile's fast path: a pass with nothing to do takes no lock; a pass that must act scans and
plans again under the lock and acts only on what that second plan says; an unchanged root is not
planned again. Log events are those of the passes before the fast path."""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from ckptkeeper import InfoCache, Policy, RootLock, RootScan
from ckptkeeper import scan as scan_mod
from ckptkeeper import storage as storage_mod
from ckptkeeper.effects import Fs
from ckptkeeperd.reconcile import preview, reconcile

METRIC = "val"


def policy(**overrides: Any) -> Policy:
    values: dict[str, Any] = {"keep_top_k": 2, "metric_name": METRIC, "higher_is_better": True}
    return Policy(**{**values, **overrides})


def make_step(root: Path, step: int, val: float, *files: str, name: str | None = None) -> Path:
    d = root / (name or f"step_{step}")
    d.mkdir(parents=True)
    (d / "training_info.json").write_text(json.dumps({"step": step, METRIC: val}))
    for f in files:
        (d / f).touch()
    return d


def make_root(tmp_path: Path, *vals: float) -> Path:
    root = tmp_path / "run"
    root.mkdir()
    for i, val in enumerate(vals, start=1):
        make_step(root, i, val)
    return root


def steps_on_disk(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))


def lock_held(root: Path) -> bool:
    """True when some descriptor holds flock on the root lock (flock conflicts between
    descriptors of one process too)."""
    try:
        fd = os.open(root / ".ckptkeeper" / "lock", os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class CountingFs(Fs):
    """Records every mutating call (the lock's mkdir/open/flock are among them)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def open(self, path: Any, flags: int, mode: int = 0o644, dir_fd: int | None = None) -> int:
        self.calls.append(f"open {path}")
        return super().open(path, flags, mode, dir_fd=dir_fd)

    def mkdir(self, path: Any, mode: int = 0o755, dir_fd: int | None = None) -> None:
        self.calls.append(f"mkdir {path}")
        super().mkdir(path, mode, dir_fd=dir_fd)

    def flock(self, fd: int, operation: int) -> None:
        self.calls.append("flock")
        super().flock(fd, operation)

    def rename(self, src: Path, dst: Path) -> None:
        self.calls.append(f"rename {src}")
        super().rename(src, dst)


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, bool]]:
    """Every scan reconcile makes: (memo, root lock held while scanning)."""
    seen: list[tuple[bool, bool]] = []
    real = storage_mod.scan_root

    def spy(root: Path, **kwargs: Any) -> RootScan:
        seen.append((kwargs.get("memo", False), lock_held(root)))
        return real(root, **kwargs)

    # the unlocked look and the locked pass both scan through PosixStorage.scan
    monkeypatch.setattr(storage_mod, "scan_root", spy)
    return seen


@pytest.fixture
def later() -> Callable[[], InfoCache]:
    """The scans judge the memo as if the steps had been written a minute ago."""
    ahead = int((scan_mod.MEMO_TRUST_S + 60) * 1e9)
    return lambda: InfoCache(clock_ns=lambda: time.time_ns() + ahead)


# -- the lock ----------------------------------------------------------------------------------


def test_a_pass_with_nothing_to_do_does_not_take_the_root_lock(
    tmp_path: Path, scans: list[tuple[bool, bool]]
) -> None:
    root = make_root(tmp_path, 0.1, 0.2)
    fs = CountingFs()
    with capture_logs() as logs:
        report = reconcile(root, policy(), cache=InfoCache(), fs=fs)
    assert report.status == "ok" and report.errors == 0
    assert report.plan is not None and not report.plan.mutates
    assert report.scan is not None and [c.step for c in report.scan.steps] == [1, 2]
    assert (report.outcomes, report.removed) == ([], [])
    assert fs.calls == []  # no mkdir, open or flock: the lock was never taken
    assert not (root / ".ckptkeeper").exists()
    assert scans == [(True, False)]  # one scan, the memoized one
    assert logs == []


def test_a_pass_with_nothing_to_do_is_not_busy_while_another_actor_holds_the_lock(
    tmp_path: Path,
) -> None:
    root = make_root(tmp_path, 0.1, 0.2)
    with RootLock(root), capture_logs() as logs:
        report = reconcile(root, policy())
    assert report.status == "ok"
    assert logs == []


def test_a_pass_that_must_act_re_plans_under_the_lock(
    tmp_path: Path, scans: list[tuple[bool, bool]]
) -> None:
    root = make_root(tmp_path, 0.1, 0.9, 0.5, 0.3)  # keep top-2 (2, 3) + latest (4)
    fs = CountingFs()
    with capture_logs() as logs:
        report = reconcile(root, policy(), cache=InfoCache(), fs=fs)
    assert scans == [(True, False), (False, True)]  # decide unlocked, act on a full scan, locked
    assert report.status == "ok" and report.errors == 0
    assert "flock" in fs.calls
    assert steps_on_disk(root) == ["step_2", "step_3", "step_4"]
    assert [(e["event"], e["step"]) for e in logs] == [("deleted", 1)]
    assert not lock_held(root)


def test_nothing_is_acted_on_from_the_unlocked_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between the unlocked plan (delete step_1) and the lock, step_1 becomes the best: the
    # executor checks pins and identities but not metrics, so only the plan under the lock
    # can get this right.
    root = make_root(tmp_path, 0.1, 0.9, 0.5, 0.3)
    real = storage_mod.scan_root

    def rewrite_after_first(root_: Path, **kwargs: Any) -> RootScan:
        scan = real(root_, **kwargs)
        if kwargs.get("memo"):
            info = root / "step_1" / "training_info.json"
            info.write_text(json.dumps({"step": 1, METRIC: 0.99}))
        return scan

    monkeypatch.setattr(storage_mod, "scan_root", rewrite_after_first)
    with capture_logs() as logs:
        report = reconcile(root, policy(), cache=InfoCache())
    assert steps_on_disk(root) == ["step_1", "step_2", "step_4"]  # 0.99, 0.9 and the latest
    assert [(e["event"], e["step"]) for e in logs] == [("deleted", 3)]
    assert report.plan is not None and report.plan.deleted_steps == {3}


def test_a_plan_that_no_longer_acts_under_the_lock_does_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_root(tmp_path, 0.1, 0.9, 0.5, 0.3)
    real = storage_mod.scan_root

    def pin_after_first(root_: Path, **kwargs: Any) -> RootScan:
        scan = real(root_, **kwargs)
        if kwargs.get("memo"):
            (root / "step_1" / "KEEP").touch()
        return scan

    monkeypatch.setattr(storage_mod, "scan_root", pin_after_first)
    with capture_logs() as logs:
        report = reconcile(root, policy(), cache=InfoCache())
    assert report.status == "ok" and report.outcomes == []
    assert report.plan is not None and not report.plan.mutates
    assert steps_on_disk(root) == ["step_1", "step_2", "step_3", "step_4"]
    assert logs == []


def test_a_pass_that_must_act_while_another_actor_holds_the_lock_is_skipped(
    tmp_path: Path,
) -> None:
    root = make_root(tmp_path, 0.1, 0.9, 0.5, 0.3)
    with RootLock(root), capture_logs() as logs:
        report = reconcile(root, policy(), cache=InfoCache())
    assert report.status == "busy"
    assert report.scan is None and report.plan is None  # as before: nothing was looked at
    assert logs == [
        {
            "event": "skipped",
            "reason": "root locked by another actor",
            "root": str(root),
            "log_level": "info",
        }
    ]
    assert steps_on_disk(root) == ["step_1", "step_2", "step_3", "step_4"]


def test_trash_to_purge_takes_the_lock_and_is_purged(
    tmp_path: Path, scans: list[tuple[bool, bool]]
) -> None:
    root = make_root(tmp_path, 0.1)
    leftover = make_step(root / ".ckptkeeper" / "trash", 9, 0.0, name="1700000000000000000-step_9")
    with capture_logs() as logs:
        report = reconcile(root, policy(), cache=InfoCache())
    assert scans == [(True, False), (False, True)]
    assert not leftover.exists()
    assert [(e["event"], e["path"]) for e in logs] == [("purged", str(leftover))]
    assert report.errors == 0


def test_an_acting_pass_logs_the_same_events_with_the_same_keys(tmp_path: Path) -> None:
    root = make_root(tmp_path, 0.1, 0.9, 0.5, 0.3)
    make_step(root, 5, 0.05, ".complete", name="tmp_step_5")
    with capture_logs() as logs:
        reconcile(root, policy(), cache=InfoCache())
    # step_5 is finalized and is the latest; top-2: step_2, step_3.
    assert sorted((e["event"], e["step"]) for e in logs) == [
        ("deleted", 1),
        ("deleted", 4),
        ("finalized", 5),
    ]
    keys = {"event", "root", "step", "path", "reason", "bytes", "duration_ms", "action"}
    keys.add("log_level")
    for e in logs:
        assert e.keys() == keys | ({"trash_path"} if e["event"] == "deleted" else set())
    assert steps_on_disk(root) == ["step_2", "step_3", "step_5"]


# -- the memos -----------------------------------------------------------------------------------


def test_an_unchanged_root_is_planned_from_the_memo(
    tmp_path: Path, later: Callable[[], InfoCache]
) -> None:
    # No plan is kept between passes (bench P9K: a million checkpoints' decisions would be
    # most of a keeper's memory); the plan of an unchanged root is made again from the memo.
    root = make_root(tmp_path, 0.1, 0.2, 0.3)
    cache = later()
    first = reconcile(root, policy(keep_top_k=5), cache=cache, clock=lambda: 1_000.0)
    second = reconcile(root, policy(keep_top_k=5), cache=cache, clock=lambda: 2_000.0)
    assert first.plan is not None and second.plan is not None
    assert second.plan.decisions == first.plan.decisions
    assert (second.plan.now, second.plan.policy) == (2_000.0, policy(keep_top_k=5))
    assert cache.memo_hits == 3  # and the second scan took every step from the memo
    assert cache.parses == 3  # no JSON read again

    third = reconcile(root, policy(keep_top_k=6), cache=cache)  # another policy
    assert third.plan is not None and third.plan.decisions != first.plan.decisions
    assert all("top-6" in d.reasons[-1] for d in third.plan.decisions)


def test_a_keep_file_added_to_an_unchanged_step_reaches_the_next_plan(
    tmp_path: Path, later: Callable[[], InfoCache]
) -> None:
    root = make_root(tmp_path, 0.1, 0.2, 0.3)
    cache = later()
    for _ in range(2):
        reconcile(root, policy(keep_top_k=5), cache=cache)
    (root / "step_1" / "KEEP").touch()
    report = reconcile(root, policy(keep_top_k=1), cache=cache)  # only step_1's pin saves it
    assert steps_on_disk(root) == ["step_1", "step_3"]
    assert report.plan is not None and report.plan.deleted_steps == {2}


def test_the_plan_is_made_afresh_while_a_save_is_in_flight(
    tmp_path: Path, later: Callable[[], InfoCache]
) -> None:
    root = make_root(tmp_path, 0.1, 0.2)
    (root / "tmp_step_3").mkdir()
    cache = later()
    first = reconcile(root, policy(), cache=cache, clock=lambda: 1_000.0)
    second = reconcile(root, policy(), cache=cache, clock=lambda: 2_000.0)
    assert first.plan is not None and second.plan is not None
    assert second.plan.decisions is not first.plan.decisions  # "now" enters a tmp's decision
    assert second.plan.now == 2_000.0


def test_status_and_dry_run_never_use_the_step_memo(
    tmp_path: Path, later: Callable[[], InfoCache]
) -> None:
    root = make_root(tmp_path, 0.1, 0.2)
    cache = later()
    reconcile(root, policy(), cache=cache)
    hits = cache.memo_hits
    report = preview(root, policy(), cache=cache)
    assert cache.memo_hits == hits
    assert report.scan == preview(root, policy()).scan
