"""RootWatcher / Debouncer / resolve_observer against real temp dirs, real inotify and polling.

Synchronisation is always by waiting on a condition (an Event, or a predicate polled until a
deadline), never by sleeping a fixed time and hoping.
"""

from __future__ import annotations

import functools
import itertools
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.helpers import wait_until
from tests.userns import inotify_limited, userns_unavailable
from tests.watching import Recorder, inotify_wd_count, watchers
from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
)

from ckptkeeper import write_marker
from ckptkeeper.scan import writer_lock_held
from ckptkeeperd import inotify as ino
from ckptkeeperd.fstype import ObserverChooser, filesystem_type, is_network_fs
from ckptkeeperd.hints import Debouncer, Hint, event_hint, from_inotify
from ckptkeeperd.watch import RootWatcher, resolve_observer

KINDS = ["inotify", "polling"]
TIMEOUT = 10.0
SLOW = 30.0  # a debounce no test waits for: a callback well before it was not debounced


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def make_watcher(rec: Recorder) -> Iterator[Callable[..., RootWatcher]]:
    with watchers(on_problem=rec.on_problem, debounce=0.05, polling_interval=0.2) as make:
        yield functools.partial(make, rec.on_change)


def settle_initial_trigger(rec: Recorder, root: Path) -> None:
    """A new tmp watch triggers its root once; consume that so later changes are the test's."""
    assert rec.wait_change(root)
    rec.clear()


# -- Debouncer ---------------------------------------------------------------------------------


def test_debouncer_coalesces_a_burst_of_triggers_into_one_callback() -> None:
    calls: list[Path] = []
    fired = {k: threading.Event() for k in ("a", "b")}

    def callback(key: Path) -> None:
        calls.append(key)
        fired[key.name].set()

    deb = Debouncer(callback, delay=0.1, max_delay=5.0)
    try:
        for _ in range(50):
            deb.trigger(Path("a"))
        assert fired["a"].wait(TIMEOUT)
        # Barrier: "b" is triggered after every "a" with the same delay, so a second "a" callback,
        # if any, would be due before "b"'s and would have run first (one thread, in order).
        deb.trigger(Path("b"))
        assert fired["b"].wait(TIMEOUT)
    finally:
        deb.stop()
    assert calls == [Path("a"), Path("b")]


def test_debouncer_fires_by_max_delay_under_a_continuous_stream() -> None:
    fired_at: list[float] = []
    fired = threading.Event()

    def callback(key: Path) -> None:
        fired_at.append(time.monotonic())
        fired.set()

    deb = Debouncer(callback, delay=0.2, max_delay=0.5)
    triggers: list[float] = []
    try:
        # A stream with 20 ms gaps never gives the 200 ms of quiet the delay asks for.
        while not fired.is_set() and len(triggers) < 1000:
            triggers.append(time.monotonic())
            deb.trigger(Path("r"))
            fired.wait(0.02)
    finally:
        deb.stop()
    assert fired_at, "no callback under a continuous stream"
    assert fired_at[0] - triggers[0] < 0.5 + 0.5  # max_delay, plus scheduling slack
    before = [t for t in triggers if t < fired_at[0]]
    if max(b - a for a, b in itertools.pairwise(before)) < 0.2:
        assert fired_at[0] - triggers[0] >= 0.5 - 0.01  # no quiet gap: only max_delay fires it


def test_debouncer_stop_drops_pending_triggers_and_joins_its_thread() -> None:
    calls: list[Path] = []
    before = set(threading.enumerate())
    deb = Debouncer(calls.append, delay=5.0, max_delay=5.0)
    deb.trigger(Path("r"))
    deb.stop()
    deb.trigger(Path("r"))  # after stop: ignored, no error
    assert calls == []
    assert set(threading.enumerate()) <= before


def test_debouncer_trigger_now_fires_at_once_even_inside_a_burst() -> None:
    fired = threading.Event()
    calls: list[Path] = []

    def callback(key: Path) -> None:
        calls.append(key)
        fired.set()

    deb = Debouncer(callback, delay=SLOW, max_delay=SLOW)
    try:
        deb.trigger(Path("r"))  # a debounced burst is pending...
        deb.trigger(Path("r"), now=True)  # ...the marker makes it due at once
        deb.trigger(Path("r"))  # and a later event in the burst does not push it back
        assert fired.wait(TIMEOUT)
    finally:
        deb.stop()
    assert calls == [Path("r")]  # one callback for the whole burst


# -- events that matter ------------------------------------------------------------------------


def test_changes_in_a_root_outside_the_own_area_are_debounced_hints(tmp_path: Path) -> None:
    root = tmp_path
    tmp = root / "tmp_step_3"
    own = root / ".ckptkeeper"
    soon = [
        DirCreatedEvent(str(root / "step_3")),
        DirMovedEvent(str(tmp), str(root / "step_3")),
        DirMovedEvent(str(root / "step_1"), str(own / "trash" / "1-step_1")),  # a delete
        DirDeletedEvent(str(root / "step_1")),
        DirDeletedEvent(str(root)),  # the root itself went
        FileCreatedEvent(str(root / "step_4")),  # not a checkpoint, but reported by a pass
        FileModifiedEvent(str(root / "ckptkeeper.toml")),  # the run's policy, edited in place
        FileClosedEvent(str(root / "ckptkeeper.toml")),
    ]
    none = [
        DirCreatedEvent(str(own)),
        DirCreatedEvent(str(own / "trash")),
        DirMovedEvent(str(own / "trash" / "a"), str(own / "trash" / "b")),
        FileOpenedEvent(str(root / "ckptkeeper.toml")),
        FileClosedNoWriteEvent(str(root / "ckptkeeper.toml")),
        DirModifiedEvent(str(root / "step_1")),
        DirAttribEvent(str(root / "step_1")),
        FileModifiedEvent(str(root / "train.log")),  # a log the trainer appends to
        FileClosedEvent(str(root / "train.log")),
    ]
    assert [event_hint(root, root, e) for e in soon] == [Hint.SOON] * len(soon)
    assert [event_hint(root, root, e) for e in none] == [Hint.NONE] * len(none)


def test_in_a_tmp_dir_only_the_marker_arriving_is_a_hint_and_it_is_immediate(
    tmp_path: Path,
) -> None:
    root = tmp_path
    tmp = root / "tmp_step_3"
    now = [
        FileCreatedEvent(str(tmp / ".complete")),
        FileMovedEvent(str(tmp / ".complete.tmp-1-2"), str(tmp / ".complete")),  # write_marker
    ]
    none = [  # the trainer writing its save, and the marker going away again
        FileCreatedEvent(str(tmp / "weights.pt")),
        FileModifiedEvent(str(tmp / "weights.pt")),
        FileClosedEvent(str(tmp / "weights.pt")),
        FileAttribEvent(str(tmp / "weights.pt")),
        FileCreatedEvent(str(tmp / ".complete.tmp-1-2")),
        FileClosedEvent(str(tmp / ".complete")),  # after its creation, already a hint
        FileMovedEvent(str(tmp / ".complete"), str(tmp / "complete.bak")),
        FileDeletedEvent(str(tmp / ".complete")),
        DirCreatedEvent(str(tmp / ".complete")),
        DirCreatedEvent(str(tmp / "policy")),
        DirModifiedEvent(str(tmp)),
        DirDeletedEvent(str(tmp)),  # the root's watch reports this
    ]
    assert [event_hint(root, tmp, e) for e in now] == [Hint.NOW] * len(now)
    assert [event_hint(root, tmp, e) for e in none] == [Hint.NONE] * len(none)
    # the root's own marker name counts, no other
    assert event_hint(root, tmp, FileCreatedEvent(str(tmp / "DONE")), "DONE") is Hint.NOW
    assert event_hint(root, tmp, FileCreatedEvent(str(tmp / ".complete")), "DONE") is Hint.NONE
    # a layout's commit file arriving in a checkpoint written in place: a pass soon
    state = FileCreatedEvent(str(tmp / "trainer_state.json"))
    assert event_hint(root, tmp, state, ".complete", ("trainer_state.json",)) is Hint.SOON
    assert event_hint(root, tmp, state, ".complete") is Hint.NONE


def test_inotify_events_stand_for_the_events_event_hint_reads(tmp_path: Path) -> None:
    w = tmp_path / "run"
    f, d = str(w / "x"), str(w / "x")
    cases = [
        (ino.IN_CREATE, "x", FileCreatedEvent(f)),
        (ino.IN_CREATE | ino.IN_ISDIR, "x", DirCreatedEvent(d)),
        (ino.IN_MOVED_TO, "x", FileCreatedEvent(f)),  # a rename's new name
        (ino.IN_MOVED_TO | ino.IN_ISDIR, "x", DirCreatedEvent(d)),
        (ino.IN_MOVED_FROM | ino.IN_ISDIR, "x", DirDeletedEvent(d)),  # a rename's old name
        (ino.IN_DELETE, "x", FileDeletedEvent(f)),
        (ino.IN_CLOSE_WRITE, "x", FileClosedEvent(f)),
        (ino.IN_DELETE_SELF, "", DirDeletedEvent(str(w))),  # the watched dir: its watch is dead
        (ino.IN_MOVE_SELF, "", DirDeletedEvent(str(w))),
        (ino.IN_IGNORED, "", DirDeletedEvent(str(w))),
        (ino.IN_CLOSE_WRITE | ino.IN_ISDIR, "x", None),
    ]
    assert [from_inotify(w, mask, name) for mask, name, _ in cases] == [e for _, _, e in cases]


def test_without_the_marker_name_any_new_file_in_a_tmp_dir_is_a_debounced_hint(
    tmp_path: Path,
) -> None:
    root = tmp_path
    tmp = root / "tmp_step_3"
    # set_roots() without markers: the root may use another name; .complete is still immediate
    assert event_hint(root, tmp, FileCreatedEvent(str(tmp / ".complete")), None) is Hint.NOW
    assert event_hint(root, tmp, FileCreatedEvent(str(tmp / "DONE")), None) is Hint.SOON
    assert event_hint(root, tmp, FileMovedEvent(str(tmp / "a"), str(tmp / "b")), None) is Hint.SOON
    assert event_hint(root, tmp, FileModifiedEvent(str(tmp / "DONE")), None) is Hint.NONE


def test_own_area_activity_and_reads_by_a_pass_do_not_trigger_a_reconcile(
    tmp_path: Path, rec: Recorder, make_watcher: Callable[..., RootWatcher]
) -> None:
    quiet, barrier = tmp_path / "quiet", tmp_path / "barrier"
    tmp = quiet / "tmp_step_1"
    tmp.mkdir(parents=True)
    barrier.mkdir()
    (quiet / "ckptkeeper.toml").write_text("keep_top_k = 1\n")
    (tmp / ".writer.lock").touch()
    w = make_watcher()
    w.set_roots({quiet: "inotify", barrier: "inotify"})
    w.set_in_flight(quiet, [tmp])
    settle_initial_trigger(rec, quiet)
    # What a pass does besides real changes: its own area, reading config, probing writer locks.
    (quiet / ".ckptkeeper" / "trash").mkdir(parents=True)
    (quiet / ".ckptkeeper" / "lock").touch()
    (quiet / "ckptkeeper.toml").read_text()
    assert writer_lock_held(tmp) is False
    # inotify delivers in order through one fd, and the same debounce delay would have fired
    # a quiet-root callback before barrier's.
    (barrier / "step_1").mkdir()
    assert rec.wait_change(barrier)
    assert quiet not in rec.changes


# -- markers and in-flight saves ---------------------------------------------------------------


@pytest.mark.parametrize("writer", ["create", "write_marker"])
@pytest.mark.parametrize("kind", KINDS)
def test_marker_event_enqueues_its_root_without_waiting_for_the_debounce(
    kind: str,
    writer: str,
    tmp_path: Path,
    rec: Recorder,
    make_watcher: Callable[..., RootWatcher],
) -> None:
    root = tmp_path / "run"
    tmp = root / "tmp_step_3"
    tmp.mkdir(parents=True)
    w = make_watcher(debounce=SLOW)
    w.set_roots({root: kind}, markers={root: ".complete"})
    w.set_in_flight(root, [tmp])
    assert w.watch_count() == 2
    if writer == "create":
        (tmp / ".complete").write_text('{"pid": 1}')
    else:
        write_marker(tmp, ".complete")  # a temp name renamed into place
    assert rec.wait_change(root)  # well before SLOW
    assert rec.changes_of(root) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_marker_already_there_when_the_tmp_watch_starts_enqueues_at_once(
    kind: str, tmp_path: Path, rec: Recorder, make_watcher: Callable[..., RootWatcher]
) -> None:
    root = tmp_path / "run"
    done, busy = root / "tmp_step_3", root / "tmp_step_4"
    busy.mkdir(parents=True)
    done.mkdir()
    (done / "DONE").touch()
    (busy / ".complete").touch()  # not this root's marker
    w = make_watcher(debounce=SLOW)
    w.set_roots({root: kind}, markers={root: "DONE"})
    w.set_in_flight(root, [busy])
    w.set_in_flight(root, [busy, done])
    assert rec.wait_change(root)
    assert rec.changes_of(root) == 1


def test_files_written_in_a_tmp_dir_enqueue_nothing(
    tmp_path: Path, rec: Recorder, make_watcher: Callable[..., RootWatcher]
) -> None:
    quiet, barrier = tmp_path / "quiet", tmp_path / "barrier"
    tmp = quiet / "tmp_step_1"
    tmp.mkdir(parents=True)
    barrier.mkdir()
    w = make_watcher()
    w.set_roots({quiet: "inotify", barrier: "inotify"}, markers={quiet: ".complete"})
    w.set_in_flight(quiet, [tmp])  # its marker's name is known and it is not there: no pass
    # A trainer writing its save: files created, written, renamed, chmod-ed, removed, subdirs.
    for i in range(20):
        (tmp / f"shard_{i}.tmp").write_bytes(b"w" * 4096)
        (tmp / f"shard_{i}.tmp").rename(tmp / f"shard_{i}.bin")
    (tmp / "shard_0.bin").chmod(0o600)
    (tmp / "shard_1.bin").unlink()
    (tmp / "policy" / "weights").mkdir(parents=True)
    (tmp / "policy" / "weights" / "w.pt").write_bytes(b"w")
    # Barrier: one inotify fd delivers in order, and the same debounce delay would have fired a
    # quiet-root callback before barrier's.
    (barrier / "step_1").mkdir()
    assert rec.wait_change(barrier)
    assert quiet not in rec.changes


def test_a_polled_tmp_dir_hints_only_its_marker_however_big_the_save(
    tmp_path: Path, rec: Recorder, make_watcher: Callable[..., RootWatcher]
) -> None:
    quiet, barrier = tmp_path / "quiet", tmp_path / "barrier"
    tmp, barrier_tmp = quiet / "tmp_step_1", barrier / "tmp_step_1"
    tmp.mkdir(parents=True)
    barrier_tmp.mkdir(parents=True)
    for i in range(200):
        (tmp / f"__{i}_0.distcp").touch()
    w = make_watcher(debounce=SLOW)
    w.set_roots(dict.fromkeys([quiet, barrier], "polling"), markers={quiet: ".complete"})
    w.set_in_flight(quiet, [tmp])
    w.set_in_flight(barrier, [barrier_tmp])  # polled after quiet's tmp dir in every round
    (tmp / "__200_0.distcp").touch()  # the save goes on: not news
    (tmp / "__0_0.distcp").unlink()
    (barrier_tmp / ".complete").touch()
    assert rec.wait_change(barrier)  # a round that looked at quiet's tmp dir after the writes
    assert quiet not in rec.changes
    (tmp / ".complete").touch()
    assert rec.wait_change(quiet)  # at once, although a debounced change would take SLOW
    assert rec.changes_of(quiet) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_tmp_step_created_after_start_is_watched_without_waiting_for_the_daemon(
    kind: str, tmp_path: Path, rec: Recorder, make_watcher: Callable[..., RootWatcher]
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    w = make_watcher()
    w.set_roots({root: kind})
    (root / "tmp_step_3").mkdir()
    (root / "not_a_step").mkdir()
    wait_until(lambda: w.watch_count() == 2, timeout=TIMEOUT)
    settle_initial_trigger(rec, root)
    (root / "tmp_step_3" / ".complete").write_text("{}")
    assert rec.wait_change(root)


def test_in_flight_set_drops_gone_tmp_dirs_and_finalized_ones(
    tmp_path: Path, make_watcher: Callable[..., RootWatcher]
) -> None:
    root = tmp_path / "run"
    tmps = [root / f"tmp_step_{n}" for n in (1, 2, 3)]
    for t in tmps:
        t.mkdir(parents=True)
    (root / "tmp_step_9").symlink_to(tmps[0])
    w = make_watcher()
    w.set_roots({root: "inotify"})
    w.set_in_flight(root, [*tmps, root / "tmp_step_9", root / "tmp_step_7"])
    assert w.watch_count() == 4  # the symlink and the missing dir are not watched
    # Not listed but still there (a pass lists the root before a new save appears): kept.
    w.set_in_flight(root, tmps[:1])
    assert w.watch_count() == 4
    shutil.rmtree(tmps[2])
    w.set_in_flight(root, tmps[:2])  # listed or gone: tmp_step_3's watch goes
    assert w.watch_count() == 3
    tmps[1].rename(root / "step_2")  # finalize: the root watch sees the move and drops the watch
    tmps[0].rename(root / "step_1")
    wait_until(lambda: w.watch_count() == 1, timeout=TIMEOUT)
    with pytest.raises(ValueError, match="not directly inside"):
        w.set_in_flight(root, [tmp_path / "elsewhere" / "tmp_step_1"])
    w.set_in_flight(tmp_path / "unknown-root", [])  # not a watched root: nothing to do


# -- cost: O(roots + in-flight saves) ----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_files_written_deep_inside_a_step_add_no_watches(
    kind: str, tmp_path: Path, rec: Recorder, make_watcher: Callable[..., RootWatcher]
) -> None:
    root = tmp_path / "run"
    (root / "tmp_step_2").mkdir(parents=True)
    w = make_watcher()
    w.set_roots({root: kind})
    w.set_in_flight(root, [root / "tmp_step_2"])
    settle_initial_trigger(rec, root)
    deep = root / "step_1" / "a" / "b"
    deep.mkdir(parents=True)
    (deep / "c.bin").write_bytes(b"x" * 1024)
    (root / "tmp_step_2" / "x" / "y").mkdir(parents=True)
    assert rec.wait_change(root)  # step_1's creation was seen...
    assert w.watch_count() == 2  # ...and nothing below it (or below tmp_step_2) got a watch


def test_watch_count_is_roots_plus_in_flight_tmp_dirs(
    tmp_path: Path, make_watcher: Callable[..., RootWatcher]
) -> None:
    roots = [tmp_path / f"run{i}" for i in range(3)]
    for r in roots:
        (r / "tmp_step_1").mkdir(parents=True)
        (r / "tmp_step_2").mkdir()
    w = make_watcher()
    w.set_roots({roots[0]: "inotify", roots[1]: "polling", roots[2]: "inotify"})
    w.set_in_flight(roots[0], [roots[0] / "tmp_step_1", roots[0] / "tmp_step_2"])
    w.set_in_flight(roots[1], [roots[1] / "tmp_step_2"])
    assert w.watch_count() == 3 + 3
    w.set_roots({roots[1]: "polling", roots[2]: "inotify"})  # run0 and its tmp watches go
    assert w.watch_count() == 2 + 1
    w.set_in_flight(roots[1], [])  # still there (new since the pass listed the root?): kept
    assert w.watch_count() == 2 + 1
    shutil.rmtree(roots[1] / "tmp_step_2")
    w.set_in_flight(roots[1], [])
    assert w.watch_count() == 2


def test_inotify_watches_stay_proportional_to_roots_and_in_flight_saves(
    tmp_path: Path, make_watcher: Callable[..., RootWatcher]
) -> None:
    roots = [tmp_path / f"run{i:02d}" for i in range(20)]
    for r in roots:
        for step in range(1, 6):
            leaf = r / f"step_{step}" / "policy" / "weights"
            leaf.mkdir(parents=True)
            for n in range(3):
                (leaf / f"shard{n}.bin").write_bytes(b"w")
        (r / "tmp_step_6" / "policy").mkdir(parents=True)
    before = inotify_wd_count()
    w = make_watcher()
    w.set_roots(dict.fromkeys(roots, "inotify"))
    for r in roots:
        w.set_in_flight(r, [r / "tmp_step_6"])
    assert w.watch_count() == 20 + 20
    assert inotify_wd_count() - before == 20 + 20  # 20 roots x 5 steps x 3 levels would be 300+
    for r in roots:  # more nested writes: still no new watch
        (r / "step_5" / "policy" / "weights" / "extra.bin").write_bytes(b"w")
    assert inotify_wd_count() - before == 40
    w.stop()
    assert inotify_wd_count() == before


# -- roots that vanish, come back, are replaced or appear late ---------------------------------


def tmp_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("tmp_step_*") if p.is_dir() and not p.is_symlink())


@pytest.mark.parametrize("kind", KINDS)
def test_root_deleted_then_recreated_is_watched_again_after_set_roots(
    kind: str, tmp_path: Path, rec: Recorder, make_watcher: Callable[..., RootWatcher]
) -> None:
    root = tmp_path / "run"
    (root / "step_1").mkdir(parents=True)
    w = make_watcher()
    w.set_roots({root: kind})
    shutil.rmtree(root)
    wait_until(lambda: w.watch_count() == 0, timeout=TIMEOUT)
    root.mkdir()  # on ext4/tmpfs this usually gets the old inode number back
    w.set_roots({root: kind})
    assert w.watch_count() == 1
    # Only events from the new directory can make the watcher add this tmp watch by itself.
    (root / "tmp_step_2").mkdir()
    wait_until(lambda: w.watch_count() == 2, timeout=TIMEOUT)
    assert [reason for _, reason in rec.problems] == ["missing (not watched until it appears)"]


@pytest.mark.parametrize("kind", KINDS)
def test_root_replaced_in_a_flash_converges_to_a_live_watch(
    kind: str, tmp_path: Path, make_watcher: Callable[..., RootWatcher]
) -> None:
    root = tmp_path / "run"
    (root / "step_1").mkdir(parents=True)
    changes: list[Path] = []
    changed = threading.Condition()

    w: RootWatcher

    def daemon_pass(r: Path) -> None:  # what the daemon does on a change: reconcile, report tmp
        w.set_in_flight(r, tmp_dirs(r))
        with changed:
            changes.append(r)
            changed.notify_all()

    w = RootWatcher(daemon_pass, debounce=0.05, polling_interval=0.2)
    try:
        w.set_roots({root: kind})
        shutil.rmtree(root)
        root.mkdir()
        w.set_roots({root: kind})  # may still see the old watch alive on a reused inode number
        (root / "tmp_step_2").mkdir()
        # Either the new watch saw the tmp dir, or the rewatch triggered a pass that reported it.
        wait_until(lambda: w.watch_count() == 2, timeout=TIMEOUT)
        with changed:
            changes.clear()
        (root / "tmp_step_2" / ".complete").write_text("{}")
        with changed:
            assert changed.wait_for(lambda: root in changes, TIMEOUT)
    finally:
        w.stop()


def test_root_renamed_away_is_unwatched_at_once_and_reported(
    tmp_path: Path, rec: Recorder, make_watcher: Callable[..., RootWatcher]
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    w = make_watcher()
    w.set_roots({root: "inotify"})
    root.rename(tmp_path / "run.old")  # its watch would follow the inode to run.old
    assert rec.wait_change(root)
    wait_until(lambda: w.watch_count() == 0, timeout=TIMEOUT)  # without waiting for set_roots
    assert [reason for _, reason in rec.problems] == ["missing (not watched until it appears)"]


@pytest.mark.parametrize("kind", KINDS)
def test_root_deleted_is_unwatched_and_reported_once(
    kind: str, tmp_path: Path, rec: Recorder, make_watcher: Callable[..., RootWatcher]
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    w = make_watcher()
    w.set_roots({root: kind})
    root.rmdir()
    assert rec.wait_change(root)  # the deletion is a hint too
    wait_until(
        lambda: w.watch_count() == 0, timeout=TIMEOUT
    )  # dropped without waiting for set_roots
    w.set_roots({root: kind})
    w.set_roots({root: kind})
    assert [p for p in rec.problems if p[0] == root] == [(root, rec.problems[0][1])]
    assert "missing" in rec.problems[0][1]


def test_root_replaced_by_a_symlink_is_reported_once_and_others_keep_working(
    tmp_path: Path, rec: Recorder, make_watcher: Callable[..., RootWatcher]
) -> None:
    root, other, target = tmp_path / "run", tmp_path / "other", tmp_path / "target"
    for d in (root, other, target):
        d.mkdir()
    w = make_watcher()
    w.set_roots({root: "inotify", other: "inotify"})
    root.rename(tmp_path / "run.old")
    root.symlink_to(target)
    for _ in range(3):
        w.set_roots({root: "inotify", other: "inotify"})
    # The rename away may be reported first, at once, from the root's own IN_MOVE_SELF event
    # ("missing"); the symlink then once, however often the roots are set again.
    assert {path for path, _ in rec.problems} == {root}
    reasons = [why for _, why in rec.problems]
    assert [why for why in reasons if "symlink" in why] == [reasons[-1]]
    assert all("missing" in why for why in reasons[:-1]) and len(reasons) <= 2
    assert w.watch_count() == 1
    (other / "tmp_step_1").mkdir()
    wait_until(lambda: w.watch_count() == 2, timeout=TIMEOUT)


def test_root_that_appears_after_start_is_watched_on_the_next_set_roots(
    tmp_path: Path, rec: Recorder, make_watcher: Callable[..., RootWatcher]
) -> None:
    root = tmp_path / "later"
    w = make_watcher()
    w.set_roots({root: "inotify"})
    w.set_roots({root: "inotify"})
    assert w.watch_count() == 0
    assert len(rec.problems) == 1
    root.mkdir()
    w.set_roots({root: "inotify"})
    assert w.watch_count() == 1
    (root / "tmp_step_1").mkdir()
    wait_until(lambda: w.watch_count() == 2, timeout=TIMEOUT)


def test_one_bad_root_never_makes_set_roots_raise(
    tmp_path: Path, rec: Recorder, make_watcher: Callable[..., RootWatcher]
) -> None:
    good, afile = tmp_path / "good", tmp_path / "file"
    good.mkdir()
    afile.write_text("x")
    w = make_watcher()
    w.set_roots(
        {afile: "inotify", tmp_path / "gone": "polling", good: "bogus", tmp_path: "polling"}
    )
    assert w.watch_count() == 1
    assert sorted(str(p[0]) for p in rec.problems) == sorted(
        [str(afile), str(tmp_path / "gone"), str(good)]
    )


_NO_INOTIFY_CHILD = """
import json, sys, time
from pathlib import Path
from ckptkeeperd.watch import RootWatcher
root = Path(sys.argv[1])
problems = []
w = RootWatcher(
    lambda r: None, polling_interval=0.05, on_problem=lambda r, why: problems.append(why)
)
w.set_roots({root: "inotify"})
w.set_roots({root: "inotify"})
(root / "tmp_step_4").mkdir()  # seen by polling the root
deadline = time.monotonic() + 10
while w.watch_count() < 2 and time.monotonic() < deadline:
    time.sleep(0.01)
print(json.dumps({"watches": w.watch_count(), "problems": problems}))
w.stop()
"""


def test_inotify_failure_falls_back_to_polling_and_is_reported(tmp_path: Path) -> None:
    reason = userns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path / "run"
    root.mkdir()
    # No inotify instance left for this user (fs.inotify.max_user_instances): EMFILE.
    command = [sys.executable, "-c", _NO_INOTIFY_CHILD, str(root)]
    proc = subprocess.run(
        inotify_limited(command, instances=0), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["watches"] == 2
    assert result["problems"] == ["inotify unusable (Too many open files); polling instead"]


def test_on_change_errors_are_reported_not_fatal(tmp_path: Path) -> None:
    problems: list[tuple[Path, str]] = []
    reported = threading.Event()

    def on_problem(root: Path, reason: str) -> None:
        problems.append((root, reason))
        reported.set()

    def on_change(root: Path) -> None:
        raise RuntimeError("boom")

    root = tmp_path / "run"
    root.mkdir()
    w = RootWatcher(on_change, debounce=0.02, on_problem=on_problem)
    try:
        w.set_roots({root: "inotify"})
        (root / "step_1").mkdir()
        assert reported.wait(TIMEOUT)
    finally:
        w.stop()
    assert problems[0][0] == root
    assert "boom" in problems[0][1]


# -- lifecycle ---------------------------------------------------------------------------------


def test_stop_joins_every_thread_quickly(tmp_path: Path, rec: Recorder) -> None:
    before = set(threading.enumerate())
    roots = [tmp_path / f"run{i}" for i in range(4)]
    for r in roots:
        (r / "tmp_step_1").mkdir(parents=True)
    w = RootWatcher(rec.on_change, polling_interval=5.0, on_problem=rec.on_problem)
    w.set_roots({r: ("inotify" if i % 2 else "polling") for i, r in enumerate(roots)})
    for r in roots:
        w.set_in_flight(r, [r / "tmp_step_1"])
    (roots[1] / "step_1").mkdir()
    names = sorted(t.name for t in set(threading.enumerate()) - before)
    assert names == [
        "ckptkeeper-debounce",
        "ckptkeeper-inotify",
        "ckptkeeper-poller",
        "ckptkeeper-watch",
    ]
    start = time.monotonic()
    w.stop()
    assert time.monotonic() - start < 2.0
    assert set(threading.enumerate()) - before == set()
    w.stop()  # idempotent
    w.set_roots({roots[0]: "inotify"})  # after stop: a no-op, starts nothing
    assert set(threading.enumerate()) - before == set()


# -- resolve_observer --------------------------------------------------------------------------


def test_auto_picks_inotify_for_a_root_on_local_disk(tmp_path: Path) -> None:
    if is_network_fs(filesystem_type(tmp_path)):
        pytest.skip(f"{tmp_path} is on {filesystem_type(tmp_path)}, not a local filesystem")
    assert resolve_observer(tmp_path, "auto") == "inotify"


def test_auto_picks_polling_on_network_or_unknown_filesystems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unknown(path: object) -> str:
        raise LookupError("no mount")

    for fstype in (lambda path: "nfs4", lambda path: "fuse.sshfs", unknown):
        assert ObserverChooser(lookup=fstype)(tmp_path, "auto") == "polling"


def test_resolve_observer_reads_mountinfo_once_per_known_root(
    tmp_path: Path,
) -> None:
    looked_up: list[Path] = []

    def counting(path: Path) -> str:
        looked_up.append(path)
        return "ext4" if path.name != "nfs" else "nfs4"

    chooser = ObserverChooser(lookup=counting)
    local, nfs, missing = tmp_path / "local", tmp_path / "nfs", tmp_path / "missing"
    local.mkdir()
    nfs.mkdir()
    for _ in range(5):  # every refresh of the daemon's roots
        assert chooser(local, "auto") == "inotify"
        assert chooser(nfs, "auto") == "polling"
    assert looked_up == [local, nfs]
    chooser(missing, "auto")
    chooser(missing, "auto")
    assert looked_up.count(missing) == 2  # nothing to key on: looked up each time, not cached


def test_explicit_observer_settings_are_kept_and_bad_ones_rejected(tmp_path: Path) -> None:
    assert resolve_observer(tmp_path, "inotify") == "inotify"
    assert resolve_observer(tmp_path, "polling") == "polling"
    with pytest.raises(ValueError, match="observer must be"):
        resolve_observer(tmp_path, "fsevents")
