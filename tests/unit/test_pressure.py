"""Disk pressure in the pure planner (DESIGN section 13), from hand-built records.

``plan(scan, policy, now, free=FreeSpace(...))``: below ``min_free`` the plan deletes beyond the
other rules, worst first, just enough, never a protected checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptkeeper.plan import Action, Decision, Plan, plan
from ckptkeeper.policy import Policy, PolicyError
from ckptkeeper.pressure import FreeSpace
from ckptkeeper.records import Checkpoint, InFlight, RootScan, TrashEntry
from ckptkeeper.sizes import format_size, parse_min_free

ROOT = Path("/ckpt/run")
NOW = 1_700_000_000.0
GB = 1024**3
UNRANKED = object()


def ck(step: int, metric: Any = None, *, pinned: bool = False, info: bool = True) -> Checkpoint:
    data: dict[str, Any] = {"step": step}
    if metric is not UNRANKED and metric is not None:
        data["m"] = metric
    return Checkpoint(
        step,
        ROOT / f"step_{step}",
        data if info else None,
        None if info else "no training_info.json",
        pinned,
        (1, step),
    )


def scan(
    steps: Iterable[Checkpoint],
    in_flight: Iterable[InFlight] = (),
    trash: Iterable[TrashEntry] = (),
) -> RootScan:
    return RootScan(ROOT, tuple(steps), tuple(in_flight), (), tuple(trash))


def space(
    free: int, total: int = 100 * GB, sizes: Mapping[int, int] | None = None, trash: int = 0
) -> FreeSpace:
    """``sizes``: step -> bytes (checkpoints built by `ck` have identity (1, step))."""
    return FreeSpace(free, total, {(1, s): b for s, b in (sizes or {}).items()}, trash)


def decisions(p: Plan) -> dict[int, Decision]:
    return {d.step: d for d in p.by_action(Action.KEEP, Action.DELETE) if d.step is not None}


POLICY = Policy(metric_name="m", higher_is_better=True, min_free="30%")


# -- policy keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "percent", "size"),
    [
        ("15%", 15.0, None),
        (" 12.5 % ", 12.5, None),
        ("500G", None, 500 * GB),
        ("500GiB", None, 500 * GB),
        ("500gb", None, 500 * GB),
        ("1.5T", None, int(1.5 * 1024**4)),
        ("100M", None, 100 * 1024**2),
        ("4096", None, 4096),
        (4096, None, 4096),
    ],
)
def test_min_free_accepts_a_share_or_a_size(text: Any, percent: Any, size: Any) -> None:
    parsed = parse_min_free(text)
    assert (parsed.percent, parsed.size) == (percent, size)
    assert Policy(min_free=text).pressure_threshold == parsed


@pytest.mark.parametrize(
    "bad", ["0%", "100%", "150%", "-5%", "abc", "5X", "", "0", 0, -1, 1.5, True]
)
def test_min_free_rejects_nonsense_naming_the_key(bad: Any) -> None:
    with pytest.raises(PolicyError) as info:
        Policy.from_mapping({"min_free": bad}, source="ckptkeeper.toml")
    assert info.value.key == "min_free"
    assert str(info.value).startswith("ckptkeeper.toml: min_free: ")


@pytest.mark.parametrize("bad", [0, -1, True, "2", 1.5])
def test_min_keep_is_a_whole_number_of_at_least_one(bad: Any) -> None:
    with pytest.raises(PolicyError) as info:
        Policy(min_keep=bad)
    assert info.value.key == "min_keep"


def test_sizes_print_in_binary_units() -> None:
    assert [format_size(n) for n in (0, 1023, 1536, 10 * 1024**2, 500 * GB)] == [
        "0B",
        "1023B",
        "1.5K",
        "10M",
        "500G",
    ]


# -- decisions -----------------------------------------------------------------------------------


def test_without_pressure_the_plan_is_the_plain_plan() -> None:
    steps = [ck(s, s / 10) for s in range(1, 6)]
    policy = replace(POLICY, keep_top_k=2)
    plain = plan(scan(steps), policy, NOW)
    roomy = plan(scan(steps), policy, NOW, space(50 * GB, sizes={s: GB for s in range(1, 6)}))
    assert roomy.decisions == plain.decisions
    assert roomy.pressure is None
    assert not roomy.next_save_may_not_fit


def test_worst_first_just_enough_each_reason_says_so() -> None:
    # higher is better: unranked 2 goes first, then the lowest metric (4: 0.1, then 1: 0.2, ...).
    steps = [ck(1, 0.2), ck(2, UNRANKED), ck(3, 0.5), ck(4, 0.1), ck(5, 0.9), ck(6, 0.3)]
    p = plan(scan(steps), POLICY, NOW, space(8 * GB, sizes={s: 10 * GB for s in range(1, 7)}))
    # 8G free, 30G wanted: three deletions of 10G give 38G; a fourth is not needed.
    assert p.pressure is not None
    assert p.pressure.deleted == (2, 4, 1)
    assert p.pressure.satisfied
    assert p.deleted_steps == {1, 2, 4}
    for step in (1, 2, 4):
        assert decisions(p)[step].reasons[0] == "disk pressure: 8% free < 30%"
    assert p.pressure.projected_free_bytes == 38 * GB


def test_without_a_metric_the_oldest_goes_first() -> None:
    steps = [ck(s) for s in (10, 20, 30, 40)]
    policy = Policy(min_free="500G")
    p = plan(
        scan(steps),
        policy,
        NOW,
        space(450 * GB, total=1000 * GB, sizes={s: 30 * GB for s in (10, 20, 30, 40)}),
    )
    assert p.pressure is not None and p.pressure.deleted == (10, 20)
    assert decisions(p)[10].reasons[0] == "disk pressure: 450G free < 500G"


def test_protected_checkpoints_survive_however_full_the_disk() -> None:
    steps = [
        ck(1, 0.1, pinned=True),  # pinned
        ck(2, 0.99),  # the single best (higher is better)
        ck(3, 0.2),
        ck(4, 0.3, info=False),  # no training_info.json: never ranked, never deleted
        ck(10, 0.4),  # milestone
        ck(11, 0.5),
        ck(12, 0.6),  # latest
    ]
    saving = InFlight(13, ROOT / "tmp_step_13", True, {"m": 0.0}, None, False, (2, 13))
    policy = replace(POLICY, keep_every_n_steps=5)
    p = plan(scan(steps, [saving]), policy, NOW, space(0, sizes=dict.fromkeys(range(20), GB)))
    assert p.deleted_steps == {3, 11, 12}  # 12 is not the latest any more: 13 is finalized
    assert p.pressure is not None and not p.pressure.satisfied
    assert {1, 2, 4, 10, 13} <= p.kept_steps


def test_at_least_min_keep_checkpoints_remain() -> None:
    steps = [ck(s, s / 10) for s in range(1, 8)]
    policy = replace(POLICY, min_keep=4)
    p = plan(scan(steps), policy, NOW, space(0, sizes=dict.fromkeys(range(1, 8), GB)))
    assert len(p.kept_steps) == 4
    assert p.pressure is not None and p.pressure.deleted == (1, 2, 3)


def test_a_checkpoint_of_unknown_size_is_deleted_alone() -> None:
    steps = [ck(s, s / 10) for s in range(1, 6)]
    p = plan(scan(steps), POLICY, NOW, space(0, sizes={2: GB, 3: GB}))
    assert p.pressure is not None
    assert p.pressure.deleted == (1,)
    assert p.pressure.unsized == 1


def test_what_other_rules_delete_counts_first() -> None:
    steps = [ck(s, s / 10) for s in range(1, 7)]
    policy = replace(POLICY, keep_top_k=3, keep_latest=False)  # deletes 1, 2, 3 anyway
    sizes = dict.fromkeys(range(1, 7), 10 * GB)
    enough = plan(scan(steps), policy, NOW, space(20 * GB, sizes=sizes))
    assert enough.deleted_steps == {1, 2, 3}
    assert enough.pressure is not None and enough.pressure.deleted == ()
    # 20G free + 3G from the rules' deletions: one more (the worst kept: 4) gives 33G >= 30G.
    short = plan(scan(steps), policy, NOW, space(20 * GB, sizes={**sizes, 1: GB, 2: GB, 3: GB}))
    assert short.pressure is not None and short.pressure.deleted == (4,)
    assert decisions(short)[4].reasons == (
        "disk pressure: 20% free < 30%",
        "otherwise kept: top-3 by m=0.4",
    )


def test_trash_within_its_grace_is_purged_first_and_counted() -> None:
    steps = [ck(s, s / 10) for s in range(1, 5)]
    trash = [TrashEntry(ROOT / ".ckptkeeper/trash/step_0.x", NOW - 60)]
    policy = replace(POLICY, trash_grace=86400.0)
    calm = plan(scan(steps, trash=trash), policy, NOW, space(50 * GB))
    assert [d.action for d in calm.decisions if d.step is None] == [Action.HOLD]
    tight = space(10 * GB, sizes=dict.fromkeys(range(1, 5), GB), trash=25 * GB)
    p = plan(scan(steps, trash=trash), policy, NOW, tight)
    [purge] = [d for d in p.decisions if d.step is None]
    assert purge.action is Action.PURGE
    assert "disk pressure: 10% free < 30%: trash grace cut short" in purge.reasons
    assert p.deleted_steps == set()  # 10G free + 25G from the trash is enough


def test_a_filesystem_that_reports_no_size_is_never_under_pressure() -> None:
    steps = [ck(s, s / 10) for s in range(1, 4)]
    p = plan(scan(steps), Policy(min_free="1G"), NOW, FreeSpace(0, 0))
    assert p.pressure is None and p.deleted_steps == set()


def test_min_free_alone_deletes_only_under_pressure() -> None:
    steps = [ck(s, s / 10) for s in range(1, 4)]
    p = plan(scan(steps), POLICY, NOW, space(90 * GB))
    assert p.deleted_steps == set()
    assert decisions(p)[1].reasons == (
        "no keep_top_k or keep_latest_n: deleted only under disk pressure",
    )
    assert plan(scan(steps), POLICY, NOW).deleted_steps == set()  # free space unknown


def test_next_save_may_not_fit_compares_the_newest_size_with_what_will_be_free() -> None:
    steps = [ck(s, s / 10, pinned=True) for s in range(1, 4)]
    policy = Policy(min_free="1%")
    assert plan(scan(steps), policy, NOW, space(5 * GB, sizes={3: 6 * GB})).next_save_may_not_fit
    assert not plan(
        scan(steps), policy, NOW, space(7 * GB, sizes={3: 6 * GB})
    ).next_save_may_not_fit
    assert not plan(scan(steps), policy, NOW, space(5 * GB)).next_save_may_not_fit  # size unknown
    # Deletions this plan makes count: after them the save fits.
    loose = [ck(s, s / 10) for s in range(1, 4)]
    freed = space(5 * GB, sizes={1: 2 * GB, 2: 2 * GB, 3: 6 * GB})
    p = plan(scan(loose), replace(policy, keep_latest_n=1), NOW, freed)
    assert p.deleted_steps == {1, 2} and not p.next_save_may_not_fit


# -- properties ----------------------------------------------------------------------------------

METRICS = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, math.nan, UNRANKED]), st.floats(-10, 10), st.integers(-5, 5)
)
POLICIES = st.builds(
    Policy,
    keep_top_k=st.one_of(st.none(), st.integers(0, 4)),
    metric_name=st.sampled_from([None, "m"]),
    higher_is_better=st.booleans(),
    keep_latest=st.booleans(),
    keep_latest_n=st.one_of(st.none(), st.integers(0, 3)),
    keep_every_n_steps=st.one_of(st.none(), st.integers(1, 20)),
    min_free=st.sampled_from(["10%", "50%", "90%", "40G"]),
    min_keep=st.integers(1, 4),
)


@st.composite
def cases(draw: st.DrawFn) -> tuple[RootScan, dict[int, int | None]]:
    steps = sorted(draw(st.sets(st.integers(0, 60), max_size=12)))
    checkpoints = [
        ck(s, draw(METRICS), pinned=draw(st.integers(0, 6)) == 0, info=draw(st.integers(0, 8)) > 0)
        for s in steps
    ]
    sizes = {s: draw(st.one_of(st.none(), st.integers(0, 30 * GB))) for s in steps}
    return scan(checkpoints), sizes


def oracle_protected(s: RootScan, policy: Policy) -> set[int]:
    """Independent statement of section 13's protected set."""
    cps = list(s.steps)
    out = {c.step for c in cps if c.pinned or c.info is None}
    if cps:
        out.add(max(c.step for c in cps))
    if policy.keep_every_n_steps:
        out |= {c.step for c in cps if c.step % policy.keep_every_n_steps == 0}
    if policy.metric_name:
        sign = 1 if policy.higher_is_better else -1
        ranked = [
            (sign * float(c.info["m"]), c.step)
            for c in cps
            if c.info is not None
            and isinstance(c.info.get("m"), int | float)
            and math.isfinite(c.info["m"])
        ]
        if ranked:
            out.add(max(ranked)[1])
    return out


PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _free(sizes: dict[int, int | None], free: int) -> FreeSpace:
    return space(free, sizes={s: b for s, b in sizes.items() if b is not None})


@PROPS
@given(cases(), POLICIES, st.integers(0, 100 * GB))
def test_property_pressure_only_adds_deletions_and_never_protected_ones(
    case: tuple[RootScan, dict[int, int | None]], policy: Policy, free: int
) -> None:
    s, sizes = case
    plain = plan(s, policy, NOW)
    pressed = plan(s, policy, NOW, _free(sizes, free))
    assert pressed.deleted_steps >= plain.deleted_steps
    added = pressed.deleted_steps - plain.deleted_steps
    assert not added & oracle_protected(s, policy)
    if added:
        assert len(pressed.kept_steps) >= policy.min_keep
        assert pressed.pressure is not None and set(pressed.pressure.deleted) == added
    for step in added:
        assert decisions(pressed)[step].reasons[0].startswith("disk pressure: ")


@PROPS
@given(cases(), POLICIES, st.integers(0, 100 * GB), st.integers(0, 100 * GB))
def test_property_less_free_space_never_deletes_less(
    case: tuple[RootScan, dict[int, int | None]], policy: Policy, a: int, b: int
) -> None:
    s, sizes = case
    low, high = sorted((a, b))
    assert plan(s, policy, NOW, _free(sizes, low)).deleted_steps >= (
        plan(s, policy, NOW, _free(sizes, high)).deleted_steps
    )


@PROPS
@given(cases(), POLICIES, st.integers(0, 100 * GB))
def test_property_deletes_just_enough(
    case: tuple[RootScan, dict[int, int | None]], policy: Policy, free: int
) -> None:
    """Every pressure deletion but the last was still needed when it was made."""
    s, sizes = case
    p = plan(s, policy, NOW, _free(sizes, free))
    if p.pressure is None or not p.pressure.deleted:
        return
    target = p.pressure.target_bytes
    last = p.pressure.deleted[-1]
    size_of_last = sizes[last] if p.pressure.unsized is None else 0
    assert p.pressure.projected_free_bytes - (size_of_last or 0) < target
