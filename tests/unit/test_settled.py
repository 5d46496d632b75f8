"""A keeper's look at a root found as the last look left it (`ckptkeeper.settled`) makes no
records and no plan; its plan, when asked for, is the plan a fresh look makes, and every input of
the plan that changes (time, free space, policy, pins, metrics rewritten in place, saves, trash,
the run's config.yaml) is seen by the next look."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from tests.helpers import write_metric_run

from ckptkeeper import InfoCache, Plan, Policy
from ckptkeeper.info import MEMO_TRUST_S
from ckptkeeperd.config import config_from_flags, with_metrics_address
from ckptkeeperd.logs import ProblemLog
from ckptkeeperd.reconcile import Report, preview, reconcile
from ckptkeeperd.service import Keeper

AHEAD_NS = int((MEMO_TRUST_S + 60) * 1e9)
TOP2 = Policy(keep_top_k=2, metric_name="val", higher_is_better=True, trash_grace=3600.0)
KEEP_ALL = Policy(trash_grace=3600.0)


def make_root(base: Path, vals: tuple[float, ...] = (0.3, 0.2, 0.1, 0.05)) -> Path:
    root = base / "run"
    for n, val in enumerate(vals, start=1):
        (root / f"step_{n}").mkdir(parents=True)
        (root / f"step_{n}" / "training_info.json").write_text(json.dumps({"val": val}))
    return root


class Looks:
    """Passes over one root as a keeper makes them: one cache (its scans judged as if the
    steps were written a minute ago), one problem log, a clock the test moves."""

    def __init__(self, root: Path, policy: Policy) -> None:
        self.root, self.policy = root, policy
        self.cache = InfoCache(clock_ns=lambda: time.time_ns() + AHEAD_NS)
        self.problems = ProblemLog()
        self.now = time.time() + 5  # a moment after the test made the root (and trash in it)

    def look(self) -> Report:
        return reconcile(
            self.root,
            self.policy,
            cache=self.cache,
            clock=lambda: self.now,
            problems=self.problems,
        )

    def fresh(self) -> Plan:
        """The plan of a look with nothing remembered."""
        report = preview(self.root, self.policy, now=self.now)
        assert report.plan is not None
        return report.plan


def same_plan(a: Plan | None, b: Plan) -> bool:
    assert a is not None
    return (a.root, a.policy, a.decisions, a.layout, a.pressure) == (
        b.root,
        b.policy,
        b.decisions,
        b.layout,
        b.pressure,
    )


@pytest.mark.parametrize("policy", [TOP2, KEEP_ALL], ids=["top2", "keep-all"])
@pytest.mark.parametrize("trash", [False, True], ids=["no-trash", "trash-in-grace"])
def test_an_unchanged_root_is_settled_and_its_plan_is_the_plan_a_fresh_look_makes(
    tmp_path: Path, policy: Policy, trash: bool
) -> None:
    root = make_root(tmp_path)
    (root / ".ckptkeeper" / "trash").mkdir(parents=True)
    if trash:
        (root / ".ckptkeeper" / "trash" / "step_9").mkdir()  # trashed at its ctime
    looks = Looks(root, policy)
    first = looks.look()  # top2 deletes step_3 (not the latest, step_4): under the lock
    assert first.settled is None
    second = looks.look()  # keep-all: settled already (the first look needed no lock)
    assert (second.settled is None) == (policy is TOP2)
    hits, parses = looks.cache.memo_hits, looks.cache.parses
    settled_before = looks.cache.settled_hits
    for _ in range(2):
        looks.now += 60
        report = looks.look()
        assert report.settled is not None, "the root is as the last look left it"
        assert (looks.cache.memo_hits, looks.cache.parses) == (hits, parses)  # no scan made
        assert report.checkpoint_count == (3 if policy is TOP2 else 4)
        assert report.in_flight == [] and report.outcomes == [] and report.status == "ok"
    plan = looks.fresh()
    assert report.timing == plan.timing  # the revisit: trash leaving its grace, or none
    assert same_plan(report.plan, plan)  # made on demand: the plan of a fresh look
    assert report.checkpoint_count == len(plan.kept_steps)
    assert looks.cache.settled_hits == settled_before + 2


def _pin(root: Path, looks: Looks) -> None:
    (root / "step_2" / "KEEP").touch()


def _rewrite_metric_in_place(root: Path, looks: Looks) -> None:
    path = root / "step_2" / "training_info.json"
    old = path.stat()
    data = json.dumps({"val": 0.01}).encode()  # the size of {"val": 0.25}
    assert len(data) == old.st_size
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))  # the old mtime put back: ctime moves


def _policy(root: Path, looks: Looks) -> None:
    looks.policy = replace(looks.policy, keep_top_k=1)


def _min_free(root: Path, looks: Looks) -> None:
    looks.policy = replace(looks.policy, min_free="99%")  # under pressure: deletes


def _past_grace(root: Path, looks: Looks) -> None:
    looks.now += 3600 + 120  # the trash entry's grace is over: purge


def _save_in_flight_with_writer_lock(root: Path, looks: Looks) -> None:
    (root / "tmp_step_9").mkdir()
    (root / "tmp_step_9" / ".writer.lock").write_text(str(os.getpid()))


def _trash_added(root: Path, looks: Looks) -> None:
    (root / ".ckptkeeper" / "trash" / "other").mkdir()


def _trash_purged_by_another(root: Path, looks: Looks) -> None:
    (root / ".ckptkeeper" / "trash" / "step_9").rmdir()


def _step_removed(root: Path, looks: Looks) -> None:
    (root / "step_1" / "training_info.json").unlink()
    (root / "step_1").rmdir()


def _metrics_file_removed(root: Path, looks: Looks) -> None:
    (root / "step_2" / "training_info.json").unlink()


CHANGES: dict[str, Callable[[Path, Looks], None]] = {
    "pin added": _pin,
    "metric rewritten in place": _rewrite_metric_in_place,
    "policy changed": _policy,
    "min_free set": _min_free,
    "trash past its grace": _past_grace,
    "save in flight, writer lock held": _save_in_flight_with_writer_lock,
    "trash added by another actor": _trash_added,
    "trash purged by another actor": _trash_purged_by_another,
    "step removed": _step_removed,
    "metrics file removed": _metrics_file_removed,
}


@pytest.mark.parametrize("change", list(CHANGES), ids=list(CHANGES))
@pytest.mark.parametrize("policy", [TOP2, KEEP_ALL], ids=["top2", "keep-all"])
def test_each_input_of_the_plan_that_changes_is_seen_by_the_next_look(
    tmp_path: Path, change: str, policy: Policy
) -> None:
    root = make_root(tmp_path, (0.3, 0.25, 0.1, 0.2))  # top2: 1, 2 and the latest, 4
    (root / ".ckptkeeper" / "trash" / "step_9").mkdir(parents=True)
    looks = Looks(root, policy)
    looks.look()
    looks.look()
    assert looks.look().settled is not None
    CHANGES[change](root, looks)
    expected = looks.fresh()
    report = looks.look()
    assert report.settled is None, f"{change}: the look must see it"
    if report.outcomes or report.removed:  # it acted, under the lock, on a full scan
        assert report.plan is not None and report.plan.mutates == expected.mutates
    else:
        assert same_plan(report.plan, expected)


def test_a_verdict_is_not_used_for_another_problem_log_and_problems_are_reported_once(
    tmp_path: Path,
) -> None:
    root = make_root(tmp_path, (0.3, 0.2))
    (root / "step_2" / "training_info.json").write_text(json.dumps({"other": 1}))  # unranked
    looks = Looks(root, TOP2)
    looks.look()
    assert looks.look().settled is not None  # the first look left a verdict
    elsewhere = reconcile(root, TOP2, cache=looks.cache, clock=lambda: looks.now)
    assert elsewhere.settled is not None
    assert elsewhere.plan is not None  # no problem log: problems made from the plan, as before
    assert [d.metric for d in elsewhere.plan.decisions] == [0.3, "metric missing"]


@pytest.fixture
def keeper_of() -> Iterator[Callable[..., Keeper]]:
    made: list[Keeper] = []

    def make(roots: list[Path], **flags: object) -> Keeper:
        config = config_from_flags([str(r) for r in roots], {"observer": "inotify", **flags})
        keeper = Keeper(with_metrics_address(config, "127.0.0.1:0"))
        made.append(keeper)
        keeper.cache = InfoCache(clock_ns=lambda: time.time_ns() + AHEAD_NS)
        keeper.refresh_roots()
        return keeper

    yield make
    for keeper in made:
        keeper.shutdown()


def test_a_config_yaml_metric_edit_reaches_the_keepers_next_look(
    tmp_path: Path, keeper_of: Callable[..., Keeper]
) -> None:
    root = tmp_path / "run"
    write_metric_run(root)  # config.yaml names "loss"
    keeper = keeper_of([root], keep_top_k=2)
    for _ in range(3):
        report = keeper.run_once(root)
    assert report.settled is not None and keeper.cache.settled_hits >= 1
    (root / "step_3" / "config.yaml").write_text("checkpointing:\n  metric_name: val\n")
    report = keeper.run_once(root)
    assert report.settled is None
    assert report.plan is not None and report.plan.policy.metric_name == "val"
