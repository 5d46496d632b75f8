"""The pure planner, from hand-built records (no disk). DESIGN.md sections 2 and 4."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptkeeper.plan import Action, Decision, Plan, plan
from ckptkeeper.policy import Policy
from ckptkeeper.records import Anomaly, Checkpoint, InFlight, Leftover, RootScan, TrashEntry

ROOT = Path("/ckpt/run")
NOW = 1_700_000_000.0
HOUR = 3600.0


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NO_INFO = _Sentinel("NO_INFO")  # no usable training_info.json
NO_METRIC = _Sentinel("NO_METRIC")  # training_info.json without the metric key


def _info(step: int, metric: Any) -> tuple[Mapping[str, Any] | None, str | None]:
    if metric is NO_INFO:
        return None, "no training_info.json"
    if metric is NO_METRIC:
        return {"step": step}, None
    return {"step": step, "m": metric}, None


def ck(
    step: int, metric: Any = NO_METRIC, *, pinned: bool = False, name: str | None = None
) -> Checkpoint:
    info, err = _info(step, metric)
    return Checkpoint(step, ROOT / (name or f"step_{step}"), info, err, pinned, (1, step))


def tmp(
    step: int,
    *,
    complete: bool,
    metric: Any = NO_METRIC,
    locked: bool | None = None,
    newest: float | None = None,
    pinned: bool = False,
    unreadable: str | None = None,
) -> InFlight:
    info, err = _info(step, metric)
    path = ROOT / f"tmp_step_{step}"
    return InFlight(step, path, complete, info, err, pinned, (2, step), locked, newest, unreadable)


def old(step: int, metric: Any = NO_METRIC, *, pinned: bool = False) -> Leftover:
    info, err = _info(step, metric)
    return Leftover(step, ROOT / f"old_step_{step}", (3, step), info, err, pinned)


def root_scan(
    steps: Iterable[Checkpoint] = (),
    in_flight: Iterable[InFlight] = (),
    leftovers: Iterable[Leftover] = (),
    trash: Iterable[TrashEntry] = (),
    anomalies: Iterable[Anomaly] = (),
    ambiguous: Iterable[int] = (),
) -> RootScan:
    return RootScan(
        ROOT,
        tuple(steps),
        tuple(in_flight),
        tuple(leftovers),
        tuple(trash),
        tuple(anomalies),
        frozenset(ambiguous),
    )


def step_decisions(p: Plan) -> dict[int, Decision]:
    """The retention decision (KEEP/DELETE) of each step, keyed by step."""
    out: dict[int, Decision] = {}
    for d in p.by_action(Action.KEEP, Action.DELETE):
        assert d.step is not None
        assert d.step not in out, f"two retention decisions for step {d.step}"
        out[d.step] = d
    return out


def joined(d: Decision) -> str:
    return " | ".join(d.reasons)


# -- retention table ----------------------------------------------------------------------------

M5 = {1: 0.1, 2: 0.5, 3: 0.3, 4: 0.9, 5: 0.2}
TOPK = {"keep_top_k": 2, "metric_name": "m"}

Row = tuple[str, dict[int, Any], set[int], dict[str, Any], set[int], dict[int, list[str]]]
RETENTION_ROWS: list[Row] = [
    # (id, step -> metric, pinned steps, policy, kept steps, step -> words its reasons contain)
    (
        "top_k_higher_is_better",
        M5, set(), {**TOPK, "higher_is_better": True, "keep_latest": False},
        {2, 4},
        {4: ["top-2 by m=0.9"], 2: ["top-2 by m=0.5"], 1: ["outside top-2 by m=0.1"],
         5: ["outside top-2"]},
    ),
    (
        "top_k_lower_is_better",
        M5, set(), {**TOPK, "higher_is_better": False, "keep_latest": False},
        {1, 5},
        {1: ["top-2 by m=0.1"], 5: ["top-2 by m=0.2"], 4: ["outside top-2 by m=0.9"]},
    ),
    (
        "keep_latest_adds_the_latest_k_plus_1",
        M5, set(), {**TOPK, "higher_is_better": True},
        {2, 4, 5},
        {5: ["latest"], 4: ["top-2"], 3: ["outside top-2"]},
    ),
    (
        "latest_inside_top_k_keeps_only_k",
        {1: 0.1, 2: 0.5, 3: 0.9}, set(), {**TOPK, "higher_is_better": True},
        {2, 3},
        {3: ["top-2 by m=0.9", "latest"], 1: ["outside top-2"]},
    ),
    (
        "ties_higher_step_wins_higher_is_better",
        {1: 0.5, 2: 0.5, 3: 0.5, 4: 0.1}, set(),
        {"keep_top_k": 1, "metric_name": "m", "higher_is_better": True, "keep_latest": False},
        {3},
        {3: ["top-1 by m=0.5"], 2: ["outside top-1 by m=0.5"], 1: ["outside top-1"]},
    ),
    (
        "ties_higher_step_wins_lower_is_better",
        {1: 0.2, 2: 0.2, 3: 0.9}, set(),
        {"keep_top_k": 1, "metric_name": "m", "keep_latest": False},
        {2},
        {2: ["top-1 by m=0.2"], 1: ["outside top-1 by m=0.2"]},
    ),
    (
        "int_and_float_metrics_compare_numerically",
        {1: 1, 2: 0.5, 3: 2}, set(),
        {"keep_top_k": 1, "metric_name": "m", "higher_is_better": True, "keep_latest": False},
        {3},
        {3: ["top-1 by m=2"]},
    ),
    (
        "no_metric_name_ranks_by_recency",
        M5, set(), {"keep_top_k": 2, "keep_latest": False},
        {4, 5},
        {5: ["top-2 by recency"], 4: ["top-2 by recency"], 3: ["outside top-2 by recency"]},
    ),
    (
        "save_period_limits_top_k_candidates",
        {1: 0.1, 2: 0.2, 3: 0.99, 4: 0.4, 5: 0.5, 6: 0.3}, set(),
        {"keep_top_k": 1, "metric_name": "m", "higher_is_better": True, "save_period": 2,
         "keep_latest": False},
        {4},
        {4: ["top-1 by m=0.4"], 3: ["save_period 2"], 5: ["save_period 2"], 6: ["outside top-1"]},
    ),
    (
        "save_period_with_keep_latest_keeps_an_off_period_latest",
        {1: 0.1, 2: 0.2, 3: 0.0}, set(),
        {"keep_top_k": 1, "metric_name": "m", "higher_is_better": True, "save_period": 2},
        {2, 3},
        {3: ["latest"], 2: ["top-1"], 1: ["save_period 2"]},
    ),
    (
        "keep_latest_off_keeps_exactly_k",
        {1: 0.9, 2: 0.8, 3: 0.1}, set(),
        {"keep_top_k": 2, "metric_name": "m", "higher_is_better": True, "keep_latest": False},
        {1, 2},
        {3: ["outside top-2 by m=0.1"]},
    ),
    (
        "keep_latest_n_alone",
        M5, set(), {"keep_latest_n": 2, "keep_latest": False},
        {4, 5},
        {4: ["latest 2"], 5: ["latest 2"], 3: ["not among latest 2"], 1: ["not among latest 2"]},
    ),
    (
        "keep_latest_n_with_keep_latest",
        M5, set(), {"keep_latest_n": 2},
        {4, 5},
        {5: ["latest", "latest 2"], 2: ["not among latest 2"]},
    ),
    (
        "keep_latest_n_zero_with_keep_latest_keeps_only_the_latest",
        M5, set(), {"keep_latest_n": 0},
        {5},
        {5: ["latest"], 4: ["not among latest 0"]},
    ),
    (
        "union_of_top_k_and_latest_n",
        {1: 0.99, 2: 0.1, 3: 0.2, 4: 0.3, 5: 0.4}, set(),
        {"keep_top_k": 1, "metric_name": "m", "higher_is_better": True, "keep_latest_n": 2,
         "keep_latest": False},
        {1, 4, 5},
        {1: ["top-1 by m=0.99"], 4: ["latest 2"], 2: ["outside top-1", "not among latest 2"]},
    ),
    (
        "keep_every_n_steps_milestones",
        {5: 0.1, 10: 0.2, 15: 0.9, 20: 0.3, 25: 0.0}, set(),
        {"keep_top_k": 1, "metric_name": "m", "higher_is_better": True, "keep_every_n_steps": 10},
        {10, 15, 20, 25},
        {10: ["milestone (every 10 steps)"], 20: ["milestone"], 15: ["top-1 by m=0.9"],
         25: ["latest"], 5: ["outside top-1"]},
    ),
    (
        "pinned_survives_top_k_zero",
        {1: 0.1, 2: 0.2, 3: 0.3}, {2},
        {"keep_top_k": 0, "metric_name": "m", "keep_latest": False},
        {2},
        {2: ["pinned (KEEP file)"], 1: ["outside top-0"], 3: ["outside top-0"]},
    ),
    (
        "pinned_outside_top_k",
        {1: 0.1, 2: 0.2, 3: 0.9, 4: 0.8}, {1},
        {"keep_top_k": 1, "metric_name": "m", "higher_is_better": True, "keep_latest": False},
        {1, 3},
        {1: ["pinned"], 3: ["top-1"], 2: ["outside top-1"]},
    ),
    (
        "keep_unranked_keeps_bad_metrics_outside_top_k",
        {1: 0.1, 2: NO_METRIC, 3: 0.9, 4: "bad", 5: math.nan}, set(),
        {"keep_top_k": 1, "metric_name": "m", "higher_is_better": True, "keep_unranked": True,
         "keep_latest": False},
        {2, 3, 4, 5},
        {2: ["metric missing", "keep_unranked"], 4: ["metric not a number (str)", "keep_unranked"],
         5: ["not finite", "keep_unranked"], 3: ["top-1 by m=0.9"], 1: ["outside top-1"]},
    ),
    (
        "unranked_values_rank_below_every_real_value_higher_is_better",
        {1: -5.0, 2: math.nan, 3: math.inf, 4: -math.inf, 5: "0.9", 6: True, 7: {"v": 1.0},
         8: None, 9: NO_METRIC, 10: [1.0]},
        set(),
        {"keep_top_k": 2, "metric_name": "m", "higher_is_better": True, "keep_latest": False},
        {1, 10},
        {1: ["top-2 by m=-5"], 10: ["top-2: metric not a number (list), ranked last"],
         2: ["outside top-2: metric not finite (nan), ranked last"],
         3: ["metric not finite (inf)", "ranked last"],
         4: ["metric not finite (-inf)", "ranked last"],
         5: ["metric not a number (str)", "ranked last"],
         6: ["metric not a number (bool)", "ranked last"],
         7: ["metric not a number (dict)", "ranked last"],
         8: ["metric not a number (NoneType)", "ranked last"],
         9: ["metric missing", "ranked last"]},
    ),
    (
        "unranked_values_rank_below_every_real_value_lower_is_better",
        {1: 1e9, 2: math.nan, 3: -math.inf, 4: NO_METRIC}, set(),
        {"keep_top_k": 1, "metric_name": "m", "keep_latest": False},
        {1},
        {1: ["top-1 by m=1e+09"], 2: ["not finite", "ranked last"],
         3: ["not finite", "ranked last"],
         4: ["metric missing", "ranked last"]},
    ),
    (
        "steps_without_training_info_are_kept",
        {1: 0.1, 2: NO_INFO, 3: 0.9}, set(),
        {"keep_top_k": 0, "metric_name": "m", "keep_latest": False},
        {2},
        {2: ["no training_info.json", "not ranked"], 1: ["outside top-0"], 3: ["outside top-0"]},
    ),
    (
        "step_without_info_does_not_take_the_latest_slot",
        {1: 0.1, 2: 0.5, 3: NO_INFO}, set(),
        {"keep_top_k": 0, "metric_name": "m"},
        {2, 3},
        {2: ["latest"], 3: ["no training_info.json"], 1: ["outside top-0"]},
    ),
    (
        "pinned_step_without_info_says_both",
        {1: 0.1, 2: NO_INFO}, {2},
        {"keep_top_k": 0, "metric_name": "m", "keep_latest": False},
        {2},
        {2: ["pinned (KEEP file)", "no training_info.json"]},
    ),
    (
        "no_bounding_rule_deletes_nothing",
        M5, set(), {"metric_name": "m", "keep_latest": False, "keep_every_n_steps": 2},
        {1, 2, 3, 4, 5},
        {1: ["nothing is deleted"], 3: ["nothing is deleted"], 2: ["milestone"]},
    ),
    (
        "default_policy_deletes_nothing",
        M5, set(), {},
        {1, 2, 3, 4, 5},
        {5: ["latest"], 1: ["nothing is deleted"]},
    ),
    (
        "numeric_step_order_latest_is_10_not_9",
        {9: 0.1, 10: 0.1, 2: 0.1}, set(), {"keep_top_k": 0, "metric_name": "m"},
        {10},
        {10: ["latest"], 9: ["outside top-0"]},
    ),
    (
        "numeric_step_order_recency_prefers_100_over_99",
        {99: 0.1, 100: 0.1, 1000: 0.1, 2: 0.1}, set(), {"keep_top_k": 2, "keep_latest": False},
        {100, 1000},
        {1000: ["top-2 by recency"], 99: ["outside top-2 by recency"]},
    ),
    (
        "top_k_zero_without_latest_deletes_everything",
        M5, set(), {"keep_top_k": 0, "keep_latest": False},
        set(),
        {1: ["outside top-0"], 5: ["outside top-0"]},
    ),
    (
        "top_k_larger_than_the_number_of_steps_keeps_all",
        M5, set(), {"keep_top_k": 10, "metric_name": "m", "keep_latest": False},
        {1, 2, 3, 4, 5},
        {1: ["top-10 by m=0.1"]},
    ),
    (
        "step_zero_is_a_step",
        {0: 0.9, 1: 0.1}, set(),
        {"keep_top_k": 1, "metric_name": "m", "higher_is_better": True, "keep_latest": False},
        {0},
        {0: ["top-1 by m=0.9"], 1: ["outside top-1"]},
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("metrics", "pinned", "policy_kwargs", "kept", "words"),
    [pytest.param(*row[1:], id=row[0]) for row in RETENTION_ROWS],
)
def test_retention_rules(
    metrics: dict[int, Any],
    pinned: set[int],
    policy_kwargs: dict[str, Any],
    kept: set[int],
    words: dict[int, list[str]],
) -> None:
    policy = Policy(**policy_kwargs)
    scan = root_scan(ck(s, m, pinned=s in pinned) for s, m in metrics.items())
    p = plan(scan, policy, NOW)

    decisions = step_decisions(p)
    assert set(decisions) == set(metrics)
    assert p.kept_steps == kept
    assert p.deleted_steps == set(metrics) - kept
    assert {s: d.action for s, d in decisions.items()} == {
        s: Action.KEEP if s in kept else Action.DELETE for s in metrics
    }
    for step, expected in words.items():
        text = joined(decisions[step])
        for word in expected:
            assert word in text, f"step {step}: {word!r} not in {text!r}"
    for d in p:
        assert d.reasons and all(d.reasons), d
        assert d.path == ROOT / f"step_{d.step}"
        assert d.identity == (1, d.step)  # re-checked before acting


def test_decisions_carry_the_metric_for_display() -> None:
    scan = root_scan([ck(1, 0.5), ck(2, "x"), ck(3, NO_METRIC)])
    p = plan(scan, Policy(keep_top_k=1, metric_name="m"), NOW)
    metrics = {s: d.metric for s, d in step_decisions(p).items()}
    assert metrics[1] == 0.5
    assert isinstance(metrics[2], str) and "not a number" in metrics[2]
    assert metrics[3] == "metric missing"


def test_empty_root_plans_nothing() -> None:
    p = plan(root_scan(), Policy(keep_top_k=1), NOW)
    assert p.decisions == ()
    assert not p.mutates


def test_plan_is_pure_and_keeps_its_inputs() -> None:
    scan = root_scan([ck(s, s / 10) for s in range(1, 6)], trash=[TrashEntry(ROOT / "t", NOW - 10)])
    policy = Policy(keep_top_k=2, metric_name="m")
    first = plan(scan, policy, NOW)
    assert plan(scan, policy, NOW) == first
    assert (first.root, first.policy, first.now) == (ROOT, policy, NOW)
    assert first.mutates


def test_huge_integer_metric_is_ranked_last_not_a_crash() -> None:
    scan = root_scan([ck(1, 0.5), ck(2, 10**400), ck(3, 0.1)])
    p = plan(scan, Policy(keep_top_k=1, metric_name="m", higher_is_better=True), NOW)
    assert p.kept_steps == {1, 3}


# -- in-flight saves ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "policy_kwargs", "action", "words"),
    [
        pytest.param(
            tmp(5, complete=True, metric=0.5),
            {},
            Action.FINALIZE,
            [".complete present"],
            id="complete_finalize",
        ),
        pytest.param(
            tmp(5, complete=True),
            {"complete_marker": "DONE"},
            Action.FINALIZE,
            ["DONE present"],
            id="complete_custom_marker_named",
        ),
        pytest.param(
            tmp(5, complete=True, locked=True),
            {},
            Action.FINALIZE,
            ["present"],
            id="complete_wins_over_writer_lock",
        ),
        pytest.param(
            tmp(5, complete=False, locked=True, newest=NOW - 30 * 24 * HOUR),
            {},
            Action.WAIT,
            ["writer lock held"],
            id="writer_locked_waits_even_when_old",
        ),
        pytest.param(
            tmp(5, complete=False),
            {},
            Action.WAIT,
            ["in flight", "no marker"],
            id="not_probed_waits",
        ),
        pytest.param(
            tmp(5, complete=False, locked=False, newest=NOW - 7 * HOUR),
            {},
            Action.COLLECT,
            ["stale", "no marker", "no writer lock", "7.0h"],
            id="stale_collect",
        ),
        pytest.param(
            tmp(5, complete=False, locked=False, newest=NOW - 5 * HOUR),
            {},
            Action.WAIT,
            ["in flight", "last write 5.0h ago"],
            id="recent_waits",
        ),
        pytest.param(
            tmp(5, complete=False, locked=False, newest=NOW - 6 * HOUR),
            {},
            Action.COLLECT,
            ["stale"],
            id="exactly_stale_after_is_stale",
        ),
        pytest.param(
            tmp(5, complete=False, locked=False, newest=NOW - 90),
            {"stale_after": 60.0},
            Action.COLLECT,
            ["stale", "1.5m"],
            id="custom_stale_after",
        ),
        pytest.param(
            tmp(5, complete=False, locked=False, newest=NOW - 30),
            {"stale_after": 60.0},
            Action.WAIT,
            ["last write 30s ago"],
            id="custom_stale_after_recent",
        ),
        pytest.param(
            tmp(5, complete=False, locked=False, newest=NOW + 100),
            {"stale_after": 0.0},
            Action.WAIT,
            ["in flight"],
            id="mtime_in_the_future_is_not_stale",
        ),
        pytest.param(
            tmp(5, complete=False, locked=False, newest=NOW + 42),
            {},
            Action.WAIT,
            ["in flight: last write 42s in the future (writer clock ahead?)"],
            id="mtime_in_the_future_is_said_to_be",
        ),
        pytest.param(
            tmp(5, complete=False, locked=False, newest=NOW + 3 * HOUR),
            {"stale_after": 0.0},
            Action.WAIT,
            ["last write 3.0h in the future (writer clock ahead?)"],
            id="far_future_with_zero_stale_after_waits",
        ),
        pytest.param(
            tmp(5, complete=False, locked=False, newest=NOW + 0.2),
            {},
            Action.WAIT,
            ["in flight: last write 0s ago"],
            id="a_fraction_of_a_second_ahead_is_now",
        ),
        pytest.param(
            tmp(
                5,
                complete=False,
                locked=True,
                newest=NOW - 7 * HOUR,
                unreadable="Permission denied",
            ),
            {},
            Action.WAIT,
            ["writer lock unreadable (Permission denied): treated as held", "untouched for 7.0h"],
            id="unreadable_writer_lock_keeps_a_stale_save",
        ),
        pytest.param(
            tmp(5, complete=False, locked=True, newest=NOW - 60, unreadable="Permission denied"),
            {},
            Action.WAIT,
            ["writer lock unreadable (Permission denied): treated as held", "last write 1.0m ago"],
            id="unreadable_writer_lock_on_a_save_in_flight",
        ),
        pytest.param(
            tmp(5, complete=False, locked=True, unreadable="No locks available"),
            {},
            Action.WAIT,
            ["writer lock unreadable (No locks available): treated as held"],
            id="unreadable_writer_lock_without_times",
        ),
    ],
)
def test_in_flight_saves(
    record: InFlight, policy_kwargs: dict[str, Any], action: Action, words: list[str]
) -> None:
    p = plan(root_scan(in_flight=[record]), Policy(keep_top_k=0, **policy_kwargs), NOW)
    tmp_decisions = [d for d in p if d.path == record.path]
    assert [d.action for d in tmp_decisions] == [action]
    text = joined(tmp_decisions[0])
    for word in words:
        assert word in text
    # Only a complete save becomes a step that retention decides about.
    if action is Action.FINALIZE:
        (kept,) = p.by_action(Action.KEEP)
        assert (kept.step, kept.path, kept.identity) == (5, ROOT / "step_5", record.identity)
        assert "latest" in kept.reasons
        assert tmp_decisions[0].identity == record.identity
    else:
        assert step_decisions(p) == {}


def test_complete_tmp_beside_existing_step_is_a_replace() -> None:
    scan = root_scan([ck(4, 0.1), ck(5, 0.2)], in_flight=[tmp(5, complete=True, metric=0.9)])
    p = plan(scan, Policy(keep_top_k=1, metric_name="m", higher_is_better=True), NOW)
    (replace_d,) = p.by_action(Action.REPLACE)
    assert replace_d.path == ROOT / "tmp_step_5"
    assert "replaces step_5" in joined(replace_d)
    assert not p.by_action(Action.FINALIZE)
    decisions = step_decisions(p)
    # Retention judges the new save (metric 0.9), at the step_5 path, with the tmp's identity.
    assert decisions[5].action is Action.KEEP
    assert "top-1 by m=0.9" in joined(decisions[5])
    assert decisions[5].path == ROOT / "step_5"
    assert decisions[5].identity == (2, 5)
    assert decisions[4].action is Action.DELETE


def test_finalized_save_can_be_deleted_by_retention_in_the_same_plan() -> None:
    scan = root_scan([ck(9, 0.9), ck(10, 0.8)], in_flight=[tmp(3, complete=True, metric=0.1)])
    p = plan(scan, Policy(keep_top_k=1, metric_name="m", higher_is_better=True), NOW)
    assert [d.action for d in p if d.step == 3] == [Action.DELETE, Action.FINALIZE]
    assert p.kept_steps == {9, 10}


def test_complete_tmp_without_info_is_finalized_and_kept() -> None:
    scan = root_scan([ck(9, 0.9)], in_flight=[tmp(3, complete=True, metric=NO_INFO)])
    p = plan(scan, Policy(keep_top_k=0, metric_name="m"), NOW)
    assert step_decisions(p)[3].action is Action.KEEP
    assert "no training_info.json" in joined(step_decisions(p)[3])


# -- interrupted replaces ----------------------------------------------------------------------


def test_old_step_beside_step_is_discarded() -> None:
    scan = root_scan([ck(5, 0.5)], leftovers=[old(5, 0.1)])
    p = plan(scan, Policy(keep_top_k=1, metric_name="m"), NOW)
    (discard,) = p.by_action(Action.DISCARD)
    assert (discard.path, discard.identity) == (ROOT / "old_step_5", (3, 5))
    assert "beside step_5" in joined(discard)
    assert step_decisions(p)[5].action is Action.KEEP
    assert step_decisions(p)[5].identity == (1, 5)


def test_old_step_without_step_and_complete_tmp_finishes_the_replace() -> None:
    scan = root_scan(leftovers=[old(5, 0.1)], in_flight=[tmp(5, complete=True, metric=0.7)])
    p = plan(scan, Policy(keep_top_k=1, metric_name="m"), NOW)
    assert sorted(d.action for d in p if d.step == 5) == sorted(
        [Action.DISCARD, Action.FINALIZE, Action.KEEP]
    )
    (discard,) = p.by_action(Action.DISCARD)
    assert discard.path == ROOT / "old_step_5"
    assert "complete" in joined(discard) and "finishing" in joined(discard)
    assert step_decisions(p)[5].identity == (2, 5)  # the new save, not the old copy
    assert "m=0.7" in joined(step_decisions(p)[5])


@pytest.mark.parametrize(
    "in_flight",
    [
        pytest.param([], id="no_tmp"),
        pytest.param([tmp(5, complete=False)], id="incomplete_tmp"),
        pytest.param([tmp(5, complete=False, locked=True)], id="locked_tmp"),
    ],
)
def test_old_step_without_step_and_no_complete_tmp_is_restored(in_flight: list[InFlight]) -> None:
    scan = root_scan([ck(2, 0.9)], leftovers=[old(5, 0.1)], in_flight=in_flight)
    p = plan(scan, Policy(keep_top_k=1, metric_name="m"), NOW)
    (restore,) = p.by_action(Action.RESTORE)
    assert (restore.step, restore.path, restore.identity) == (5, ROOT / "old_step_5", (3, 5))
    assert "restoring" in joined(restore)
    assert not p.by_action(Action.DISCARD, Action.FINALIZE, Action.REPLACE)
    # The restored step takes part in retention under its final name, with the old identity.
    d5 = step_decisions(p)[5]
    assert (d5.action, d5.path, d5.identity) == (Action.KEEP, ROOT / "step_5", (3, 5))
    assert "latest" in d5.reasons
    # Lower is better: the restored copy (0.1) is the top-1 and the latest, so step 2 goes.
    assert step_decisions(p)[2].action is Action.DELETE
    if in_flight:
        assert [d.action for d in p if d.path == ROOT / "tmp_step_5"] == [Action.WAIT]


def test_restored_old_step_is_ranked_with_its_own_metric() -> None:
    scan = root_scan([ck(1, 0.5), ck(9, 0.4)], leftovers=[old(5, 0.1)])
    p = plan(scan, Policy(keep_top_k=1, metric_name="m", keep_latest=False), NOW)
    assert p.kept_steps == {5}
    assert p.deleted_steps == {1, 9}


# -- trash and anomalies ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "grace", "action", "words"),
    [
        (0.0, 0.0, Action.PURGE, ["in trash"]),
        (5.0, 0.0, Action.PURGE, ["in trash"]),
        (2 * HOUR, HOUR, Action.PURGE, ["in trash for 2.0h"]),
        (HOUR, HOUR, Action.PURGE, ["in trash"]),
        (30 * 60, HOUR, Action.HOLD, ["in trash for 30.0m", "grace 1.0h"]),
    ],
)
def test_trash_entries_are_purged_after_grace(
    age: float, grace: float, action: Action, words: list[str]
) -> None:
    entry = TrashEntry(ROOT / ".ckptkeeper" / "trash" / "1-step_1", NOW - age)
    p = plan(root_scan(trash=[entry]), Policy(trash_grace=grace), NOW)
    (d,) = p.decisions
    assert (d.step, d.path, d.action) == (None, entry.path, action)
    for word in words:
        assert word in joined(d)
    assert p.mutates is (action is Action.PURGE)


def test_anomalies_are_ignored_with_their_reason() -> None:
    anomalies = [
        Anomaly(ROOT / "step_3", "symlink: not followed", 3),
        Anomaly(ROOT / "step_7", "ambiguous: step_07 and step_7 name one step", 7),
        Anomaly(ROOT / "step_07", "ambiguous: step_07 and step_7 name one step", 7),
        Anomaly(ROOT / "tmp_step_4", "not a directory", 4),
    ]
    p = plan(
        root_scan([ck(1, 0.1)], anomalies=anomalies, ambiguous=[7]),
        Policy(keep_top_k=0, keep_latest=False),
        NOW,
    )
    ignored = {d.path: d for d in p.by_action(Action.IGNORE)}
    assert set(ignored) == {a.path for a in anomalies}
    for a in anomalies:
        assert ignored[a.path].reasons == (a.reason,)
    assert p.deleted_steps == {1}
    assert not any(d.step in (3, 4, 7) for d in p.by_action(Action.DELETE, Action.KEEP))


def test_ambiguous_step_is_not_finalized_over() -> None:
    anomalies = [
        Anomaly(ROOT / "step_7", "ambiguous: step_07 and step_7 name one step", 7),
        Anomaly(ROOT / "step_07", "ambiguous: step_07 and step_7 name one step", 7),
    ]
    scan = root_scan(anomalies=anomalies, ambiguous=[7], in_flight=[tmp(7, complete=True)])
    p = plan(scan, Policy(keep_top_k=0), NOW)
    assert not p.by_action(Action.FINALIZE, Action.REPLACE, Action.DELETE)


def test_only_a_stale_save_held_back_by_an_unreadable_lock_is_blocked() -> None:
    """`blocked` marks what stays stuck until someone acts: the daemon reports it once."""
    why = "writer lock unreadable (Permission denied): treated as held"
    stale = tmp(
        5, complete=False, locked=True, newest=NOW - 7 * HOUR, unreadable="Permission denied"
    )
    busy = tmp(6, complete=False, locked=True, newest=NOW - 60, unreadable="Permission denied")
    held = tmp(7, complete=False, locked=True)
    p = plan(root_scan(in_flight=[stale, busy, held]), Policy(), NOW)
    blocked = {d.step: (d.blocked, d.reasons[0]) for d in p}
    assert blocked == {
        5: (Action.COLLECT, why),
        6: (None, why),
        7: (None, "writer lock held"),
    }


@pytest.mark.parametrize("reason", ["symlink: not followed", "not a directory"])
def test_a_step_that_is_not_a_directory_holds_back_the_finalize(reason: str) -> None:
    scan = root_scan(
        [ck(4, 0.4)],
        in_flight=[tmp(5, complete=True, metric=0.9)],
        anomalies=[Anomaly(ROOT / "step_5", reason, 5)],
    )
    p = plan(scan, Policy(keep_top_k=1, metric_name="m", higher_is_better=True), NOW)
    (wait,) = (d for d in p if d.path == ROOT / "tmp_step_5")
    assert (wait.action, wait.blocked) == (Action.WAIT, Action.FINALIZE)
    assert wait.reasons == (f"step_5 is in the way ({reason}): not finalized over it",)
    # Not counted as a step that will exist: step_4 stays the latest (and the best) one.
    assert step_decisions(p) == {4: step_decisions(p)[4]}
    assert p.kept_steps == {4}
    assert not p.mutates


@pytest.mark.parametrize("complete", [False, True])
def test_a_step_that_is_not_a_directory_holds_back_an_interrupted_replace(complete: bool) -> None:
    scan = root_scan(
        in_flight=[tmp(5, complete=complete)],
        leftovers=[old(5, 0.5)],
        anomalies=[Anomaly(ROOT / "step_5", "symlink: not followed", 5)],
    )
    p = plan(scan, Policy(keep_top_k=1, metric_name="m"), NOW)
    (o,) = (d for d in p if d.path == ROOT / "old_step_5")
    assert (o.action, o.blocked) == (
        Action.WAIT,
        Action.DISCARD if complete else Action.RESTORE,
    )
    assert o.reasons[0] == (
        "step_5 is in the way (symlink: not followed): interrupted replace left as it is"
    )
    assert not p.mutates and step_decisions(p) == {}


def test_a_symlink_under_another_spelling_does_not_hold_back_the_finalize() -> None:
    scan = root_scan(
        in_flight=[tmp(5, complete=True)],
        anomalies=[Anomaly(ROOT / "step_05", "symlink: not followed", 5)],
    )
    p = plan(scan, Policy(), NOW)
    assert [d.path.name for d in p.by_action(Action.FINALIZE)] == ["tmp_step_5"]


def test_replacing_a_pinned_step_keeps_it_pinned() -> None:
    scan = root_scan(
        [ck(1, 0.1), ck(2, 0.2, pinned=True), ck(3, 0.9), ck(4, 0.5)],
        in_flight=[tmp(2, complete=True, metric=0.0)],
    )
    p = plan(scan, Policy(keep_top_k=1, metric_name="m", higher_is_better=True), NOW)
    assert 2 in p.kept_steps
    assert "pinned" in joined(step_decisions(p)[2])


def test_decisions_are_sorted_by_step_then_path_with_trash_last() -> None:
    scan = root_scan(
        [ck(10, 0.1), ck(9, 0.2)],
        in_flight=[tmp(9, complete=True)],
        leftovers=[old(2)],
        trash=[TrashEntry(ROOT / ".ckptkeeper/trash/1-step_1", NOW)],
    )
    p = plan(scan, Policy(keep_top_k=1), NOW)
    keys = [(d.step is None, d.step or 0, str(d.path)) for d in p]
    assert keys == sorted(keys)
    assert p.decisions[-1].action is Action.PURGE


# -- properties ------------------------------------------------------------------------------------

METRICS = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6),
    st.sampled_from([0.0, 0.5, 1.0]),  # ties
    st.integers(min_value=-1000, max_value=1000),
    st.sampled_from(
        [math.nan, math.inf, -math.inf, "0.5", True, None, {"v": 1}, NO_METRIC, NO_INFO]
    ),
)

POLICIES = st.builds(
    Policy,
    keep_top_k=st.one_of(st.none(), st.integers(0, 5)),
    metric_name=st.sampled_from([None, "m"]),
    higher_is_better=st.booleans(),
    save_period=st.integers(1, 3),
    keep_latest=st.booleans(),
    keep_latest_n=st.one_of(st.none(), st.integers(0, 4)),
    keep_every_n_steps=st.one_of(st.none(), st.integers(1, 20)),
    keep_unranked=st.booleans(),
)


@st.composite
def step_sets(draw: st.DrawFn) -> list[Checkpoint]:
    steps = draw(st.sets(st.integers(0, 120), max_size=14))
    return [ck(s, draw(METRICS), pinned=draw(st.integers(0, 5)) == 0) for s in sorted(steps)]


def _usable(c: Checkpoint, policy: Policy) -> float | None:
    """Independent oracle of a step's ranking value (None: unranked)."""
    if policy.metric_name is None:
        return float(c.step)
    assert c.info is not None
    v = c.info.get(policy.metric_name)
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def required_kept(checkpoints: list[Checkpoint], policy: Policy) -> set[int]:
    """What the design's rules say must be kept (among steps with training_info)."""
    part = [c for c in checkpoints if c.info is not None]
    if not part:
        return set()
    need: set[int] = {c.step for c in part if c.pinned}
    if policy.keep_latest:
        need.add(max(c.step for c in part))
    if policy.keep_every_n_steps is not None:
        need |= {c.step for c in part if c.step % policy.keep_every_n_steps == 0}
    if policy.keep_latest_n is not None:
        need |= set(sorted((c.step for c in part), reverse=True)[: policy.keep_latest_n])
    skip_unranked = policy.keep_unranked and policy.metric_name is not None
    if skip_unranked:
        need |= {c.step for c in part if _usable(c, policy) is None}
    if policy.keep_top_k is not None:
        good_high = policy.higher_is_better or policy.metric_name is None
        candidates = [c for c in part if c.step % policy.save_period == 0]
        if skip_unranked:
            candidates = [c for c in candidates if _usable(c, policy) is not None]

        def key(c: Checkpoint) -> tuple[int, float, int]:
            v = _usable(c, policy)
            if v is None:
                return (1, 0.0, -c.step)
            return (0, -v if good_high else v, -c.step)

        need |= {c.step for c in sorted(candidates, key=key)[: policy.keep_top_k]}
    return need


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(step_sets(), POLICIES)
def test_property_kept_is_exactly_what_some_rule_keeps(
    checkpoints: list[Checkpoint], policy: Policy
) -> None:
    p = plan(root_scan(checkpoints), policy, NOW)
    all_steps = {c.step for c in checkpoints}
    no_info = {c.step for c in checkpoints if c.info is None}
    need = required_kept(checkpoints, policy)

    assert p.kept_steps | p.deleted_steps == all_steps
    assert not p.kept_steps & p.deleted_steps
    assert p.kept_steps >= need | no_info
    if policy.bounded:
        assert p.kept_steps == need | no_info
    else:
        assert p.deleted_steps == frozenset()


@FAST
@given(step_sets(), POLICIES)
def test_property_without_a_bounding_rule_nothing_is_deleted(
    checkpoints: list[Checkpoint], policy: Policy
) -> None:
    unbounded = replace(policy, keep_top_k=None, keep_latest_n=None)
    p = plan(root_scan(checkpoints), unbounded, NOW)
    assert not p.by_action(Action.DELETE)
    assert p.kept_steps == {c.step for c in checkpoints}


@FAST
@given(step_sets(), POLICIES)
def test_property_replanning_after_the_deletions_deletes_nothing_more(
    checkpoints: list[Checkpoint], policy: Policy
) -> None:
    first = plan(root_scan(checkpoints), policy, NOW)
    survivors = [c for c in checkpoints if c.step not in first.deleted_steps]
    second = plan(root_scan(survivors), policy, NOW)
    assert second.deleted_steps == frozenset()
    assert second.kept_steps == first.kept_steps


@st.composite
def full_scans(draw: st.DrawFn) -> RootScan:
    """Steps plus every other kind of entry, for order and reason properties."""
    checkpoints = draw(step_sets())
    tmp_steps = draw(st.sets(st.integers(0, 120), max_size=5))
    in_flight = [
        tmp(
            s,
            complete=draw(st.booleans()),
            metric=draw(METRICS),
            locked=draw(st.sampled_from([None, True, False])),
            newest=draw(st.one_of(st.none(), st.floats(NOW - 30 * 3600, NOW + 60))),
        )
        for s in sorted(tmp_steps)
    ]
    leftovers = [
        old(s, draw(METRICS)) for s in sorted(draw(st.sets(st.integers(0, 120), max_size=4)))
    ]
    trash = [
        TrashEntry(ROOT / ".ckptkeeper" / "trash" / f"{i}-step_{i}", NOW - draw(st.floats(0, 1e5)))
        for i in range(draw(st.integers(0, 3)))
    ]
    anomalies = [
        Anomaly(ROOT / f"step_{s}x", "symlink: not followed", s)
        for s in sorted(draw(st.sets(st.integers(0, 120), max_size=3)))
    ]
    return root_scan(checkpoints, in_flight, leftovers, trash, anomalies)


def _shuffled(scan: RootScan, rng: random.Random) -> RootScan:
    def mix(items: tuple[Any, ...]) -> tuple[Any, ...]:
        out = list(items)
        rng.shuffle(out)
        return tuple(out)

    return replace(
        scan,
        steps=mix(scan.steps),
        in_flight=mix(scan.in_flight),
        leftovers=mix(scan.leftovers),
        trash=mix(scan.trash),
        anomalies=mix(scan.anomalies),
    )


@FAST
@given(full_scans(), POLICIES, st.randoms(use_true_random=False))
def test_property_plan_does_not_depend_on_input_order(
    scan: RootScan, policy: Policy, rng: random.Random
) -> None:
    assert plan(_shuffled(scan, rng), policy, NOW) == plan(scan, policy, NOW)


@FAST
@given(full_scans(), POLICIES)
def test_property_every_entry_gets_decisions_with_reasons(scan: RootScan, policy: Policy) -> None:
    p = plan(scan, policy, NOW)
    for d in p:
        assert d.reasons, d
        assert all(isinstance(r, str) and r.strip() for r in d.reasons), d
    decided = {d.path for d in p}
    paths: list[Path] = [e.path for e in scan.in_flight] + [e.path for e in scan.leftovers]
    paths += [e.path for e in scan.trash] + [e.path for e in scan.anomalies]
    assert {*paths, *(c.path for c in scan.steps)} <= decided
    # At most one retention decision per step, and one per in-flight/leftover entry.
    assert len(p.by_action(Action.KEEP, Action.DELETE)) == len(step_decisions(p))
    for path in [e.path for e in scan.in_flight] + [e.path for e in scan.leftovers]:
        assert len([d for d in p if d.path == path]) == 1
