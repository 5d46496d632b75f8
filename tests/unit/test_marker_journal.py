"""Marker -> visible without listing the root (issue 9, item 1: flat from 100 to 5,000 steps).

The root's inotify watch journals the names created in it (`ckptkeeperd.journal`); a full
listing takes a mark; the marker's partial scan looks at its step's spellings and the names
created since the mark, never at a listing of the root, and decides as a full pass would. The
root's listings are counted with an audit hook (``os.listdir``/``os.scandir`` raise audit
events): nothing is patched.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import wait_until
from tests.helpers import write_named_save as save
from tests.watching import watchers

from ckptkeeper import InfoCache, Policy, scan_root, write_marker
from ckptkeeper.plan import Action, plan
from ckptkeeperd.journal import MAX_NAMES, RootJournal
from ckptkeeperd.reconcile import finalize_marked, reconcile
from ckptkeeperd.watch import RootWatcher

TIMEOUT = 10.0
POLICY = Policy(keep_top_k=None, metric_name="val_loss")
_LISTED: list[str] | None = None  # the paths listed while a test counts (`listings`)


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _LISTED is not None and event in ("os.listdir", "os.scandir") and args:
        _LISTED.append(str(args[0]))


sys.addaudithook(_audit)


@pytest.fixture
def listings() -> Iterator[list[str]]:
    global _LISTED
    _LISTED = []
    try:
        yield _LISTED
    finally:
        _LISTED = None


class Quiet:
    """A logger that drops everything (the test looks at the reports)."""

    def bind(self, **_: Any) -> Quiet:
        return self

    def __getattr__(self, _: str) -> Callable[..., None]:
        return lambda *a, **k: None


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, InfoCache, RootWatcher]]:
    """A root of 300 steps watched by inotify, its cache's journal the watcher, after a full
    pass (which listed it and took a mark)."""
    root = tmp_path / "run"
    for n in range(1, 301):
        save(root, f"step_{n}", float(n))
    save(root, "step_07", 7.0)  # step 7 spelled twice: known to the listing
    with watchers() as make:
        w = make(lambda _root: None, on_marker=lambda _root, _tmp: None)
        cache = InfoCache()  # the real clock: the listing is not trusted (the root changed)
        cache.journal = w.journals
        w.set_roots({root: "inotify"})
        assert reconcile(root, POLICY, cache=cache, log=Quiet()).status == "ok"
        yield root, cache, w


def decision(
    root: Path, tmp: Path, cache: InfoCache, listings: list[str]
) -> tuple[Action, Action, int]:
    """The decision on ``tmp`` of a full plan, then of the marker's pass, and how many times
    that pass listed the root."""
    full = plan(scan_root(root), POLICY, 0.0)
    [expected] = [d.action for d in full.decisions if d.path == tmp]
    listings.clear()
    report = finalize_marked(tmp, POLICY, cache=cache, log=Quiet())
    assert report is not None and report.plan is not None
    [fast] = [d.action for d in report.plan.decisions if d.path == tmp]
    return fast, expected, listings.count(str(root))


def test_a_marked_save_in_a_watched_root_is_finalized_without_listing_it(
    watched: tuple[Path, InfoCache, RootWatcher], listings: list[str]
) -> None:
    root, cache, _ = watched
    for step in (301, 302, 303):  # marker right after mkdir: the root changed since its listing
        tmp = save(root, f"tmp_step_{step}", 0.1, marked=True)
        report = finalize_marked(tmp, POLICY, cache=cache, log=Quiet())
        assert report is not None
        assert [(o.decision.action, o.status) for o in report.outcomes] == [
            (Action.FINALIZE, "done")
        ]
        assert (root / f"step_{step}").is_dir()
    assert listings == []
    assert cache.listing_hits == 3


def test_names_created_since_the_listing_are_seen_without_listing_the_root(
    watched: tuple[Path, InfoCache, RootWatcher], listings: list[str]
) -> None:
    root, cache, _ = watched
    save(root, "step_0301", 3.01)  # step 301 only spelled oddly, created after the listing
    tmp = save(root, "tmp_step_301", 0.1, marked=True)
    assert decision(root, tmp, cache, listings) == (Action.REPLACE, Action.REPLACE, 0)
    save(root, "tmp_step_0302", 3.02)  # two spellings of one save: ambiguous, left alone
    tmp = save(root, "tmp_step_302", 0.2, marked=True)
    assert decision(root, tmp, cache, listings) == (Action.IGNORE, Action.IGNORE, 0)
    tmp = save(root, "tmp_step_7", 0.7, marked=True)  # step 7's odd name: the listing's
    assert decision(root, tmp, cache, listings) == (Action.WAIT, Action.WAIT, 0)
    tmp = save(root, "tmp_step_3", 0.3, marked=True)
    (root / "step_3").rename(root / "old_step_3")  # an interrupted replace, after the listing
    assert decision(root, tmp, cache, listings) == (Action.FINALIZE, Action.FINALIZE, 0)
    assert (root / "step_3").is_dir() and not (root / "old_step_3").exists()


def test_names_still_queued_when_the_marker_is_handled_are_read_first(
    tmp_path: Path, listings: list[str]
) -> None:
    """The reader thread is busy (it runs the first marker's callback, held here) while a new
    spelling of step 302 is created: the marker's pass of step 302 waits for the queued events
    to be read (``InotifyReader.barrier``), so it sees that name as a listing would."""
    root = tmp_path / "run"
    for n in range(1, 51):
        save(root, f"step_{n}", float(n))
    held, release = threading.Event(), threading.Event()

    def on_marker(_root: Path, tmp: Path) -> None:
        if tmp.name == "tmp_step_301":
            held.set()
            release.wait(TIMEOUT)

    with watchers() as make:
        w = make(lambda _root: None, on_marker=on_marker)
        cache = InfoCache()
        cache.journal = w.journals
        w.set_roots({root: "inotify"})
        assert reconcile(root, POLICY, cache=cache, log=Quiet()).status == "ok"
        first = save(root, "tmp_step_301", 0.1)
        wait_until(lambda: w.watch_count() == 2, timeout=TIMEOUT)
        write_marker(first, ".complete")  # seen by the reader thread, which is then held
        assert held.wait(TIMEOUT)
        save(root, "tmp_step_0302", 3.02)  # queued, not read yet
        tmp = save(root, "tmp_step_302", 0.2, marked=True)
        full = plan(scan_root(root), POLICY, 0.0)
        assert [d.action for d in full.decisions if d.path == tmp] == [Action.IGNORE]
        threading.Timer(0.2, release.set).start()  # after the marker's pass began waiting
        try:
            report = finalize_marked(tmp, POLICY, cache=cache, log=Quiet())
        finally:
            release.set()
    assert report is not None and report.plan is not None
    assert [d.action for d in report.plan.decisions if d.path == tmp] == [Action.IGNORE]
    assert tmp.is_dir() and not (root / "step_302").exists()


def test_a_root_mounted_over_after_its_listing_is_listed_again(
    watched: tuple[Path, InfoCache, RootWatcher], tmp_path: Path, listings: list[str]
) -> None:
    """No event tells of a mount over the watched directory: the journal is another
    directory's, so the marker's pass lists the root."""
    root, cache, _ = watched
    other = tmp_path / "other"
    save(other, "tmp_step_0301", 3.01)
    tmp = save(other, "tmp_step_301", 0.1, marked=True)
    subprocess.run(["mount", "--bind", str(other), str(root)], check=True)
    try:
        want = (Action.IGNORE, Action.IGNORE, 1)
        assert decision(root, root / tmp.name, cache, listings) == want
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_a_root_whose_watch_ended_is_listed_again(
    watched: tuple[Path, InfoCache, RootWatcher], tmp_path: Path, listings: list[str]
) -> None:
    root, cache, w = watched
    w.set_roots({})  # no longer watched: its journal ended
    save(root, "tmp_step_0301", 3.01)
    tmp = save(root, "tmp_step_301", 0.1, marked=True)
    assert decision(root, tmp, cache, listings) == (Action.IGNORE, Action.IGNORE, 1)


# -- the journal's bookkeeping ---------------------------------------------------------------


def test_a_journal_answers_from_a_mark_until_events_are_lost_or_it_ends() -> None:
    me = (1, 2)
    j = RootJournal(me, lambda _timeout: True)
    first = j.mark(me)
    assert first == 0 and j.mark((1, 3)) is None  # another directory
    j.record("tmp_step_5")
    second = j.mark(me)
    assert second is not None
    j.record("step_05")
    assert j.since(first, me, 1.0) == ["tmp_step_5", "step_05"]
    assert j.since(second, me, 1.0) == ["step_05"]
    third = j.mark(me)  # the listing but one began at ``second``: ``first`` is let go
    assert third is not None
    assert j.since(first, me, 1.0) is None and j.since(second, me, 1.0) == ["step_05"]
    j.restart()  # IN_Q_OVERFLOW: what was created meanwhile is not known
    assert j.since(third, me, 1.0) is None
    fourth = j.mark(me)
    assert fourth is not None
    j.record("step_6")
    assert j.since(fourth, me, 1.0) == ["step_6"]
    for n in range(MAX_NAMES + 1):  # a burst: the oldest half goes, its mark with it
        j.record(f"x{n}")
    assert j.since(fourth, me, 1.0) is None
    j.end()
    assert j.mark(me) is None


def test_a_journal_whose_events_cannot_be_read_in_time_answers_none() -> None:
    me = (1, 2)
    j = RootJournal(me, lambda _timeout: False)
    at = j.mark(me)
    assert at is not None and j.since(at, me, 0.1) is None


def test_a_step_in_the_way_of_a_marked_save_makes_it_wait_as_in_a_full_pass(
    tmp_path: Path, listings: list[str]
) -> None:
    """A ``step_N`` that is not a directory stands where the save would be finalized: the
    marker's pass plans what a full pass plans (wait, blocked), not a finalize that the
    executor then refuses."""
    root = tmp_path / "run"
    for n in range(1, 4):
        save(root, f"step_{n}", float(n))
    (root / "step_5").symlink_to(root / "step_1")
    tmp = save(root, "tmp_step_5", 0.5, marked=True)
    assert decision(root, tmp, InfoCache(), listings)[:2] == (Action.WAIT, Action.WAIT)
    report = finalize_marked(tmp, POLICY, log=Quiet())
    assert report is not None and report.outcomes == [] and report.plan is not None
    [d] = [d for d in report.plan.decisions if d.path == tmp]
    assert d.blocked is Action.FINALIZE and (root / "step_5").is_symlink() and tmp.is_dir()
