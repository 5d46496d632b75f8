"""InotifyReader against the real kernel: one fd and one thread for many watches.

Every test waits on a condition (what the callback recorded), never a fixed sleep.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.userns import inotify_limited, userns_unavailable
from tests.watching import inotify_wd_count

from ckptkeeperd.inotify import (
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_ISDIR,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    InotifyReader,
    Watch,
)

TIMEOUT = 10.0
NAMES = {
    IN_CREATE: "create",
    IN_CLOSE_WRITE: "close_write",
    IN_MOVED_FROM: "moved_from",
    IN_MOVED_TO: "moved_to",
    IN_DELETE: "delete",
    IN_DELETE_SELF: "delete_self",
    IN_IGNORED: "ignored",
}


class Heard:
    """What callbacks heard, as (label, kind, name); waitable."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.events: list[tuple[str, str, str]] = []
        self.overflows = 0

    def callback(self, label: str) -> object:
        def on_event(watch: Watch, mask: int, name: str) -> None:
            kinds = [k for bit, k in NAMES.items() if mask & bit]
            kind = "+".join(kinds) + ("/dir" if mask & IN_ISDIR else "")
            with self.cond:
                self.events.append((label, kind, name))
                self.cond.notify_all()

        return on_event

    def on_overflow(self) -> None:
        with self.cond:
            self.overflows += 1
            self.cond.notify_all()

    def wait_for(self, item: tuple[str, str, str]) -> list[tuple[str, str, str]]:
        with self.cond:
            assert self.cond.wait_for(lambda: item in self.events, TIMEOUT), self.events
            return list(self.events)


@pytest.fixture
def heard() -> Heard:
    return Heard()


@pytest.fixture
def reader(heard: Heard) -> Iterator[InotifyReader]:
    r = InotifyReader(heard.on_overflow, name="test-inotify")
    yield r
    r.stop()


def test_create_write_moves_and_delete_arrive_in_order(
    tmp_path: Path, reader: InotifyReader, heard: Heard
) -> None:
    watched, outside = tmp_path / "w", tmp_path / "outside"
    watched.mkdir()
    outside.mkdir()
    (outside / "in").write_text("x")
    mask = IN_CREATE | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE
    reader.add(str(watched), mask, heard.callback("w"))
    (watched / "a").write_text("a")  # create, then close after writing
    (watched / "a").rename(watched / "b")  # a move inside: both halves
    (watched / "b").rename(outside / "b")  # moved away
    (outside / "in").rename(watched / "in")  # moved in
    (watched / "sub").mkdir()
    (watched / "in").unlink()
    events = heard.wait_for(("w", "delete", "in"))
    assert events == [
        ("w", "create", "a"),
        ("w", "close_write", "a"),
        ("w", "moved_from", "a"),
        ("w", "moved_to", "b"),
        ("w", "moved_from", "b"),
        ("w", "moved_to", "in"),
        ("w", "create/dir", "sub"),
        ("w", "delete", "in"),
    ]


def test_a_watched_dir_removed_ends_its_watch_with_in_ignored(
    tmp_path: Path, reader: InotifyReader, heard: Heard
) -> None:
    watched = tmp_path / "w"
    watched.mkdir()
    before = inotify_wd_count()
    watch = reader.add(str(watched), IN_DELETE_SELF, heard.callback("w"))
    assert watch.alive and reader.watch_count() == 1 and inotify_wd_count() == before + 1
    watched.rmdir()
    events = heard.wait_for(("w", "ignored", ""))
    assert events == [("w", "delete_self", ""), ("w", "ignored", "")]
    assert not watch.alive
    assert reader.watch_count() == 0 and inotify_wd_count() == before
    reader.remove(watch)  # already ended: a no-op


def test_two_paths_to_one_dir_share_a_wd_and_each_hears_its_own_mask(
    tmp_path: Path, reader: InotifyReader, heard: Heard
) -> None:
    real = tmp_path / "real" / "d"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")  # a symlink above: the same inode
    before = inotify_wd_count()
    creates = reader.add(str(real), IN_CREATE, heard.callback("creates"))
    deletes = reader.add(str(tmp_path / "link" / "d"), IN_DELETE, heard.callback("deletes"))
    assert (
        creates.wd == deletes.wd and reader.watch_count() == 1 and inotify_wd_count() == before + 1
    )
    (real / "f").touch()
    (real / "f").unlink()
    assert heard.wait_for(("deletes", "delete", "f")) == [
        ("creates", "create", "f"),
        ("deletes", "delete", "f"),
    ]
    reader.remove(creates)  # the other subscription keeps the kernel's watch
    assert inotify_wd_count() == before + 1
    (real / "g").touch()
    (real / "g").unlink()
    assert heard.wait_for(("deletes", "delete", "g"))[-1] == ("deletes", "delete", "g")
    assert ("creates", "create", "g") not in heard.events
    reader.remove(deletes)
    assert reader.watch_count() == 0 and inotify_wd_count() == before


def test_add_refuses_what_is_not_a_directory_and_never_follows_a_symlink(
    tmp_path: Path, reader: InotifyReader, heard: Heard
) -> None:
    (tmp_path / "file").touch()
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "dir")
    expected = {"missing": {errno.ENOENT}, "file": {errno.ENOTDIR}, "link": {errno.ENOTDIR}}
    for name, errnos in expected.items():
        with pytest.raises(OSError) as caught:
            reader.add(str(tmp_path / name), IN_CREATE, heard.callback(name))
        assert caught.value.errno in errnos, (name, caught.value)
    assert reader.watch_count() == 0


def test_a_full_kernel_queue_calls_on_overflow_and_events_flow_again(
    tmp_path: Path, reader: InotifyReader, heard: Heard
) -> None:
    queue_max = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if queue_max > 200_000:
        pytest.skip(f"fs.inotify.max_queued_events is {queue_max}: too many files to overflow it")
    watched = tmp_path / "w"
    watched.mkdir()
    entered, release = threading.Event(), threading.Event()

    def blocking(watch: Watch, mask: int, name: str) -> None:
        if name == "first":
            entered.set()
            assert release.wait(TIMEOUT)  # the reader is held here while the queue fills
        heard.callback("w")(watch, mask, name)

    reader.add(str(watched), IN_CREATE, blocking)
    (watched / "first").touch()
    assert entered.wait(TIMEOUT)
    for i in range(queue_max + 10):
        os.mknod(watched / f"f{i}")
    release.set()
    with heard.cond:
        assert heard.cond.wait_for(lambda: heard.overflows == 1, TIMEOUT)
    (watched / "after").touch()
    heard.wait_for(("w", "create", "after"))


def test_thousands_of_watches_take_one_thread_and_stop_returns_every_fd(
    tmp_path: Path, heard: Heard
) -> None:
    dirs = [tmp_path / f"tmp_step_{i}" for i in range(2000)]
    for d in dirs:
        d.mkdir()
    threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
    r = InotifyReader(heard.on_overflow)
    try:
        for d in dirs:
            r.add(str(d), IN_CREATE, heard.callback(d.name))
        assert threading.active_count() == threads + 1
        assert len(os.listdir("/proc/self/fd")) == fds + 3  # the inotify fd and a wake pipe
        assert r.watch_count() == 2000
        (dirs[-1] / ".complete").touch()
        heard.wait_for(("tmp_step_1999", "create", ".complete"))
    finally:
        r.stop()
    assert threading.active_count() == threads
    assert len(os.listdir("/proc/self/fd")) == fds
    with pytest.raises(OSError):
        r.add(str(dirs[0]), IN_CREATE, heard.callback("late"))
    r.stop()  # idempotent


def test_a_failing_callback_is_logged_and_the_reader_goes_on(
    tmp_path: Path, reader: InotifyReader, heard: Heard, caplog: pytest.LogCaptureFixture
) -> None:
    bad, good = tmp_path / "bad", tmp_path / "good"
    bad.mkdir()
    good.mkdir()

    def boom(watch: Watch, mask: int, name: str) -> None:
        raise RuntimeError("boom")

    reader.add(str(bad), IN_CREATE, boom)
    reader.add(str(good), IN_CREATE, heard.callback("good"))
    (bad / "x").touch()
    (good / "y").touch()
    heard.wait_for(("good", "create", "y"))
    assert "inotify callback failed" in caplog.text


_ENOSPC_CHILD = """
import errno, json, sys
from ckptkeeperd.inotify import IN_CREATE, InotifyReader
r = InotifyReader(lambda: None)
out = []
added = []
for d in sys.argv[1:]:
    try:
        added.append(r.add(d, IN_CREATE, lambda *a: None))
        out.append("ok")
    except OSError as exc:
        out.append(errno.errorcode[exc.errno])
r.remove(added[0])
r.add(sys.argv[-1], IN_CREATE, lambda *a: None)
out.append("ok after remove")
r.stop()
print(json.dumps(out))
"""


def test_add_raises_enospc_when_the_users_watches_run_out(tmp_path: Path) -> None:
    reason = userns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    dirs = [tmp_path / f"d{i}" for i in range(4)]
    for d in dirs:
        d.mkdir()
    proc = subprocess.run(
        inotify_limited([sys.executable, "-c", _ENOSPC_CHILD, *map(str, dirs)], watches=2),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["ok", "ok", "ENOSPC", "ENOSPC", "ok after remove"]
