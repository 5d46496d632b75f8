"""`Plan.revisit_at`: the earliest time a decision changes with no new event (a save settles or
turns stale, trash outlives its grace), from hand-built records; `Plan.next_visit` bounds it;
and a real hf-trainer scan reports its settle time."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ckptkeeper.decisions import MIN_REVISIT_DELAY
from ckptkeeper.info import InfoCache
from ckptkeeper.passes import locked_pass
from ckptkeeper.plan import Action, Decision, Plan, plan
from ckptkeeper.policy import Policy
from ckptkeeper.records import Checkpoint, InFlight, RootScan, TrashEntry

ROOT = Path("/ckpt/run")
NOW = 1_700_000_000.0
HOUR = 3600.0
SETTLING = "settling: last write 10s ago (settle_after 2.0m)"


def save(step: int, **fields: object) -> InFlight:
    """An unmarked ``tmp_step_N`` (nemo-rl) unless ``fields`` say otherwise."""
    return InFlight(step, ROOT / f"tmp_step_{step}", False, identity=(2, step), **fields)  # type: ignore[arg-type]


def settling(step: int, settles_at: float) -> InFlight:
    """An hf-trainer ``checkpoint-N`` written in place, not settled yet (never collected)."""
    path = ROOT / f"checkpoint-{step}"
    return InFlight(step, path, False, waiting=SETTLING, collectable=False, settles_at=settles_at)


@dataclass
class Case:
    in_flight: tuple[InFlight, ...] = ()
    trash: tuple[TrashEntry, ...] = ()
    pointers: dict[int, str] = field(default_factory=dict)
    policy: Policy = field(default_factory=lambda: Policy(stale_after=HOUR))
    revisit_at: float | None = None
    by_scan: bool = False  # the scanner decides it (a layout's settle time): a later scan does


CASES = {
    "nothing pending": Case(),
    "nemo-rl save being written: stale an hour after its last write": Case(
        (save(5, writer_locked=False, newest_mtime=NOW - 600),), revisit_at=NOW - 600 + HOUR
    ),
    "nemo-rl save already stale: collected now, nothing later": Case(
        (save(5, writer_locked=False, newest_mtime=NOW - 2 * HOUR),)
    ),
    "writer lock held: only its release changes it": Case((save(5, writer_locked=True),)),
    "complete save: finalized now": Case((InFlight(5, ROOT / "tmp_step_5", True),)),
    "hf-trainer checkpoint settling": Case(
        (settling(20, NOW + 30),), revisit_at=NOW + 30, by_scan=True
    ),
    "hf-trainer newest checkpoint (a pointer) settling": Case(
        (settling(20, NOW + 30),),
        pointers={20: "newest checkpoint"},
        revisit_at=NOW + 30,
        by_scan=True,
    ),
    "torchtitan save without its commit file: stale later": Case(
        (save(3, waiting="no .metadata", writer_locked=False, newest_mtime=NOW - 10),),
        policy=Policy(stale_after=60.0),
        revisit_at=NOW + 50,
    ),
    "the earliest of two": Case(
        (settling(20, NOW + 90), save(5, writer_locked=False, newest_mtime=NOW - HOUR + 40)),
        revisit_at=NOW + 40,
    ),
    "unreadable writer lock: reported as blocked once stale": Case(
        (save(5, writer_locked=True, writer_lock_unreadable="EACCES", newest_mtime=NOW - 60),),
        revisit_at=NOW - 60 + HOUR,
    ),
    "trash within its grace": Case(
        trash=(TrashEntry(ROOT / ".ckptkeeper/trash/x", NOW - 10),),
        policy=Policy(trash_grace=60.0),
        revisit_at=NOW + 50,
    ),
    "trash without grace: purged now": Case(trash=(TrashEntry(ROOT / ".ckptkeeper/t/x", NOW),)),
    "mtime in the future (writer clock ahead): a day and an hour away": Case(
        (save(5, writer_locked=False, newest_mtime=NOW + 86400),), revisit_at=NOW + 86400 + HOUR
    ),
}


def scan_of(case: Case) -> RootScan:
    steps = (Checkpoint(1, ROOT / "step_1", {"step": 1}, None, False, (1, 1)),)
    return RootScan(ROOT, steps, case.in_flight, trash=case.trash, pointers=case.pointers)


@pytest.mark.parametrize("name", CASES)
def test_revisit_at_is_when_a_decision_changes_by_itself(name: str) -> None:
    case = CASES[name]
    scan = scan_of(case)
    before = plan(scan, case.policy, NOW)
    assert before.revisit_at == case.revisit_at
    if case.by_scan:
        return  # the scan at revisit_at sees it settled: the last test here
    if case.revisit_at is None:
        # Nothing changes with time alone: an hour later (within a day) the plan is the same.
        later = plan(scan, case.policy, NOW + HOUR)
        assert [d.action for d in later] == [d.action for d in before]
        return
    # The same thresholds as the decisions: just before, the same; at revisit_at, changed.
    just_before = plan(scan, case.policy, case.revisit_at - 0.01)
    at = plan(scan, case.policy, case.revisit_at)
    assert [(d.action, d.blocked) for d in just_before] == [(d.action, d.blocked) for d in before]
    assert [(d.action, d.blocked) for d in at] != [(d.action, d.blocked) for d in before]


@pytest.mark.parametrize(
    ("revisit_at", "before", "expected"),
    [
        (None, NOW + HOUR, None),  # nothing to revisit
        (NOW + 30, NOW + HOUR, NOW + 30),  # before the periodic pass
        (NOW + 2 * HOUR, NOW + HOUR, None),  # the periodic pass comes first
        (NOW + 0.001, NOW + HOUR, NOW + MIN_REVISIT_DELAY),  # never sooner than the minimum
        (NOW - 5.0, NOW + HOUR, NOW + MIN_REVISIT_DELAY),  # a time already past: no loop
    ],
)
def test_next_visit_is_bounded(
    revisit_at: float | None, before: float, expected: float | None
) -> None:
    waiting = Decision(5, ROOT / "tmp_step_5", Action.WAIT, ("in flight",), until=revisit_at)
    kept = Decision(1, ROOT / "step_1", Action.KEEP, ("latest",))
    p = Plan(ROOT, Policy(), NOW, (kept, waiting))
    assert p.revisit_at == revisit_at
    assert p.next_visit(before) == expected


def test_a_future_trash_time_is_bounded_and_not_a_loop() -> None:
    """Trash stamped ahead of our clock is held for its grace from now, every pass: the revisit
    is never sooner than `MIN_REVISIT_DELAY`."""
    scan = RootScan(ROOT, trash=(TrashEntry(ROOT / "t", NOW + 86400),))
    p = plan(scan, Policy(trash_grace=0.5), NOW)
    assert p.by_action(Action.HOLD) and p.revisit_at == NOW + 0.5
    assert p.next_visit(NOW + HOUR) == NOW + MIN_REVISIT_DELAY


def test_a_real_hf_trainer_scan_revisits_when_the_checkpoint_settles(tmp_path: Path) -> None:
    """The layout's settle rule (`layouts.base.unsettled`) gives the time the plan reports."""
    path = tmp_path / "checkpoint-10"
    path.mkdir()
    (path / "trainer_state.json").write_text(json.dumps({"log_history": []}))
    st = [os.lstat(p) for p in (path, path / "trainer_state.json")]
    last = max(max(s.st_mtime, s.st_ctime) for s in st)
    now = time.time()
    result = locked_pass(
        tmp_path,
        Policy(layout="hf-trainer", keep_top_k=1, settle_after=60.0),
        clock=lambda: now,
        cache=InfoCache(clock_ns=lambda: int(now * 1e9)),
    )
    assert result.plan is not None
    assert [d.action for d in result.plan] == [Action.WAIT]
    at = result.plan.revisit_at
    assert at == pytest.approx(last + 60.0, abs=1e-6)
    assert at is not None
    then = at + 0.001  # the scan's clock is in whole nanoseconds: just after, not rounded below
    settled = locked_pass(
        tmp_path,
        Policy(layout="hf-trainer", keep_top_k=1, settle_after=60.0),
        clock=lambda: then,
        cache=InfoCache(clock_ns=lambda: int(then * 1e9)),
    )
    assert settled.plan is not None
    assert [d.action for d in settled.plan] == [Action.KEEP] and settled.plan.revisit_at is None
