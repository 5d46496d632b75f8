"""DirPoller, look and changes against real directories: one thread polls them all."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileSystemEvent,
)

from ckptkeeperd.poller import DirPoller, DirState, Polled, changes, look

TIMEOUT = 10.0


class Seen:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.events: list[FileSystemEvent] = []

    def __call__(self, polled: Polled, found: list[FileSystemEvent]) -> None:
        with self.cond:
            self.events.extend(found)
            self.cond.notify_all()

    def wait_for(self, event: FileSystemEvent) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: event in self.events, TIMEOUT), self.events


@pytest.fixture
def poller() -> Iterator[DirPoller]:
    p = DirPoller(0.05, name="test-poller")
    yield p
    p.stop()


def test_look_lists_names_inodes_and_types_and_stamps_only_what_is_asked(tmp_path: Path) -> None:
    (tmp_path / "step_1").mkdir()
    (tmp_path / "ckptkeeper.toml").write_text("keep_top_k = 1\n")
    (tmp_path / "link").symlink_to(tmp_path / "step_1")
    state = look(str(tmp_path), stamp=frozenset({"ckptkeeper.toml", "absent"}))
    st = os.lstat(tmp_path)
    assert state.identity == (st.st_dev, st.st_ino)
    assert state.entries == {
        "step_1": (os.lstat(tmp_path / "step_1").st_ino, True),
        "ckptkeeper.toml": (os.lstat(tmp_path / "ckptkeeper.toml").st_ino, False),
        "link": (os.lstat(tmp_path / "link").st_ino, False),  # never followed
    }
    toml = os.lstat(tmp_path / "ckptkeeper.toml")
    assert state.stamps == {"ckptkeeper.toml": (toml.st_mtime_ns, toml.st_size)}
    assert look(str(tmp_path / "missing")) == DirState(None)
    assert look(str(tmp_path / "link")) == DirState(None)  # a symlink is no directory here


def test_a_look_at_one_name_reads_nothing_else_of_a_big_directory(tmp_path: Path) -> None:
    for i in range(200):
        (tmp_path / f"__{i}_0.distcp").touch()
    identity = look(str(tmp_path), ".complete").identity
    assert look(str(tmp_path), ".complete") == DirState(identity, {})
    (tmp_path / ".complete").touch()
    ino = os.lstat(tmp_path / ".complete").st_ino
    assert look(str(tmp_path), ".complete", identity=identity).entries == {
        ".complete": (ino, False)
    }
    assert len(look(str(tmp_path)).entries) == 201


def test_changes_are_created_deleted_replaced_modified_or_the_dir_gone(tmp_path: Path) -> None:
    d = str(tmp_path)
    old = DirState((1, 2), {"a": (10, False), "b": (11, True), "c": (12, False)}, {"c": (5, 1)})
    new = DirState((1, 2), {"b": (13, True), "c": (12, False), "e": (14, True)}, {"c": (6, 1)})
    assert changes(d, old, new) == [
        FileDeletedEvent(os.path.join(d, "a")),
        DirDeletedEvent(os.path.join(d, "b")),  # same name, another inode: replaced
        DirCreatedEvent(os.path.join(d, "b")),
        FileModifiedEvent(os.path.join(d, "c")),
        DirCreatedEvent(os.path.join(d, "e")),
    ]
    assert changes(d, old, old) == []
    assert changes(d, old, DirState(None)) == [DirDeletedEvent(d)]
    assert changes(d, old, DirState((1, 3), old.entries)) == [DirDeletedEvent(d)]


def test_a_polled_dir_reports_what_changes_and_ends_when_it_goes(
    tmp_path: Path, poller: DirPoller
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    (root / "ckptkeeper.toml").write_text("keep_top_k = 1\n")
    seen = Seen()
    polled = poller.add(str(root), seen, stamp=frozenset({"ckptkeeper.toml"}))
    (root / "tmp_step_1").mkdir()  # after add(): its first look was taken, this is news
    seen.wait_for(DirCreatedEvent(str(root / "tmp_step_1")))
    (root / "ckptkeeper.toml").write_text("keep_top_k = 2 # edited in place\n")
    seen.wait_for(FileModifiedEvent(str(root / "ckptkeeper.toml")))
    (root / "tmp_step_1").rename(root / "step_1")
    seen.wait_for(DirDeletedEvent(str(root / "tmp_step_1")))
    seen.wait_for(DirCreatedEvent(str(root / "step_1")))
    (root / "step_1").rmdir()
    (root / "ckptkeeper.toml").unlink()
    root.rmdir()
    seen.wait_for(DirDeletedEvent(str(root)))
    assert not polled.alive and poller.count() == 0


def test_a_polled_tmp_dir_is_asked_its_marker_name_at_every_look(
    tmp_path: Path, poller: DirPoller
) -> None:
    seen = Seen()
    marker = [".complete"]
    poller.add(str(tmp_path), seen, only=lambda: marker[0])
    (tmp_path / "shard.bin").touch()  # not the marker: never looked at
    marker[0] = "DONE"  # the root's marker name changed
    (tmp_path / "DONE").touch()
    seen.wait_for(FileCreatedEvent(str(tmp_path / "DONE")))
    assert seen.events == [FileCreatedEvent(str(tmp_path / "DONE"))]


def test_add_refuses_a_missing_dir_and_remove_stops_its_polls(
    tmp_path: Path, poller: DirPoller
) -> None:
    with pytest.raises(FileNotFoundError):
        poller.add(str(tmp_path / "missing"), Seen())
    quiet, barrier = tmp_path / "quiet", tmp_path / "barrier"
    quiet.mkdir()
    barrier.mkdir()
    quiet_seen, barrier_seen = Seen(), Seen()
    poller.remove(poller.add(str(quiet), quiet_seen))
    poller.add(str(barrier), barrier_seen)
    (quiet / "x").touch()
    (barrier / "x").touch()
    barrier_seen.wait_for(FileCreatedEvent(str(barrier / "x")))
    (barrier / "y").touch()  # a whole poll round later: quiet would have been looked at
    barrier_seen.wait_for(FileCreatedEvent(str(barrier / "y")))
    assert quiet_seen.events == []


def test_thousands_of_polled_dirs_take_one_thread(tmp_path: Path) -> None:
    dirs = [tmp_path / f"tmp_step_{i}" for i in range(2000)]
    for d in dirs:
        d.mkdir()
    threads = threading.active_count()
    p = DirPoller(0.05)
    try:
        seen = Seen()
        for d in dirs:
            p.add(str(d), seen, only=lambda: ".complete")
        assert threading.active_count() == threads + 1 and p.count() == 2000
        (dirs[-1] / ".complete").touch()
        seen.wait_for(FileCreatedEvent(str(dirs[-1] / ".complete")))
    finally:
        p.stop()
    assert threading.active_count() == threads
    with pytest.raises(OSError):
        p.add(str(dirs[0]), Seen())
