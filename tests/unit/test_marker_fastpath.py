"""Marker -> visible at a cost that does not grow with the root (issue 9, item 1).

A partial scan (`scan_root(steps=...)`) gives the planner the records a full scan gives for those
steps, ambiguous spellings included; `finalize_marked` finalizes one save from it under the lock;
`RootWatcher(on_marker=...)` hands the marked tmp dir over at once, and a tmp dir created after a
pass listed the root keeps its watch (it used to wait for the debounced pass).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.helpers import wait_until
from tests.helpers import write_named_save as save
from tests.watching import watchers

from ckptkeeper import InfoCache, Policy, RootScan, scan_root, write_marker
from ckptkeeper.plan import Action, plan
from ckptkeeperd.reconcile import finalize_marked, reconcile
from ckptkeeperd.watch import RootWatcher

TIMEOUT = 10.0
SLOW = 30.0  # a debounce no test waits for


def fleet(root: Path, steps: int) -> None:
    for n in range(1, steps + 1):
        save(root, f"step_{n}", float(n))


POLICY = Policy(keep_top_k=None, metric_name="val_loss")


# -- the partial scan ------------------------------------------------------------------------


def test_a_partial_scan_gives_the_records_of_a_full_scan_for_its_steps(tmp_path: Path) -> None:
    root = tmp_path / "run"
    fleet(root, 5)
    save(root, "step_07", 7.0)  # ambiguous with step_7: a partial scan must see both
    save(root, "step_7", 7.5)
    save(root, "tmp_step_7", 7.7, marked=True)
    save(root, "tmp_step_9", 9.0, marked=True)
    (root / "step_3" / "KEEP").touch()
    (root / "old_step_3").symlink_to(root / "step_1")  # an anomaly of step 3
    full = scan_root(root)
    for steps in ({7}, {3}, {9}, {7, 3}):
        part = scan_root(root, steps=steps)
        assert part.steps == tuple(c for c in full.steps if c.step in steps)
        assert part.in_flight == tuple(t for t in full.in_flight if t.step in steps)
        assert part.leftovers == tuple(o for o in full.leftovers if o.step in steps)
        assert part.anomalies == tuple(a for a in full.anomalies if a.step in steps)
        assert part.ambiguous_steps == full.ambiguous_steps & steps
        assert part.trash == ()
    assert scan_root(root, steps={7}).ambiguous_steps == {7}


def test_a_partial_scan_reads_only_its_steps_and_keeps_the_cache_of_the_others(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    fleet(root, 50)
    save(root, "tmp_step_60", 0.5, marked=True)
    cache = InfoCache()
    scan_root(root, cache=cache)
    assert cache.parses == 51
    (root / "step_60").mkdir()  # (a replace then: the save's own step exists too)
    (root / "step_60" / "training_info.json").write_text('{"val_loss": 0.6}')
    scan_root(root, cache=cache, steps={60})
    assert cache.parses == 52  # step_60 only: the other 50 were neither read nor forgotten
    scan_root(root, cache=cache)
    assert cache.parses == 52


# -- finalize_marked ---------------------------------------------------------------------------


def test_a_marked_save_is_finalized_from_a_partial_scan(tmp_path: Path) -> None:
    root = tmp_path / "run"
    fleet(root, 200)
    tmp = save(root, "tmp_step_201", 0.1, marked=True)
    save(root, "tmp_step_202", 0.1, marked=True)  # another complete save: not this pass's
    cache = InfoCache()
    report = finalize_marked(tmp, POLICY, cache=cache)
    assert report is not None
    assert [(o.decision.action, o.status) for o in report.outcomes] == [(Action.FINALIZE, "done")]
    assert (root / "step_201").is_dir() and (root / "tmp_step_202").is_dir()
    assert cache.parses == 1  # the other 200 steps were not looked inside


def test_a_marked_save_of_an_ambiguous_step_waits_as_in_a_full_pass(tmp_path: Path) -> None:
    root = tmp_path / "run"
    fleet(root, 3)
    save(root, "step_07", 7.0)
    save(root, "step_7", 7.5)
    tmp = save(root, "tmp_step_7", 0.1, marked=True)
    report = finalize_marked(tmp, POLICY)
    assert report is not None and report.outcomes == []
    assert report.plan is not None
    [decision] = [d for d in report.plan.decisions if d.path == tmp]
    assert decision.action is Action.WAIT
    full = plan(scan_root(root), POLICY, time.time())
    assert [d.action for d in full.decisions if d.path == tmp] == [Action.WAIT]
    assert tmp.is_dir() and (root / "step_7" / "training_info.json").read_text() == (
        '{"val_loss": 7.5}'
    )


def test_a_pin_carries_over_when_a_marked_save_replaces_its_step(tmp_path: Path) -> None:
    root = tmp_path / "run"
    fleet(root, 3)
    (root / "step_3" / "KEEP").touch()
    tmp = save(root, "tmp_step_3", 0.3, marked=True)
    report = finalize_marked(tmp, POLICY)
    assert report is not None
    assert [o.decision.action for o in report.outcomes if o.status == "done"] == [Action.REPLACE]
    assert (root / "step_3" / "KEEP").exists() and not tmp.exists()


def test_a_pin_added_and_a_metric_rewritten_after_a_fast_finalize_are_seen_by_the_next_pass(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    fleet(root, 4)
    policy = Policy(keep_top_k=2, metric_name="val_loss", higher_is_better=False)
    cache = InfoCache()
    assert reconcile(root, policy, cache=cache).status == "ok"  # keeps 1, 2 and the latest
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == [
        "step_1",
        "step_2",
        "step_4",
    ]
    tmp = save(root, "tmp_step_5", 9.0, marked=True)
    assert finalize_marked(tmp, policy, cache=cache) is not None
    (root / "step_1" / "KEEP").touch()  # pinned after the fast finalize
    with open(root / "step_2" / "training_info.json", "r+") as fh:  # rewritten in place
        fh.write('{"val_loss": 9.9}')  # same size
    report = reconcile(root, policy, cache=cache)
    assert report.status == "ok"
    # step_1 pinned and best; step_4 now second best; step_5 latest; step_2 (9.9) goes.
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == [
        "step_1",
        "step_4",
        "step_5",
    ]


# -- the watcher -----------------------------------------------------------------------------


class Marks:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.marked: list[tuple[Path, Path]] = []
        self.changed: list[Path] = []

    def on_marker(self, root: Path, tmp: Path) -> None:
        with self.cond:
            self.marked.append((root, tmp))
            self.cond.notify_all()

    def on_change(self, root: Path) -> None:
        with self.cond:
            self.changed.append(root)
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)


@pytest.fixture
def make_watcher() -> Iterator[Callable[..., RootWatcher]]:
    with watchers(polling_interval=0.2) as make:
        yield make


@pytest.mark.parametrize("kind", ["inotify", "polling"])
def test_a_marker_is_handed_over_at_once_and_a_full_pass_follows_debounced(
    kind: str, tmp_path: Path, make_watcher: Callable[..., RootWatcher]
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    marks = Marks()
    w = make_watcher(marks.on_change, on_marker=marks.on_marker, debounce=0.05)
    w.set_roots({root: kind})
    tmp = root / "tmp_step_3"
    tmp.mkdir()
    wait_until(lambda: w.watch_count() == 2, timeout=TIMEOUT)
    assert marks.wait(lambda: root in marks.changed)  # the new dir's own (debounced) pass
    with marks.cond:
        marks.changed.clear()
    write_marker(tmp, ".complete")
    assert marks.wait(lambda: (root, tmp) in marks.marked)
    assert marks.wait(lambda: root in marks.changed)


def test_a_save_created_after_a_pass_listed_the_root_keeps_its_watch(
    tmp_path: Path, make_watcher: Callable[..., RootWatcher]
) -> None:
    """A pass that listed the root before ``tmp_step_N`` appeared used to drop its new watch
    (``set_in_flight`` without it): its marker then waited for the debounced pass."""
    root = tmp_path / "run"
    root.mkdir()
    marks = Marks()
    w = make_watcher(marks.on_change, debounce=SLOW)  # only a marker's own trigger is prompt
    w.set_roots({root: "inotify"})
    tmp = root / "tmp_step_3"
    tmp.mkdir()
    wait_until(lambda: w.watch_count() == 2, timeout=TIMEOUT)
    w.set_in_flight(root, [])  # the pass's listing did not have it yet
    assert w.watch_count() == 2
    write_marker(tmp, ".complete")
    assert marks.wait(lambda: root in marks.changed, timeout=SLOW / 3)


# -- a partial scan without a listing ----------------------------------------------------------


def later_clock(seconds: float) -> Callable[[], int]:
    """A wall clock ``seconds`` ahead: a listing made now counts as made that long after the
    root's last change (`ckptkeeper.info.Listing`), without waiting for it."""
    return lambda: time.time_ns() + int(seconds * 1e9)


def same_records(root: Path, part: RootScan, steps: set[int]) -> None:
    full = scan_root(root)
    assert part.steps == tuple(c for c in full.steps if c.step in steps)
    assert part.in_flight == tuple(t for t in full.in_flight if t.step in steps)
    assert part.leftovers == tuple(o for o in full.leftovers if o.step in steps)
    by_path = sorted((a for a in full.anomalies if a.step in steps), key=str)
    assert sorted(part.anomalies, key=str) == by_path
    assert part.ambiguous_steps == full.ambiguous_steps & steps


def test_an_unchanged_root_is_not_listed_and_odd_spellings_are_still_seen(tmp_path: Path) -> None:
    root = tmp_path / "run"
    fleet(root, 30)
    save(root, "step_07", 7.0)  # step 7 ambiguous; step 12 spelled only oddly
    save(root, "step_012", 12.0)
    shutil.rmtree(root / "step_12")
    save(root, "tmp_step_7", 0.7, marked=True)
    save(root, "tmp_step_12", 1.2, marked=True)
    save(root, "tmp_step_31", 3.1, marked=True)
    (root / "old_step_31").symlink_to(root / "step_1")
    cache = InfoCache(clock_ns=later_clock(60))
    scan_root(root, cache=cache)  # a full scan: its listing is trusted
    for steps in ({7}, {12}, {31}, {7, 12, 31}, {99}):
        part = scan_root(root, cache=cache, steps=steps)
        same_records(root, part, steps)
    assert cache.listing_hits == 5
    assert scan_root(root, cache=cache, steps={7}).ambiguous_steps == {7}


def test_a_changed_root_or_a_listing_made_too_soon_is_listed_again(tmp_path: Path) -> None:
    root = tmp_path / "run"
    fleet(root, 5)
    save(root, "tmp_step_9", 0.9, marked=True)
    cache = InfoCache(clock_ns=later_clock(60))
    scan_root(root, cache=cache)
    save(root, "step_09", 9.0)  # created since the listing: the root changed
    save(root, "step_9", 9.5)
    part = scan_root(root, cache=cache, steps={9})
    assert cache.listing_hits == 0 and part.ambiguous_steps == {9}
    same_records(root, part, {9})
    fresh = InfoCache()  # the real clock: a listing right after the root changed
    scan_root(root, cache=fresh)
    scan_root(root, cache=fresh, steps={9})
    assert fresh.listing_hits == 0


def test_finalize_marked_on_an_unchanged_root_lists_nothing(tmp_path: Path) -> None:
    root = tmp_path / "run"
    fleet(root, 100)
    tmp = save(root, "tmp_step_101", 0.1, marked=True)
    cache = InfoCache(clock_ns=later_clock(60))
    assert reconcile(root, POLICY, cache=cache).status == "ok"  # (it finalizes step 101 too)
    tmp = save(root, "tmp_step_102", 0.1)
    cache = InfoCache(clock_ns=later_clock(60))
    scan_root(root, cache=cache)
    write_marker(tmp, ".complete")  # inside the tmp dir: the root is unchanged
    report = finalize_marked(tmp, POLICY, cache=cache)
    assert report is not None and [o.status for o in report.outcomes] == ["done"]
    assert cache.listing_hits == 1 and (root / "step_102").is_dir()


def test_a_marked_saves_policy_reads_no_config_yaml(tmp_path: Path) -> None:
    """Recovery ranks nothing: the marker's pass resolves the root's settings without walking
    the newest steps' config.yaml (which lists the root), as a full pass does."""
    from ckptkeeperd.config import config_from_flags
    from ckptkeeperd.resolver import SettingsResolver
    from ckptkeeperd.roots import expand

    root = tmp_path / "run"
    fleet(root, 3)
    for n in (1, 2, 3):
        (root / f"step_{n}" / "config.yaml").write_text("checkpointing:\n  metric_name: val_loss\n")
    (root / "ckptkeeper.toml").write_text('complete_marker = ".done"\n')
    config = config_from_flags([str(root)], {"keep_top_k": 2})
    [(found, overrides)] = expand(config)
    resolver = SettingsResolver()
    policy = resolver.recovery_policy(config, found, overrides)
    assert policy.complete_marker == ".done" and resolver.yaml.parses == 0
    assert resolver.resolve(config, found, overrides).settings.policy.metric_name == "val_loss"
    assert resolver.yaml.parses == 1


class CountingNemo:
    """The nemo-rl layout, counting the names it parses or spells (a cost that would grow
    with the root)."""

    def __init__(self) -> None:
        from ckptkeeper.layouts import get_layout

        self.inner = get_layout("nemo-rl")
        self.calls = 0
        for attr in ("name", "default_marker", "info_file", "pin_file", "writer_lock"):
            setattr(self, attr, getattr(self.inner, attr))
        self.config_file = self.inner.config_file

    def parse(self, name: str) -> object:
        self.calls += 1
        return self.inner.parse(name)

    def format(self, kind: object, step: int) -> str:
        self.calls += 1
        return self.inner.format(kind, step)  # type: ignore[arg-type]

    def glob(self, kind: object) -> str:
        return self.inner.glob(kind)  # type: ignore[arg-type]

    def pointers(self, root: Path) -> dict[int, str]:
        return {}


def test_a_changed_root_classifies_only_the_names_new_to_its_listing(tmp_path: Path) -> None:
    """The marker right after the mkdir of its tmp dir: the root changed since the last full
    listing, so it is listed again, but only names the listing did not classify as step
    directories are classified (not every step of the root), with the records of a full scan."""
    root = tmp_path / "run"
    fleet(root, 200)
    save(root, "step_07", 7.0)  # step 7 ambiguous, known to the listing
    layout = CountingNemo()
    cache = InfoCache(clock_ns=later_clock(60))
    scan_root(root, cache=cache, layout=layout)  # type: ignore[arg-type]
    save(root, "tmp_step_7", 0.7, marked=True)  # the root changes after the listing
    save(root, "tmp_step_201", 2.0, marked=True)
    save(root, "step_012", 12.0)  # a new odd spelling: step 12 now ambiguous
    shutil.rmtree(root / "step_5")  # gone since the listing
    save(root, "tmp_step_5", 0.5, marked=True)
    for steps in ({7}, {12}, {201}, {5}, {7, 12, 201, 5}, {99}):
        layout.calls = 0
        part = scan_root(root, cache=cache, steps=steps, layout=layout)  # type: ignore[arg-type]
        assert layout.calls <= 8 * len(steps) + 10, layout.calls  # not ~200
        same_records(root, part, steps)
    assert cache.listing_hits == 0
    assert scan_root(root, cache=cache, steps={12}).ambiguous_steps == {12}
    assert scan_root(root, cache=cache, steps={7}).ambiguous_steps == {7}
