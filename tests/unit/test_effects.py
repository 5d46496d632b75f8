"""Safe filesystem effects on real temp dirs: remove_tree, RootLock, markers, trash, writer lock."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from ckptkeeper.effects import (
    Fs,
    RootLock,
    move_to_trash,
    write_marker,
    writer_lock,
)
from ckptkeeper.removal import Pacing, remove_tree
from ckptkeeper.scan import parse_trash_name, trash_dir, writer_lock_held


def build_tree(top: Path, fanout: int = 3, depth: int = 3, files: int = 4) -> tuple[int, int, int]:
    """A nested tree; returns (files, dirs including top, bytes)."""
    n_files = n_dirs = n_bytes = 0

    def fill(d: Path, level: int) -> None:
        nonlocal n_files, n_dirs, n_bytes
        d.mkdir()
        n_dirs += 1
        for i in range(files):
            data = os.urandom(17 * (i + level + 1))
            (d / f"f{i}.bin").write_bytes(data)
            n_files += 1
            n_bytes += len(data)
        if level < depth:
            for j in range(fanout):
                fill(d / f"d{j}", level + 1)

    fill(top, 0)
    (top / "empty_dir").mkdir()
    (top / ".hidden").write_bytes(b"xyz")
    return n_files + 1, n_dirs + 1, n_bytes + 3


def tree_listing(top: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames:
            out[str((Path(dirpath) / name).relative_to(top))] = None
        for name in filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(top))] = p.read_bytes()
    return out


# -- remove_tree ---------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2, 8])
def test_remove_tree_removes_a_nested_tree_and_counts_it(tmp_path: Path, workers: int) -> None:
    top = tmp_path / "victim"
    files, dirs, size = build_tree(top)
    (tmp_path / "sibling").write_text("stays")

    removal = remove_tree(top, workers=workers)

    assert not os.path.lexists(top)
    assert (removal.files, removal.dirs, removal.bytes) == (files, dirs, size)
    assert removal.left == []
    assert (tmp_path / "sibling").read_text() == "stays"


def test_remove_tree_of_a_missing_path_does_nothing(tmp_path: Path) -> None:
    removal = remove_tree(tmp_path / "nope")
    assert (removal.files, removal.dirs, removal.bytes, removal.left) == (0, 0, 0, [])


def test_remove_tree_of_a_regular_file_unlinks_it(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"12345")
    removal = remove_tree(f)
    assert not f.exists()
    assert (removal.files, removal.dirs, removal.bytes) == (1, 0, 5)


@pytest.mark.parametrize("workers", [1, 8])
def test_symlinks_inside_the_tree_are_unlinked_not_followed(tmp_path: Path, workers: int) -> None:
    outside = tmp_path / "outside"
    build_tree(outside, fanout=2, depth=2, files=2)
    before = tree_listing(outside)
    (tmp_path / "outside_file").write_text("keep me")
    top = tmp_path / "victim"
    build_tree(top, fanout=2, depth=1, files=1)
    (top / "link_to_dir").symlink_to(outside)
    (top / "d0" / "deep_link").symlink_to(outside / "d0")
    (top / "file_link").symlink_to(tmp_path / "outside_file")
    (top / "dangling").symlink_to(tmp_path / "missing")

    removal = remove_tree(top, workers=workers)

    assert not os.path.lexists(top)
    assert removal.left == []
    assert tree_listing(outside) == before
    assert (tmp_path / "outside_file").read_text() == "keep me"


def test_remove_tree_on_a_symlink_removes_only_the_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    build_tree(outside, fanout=1, depth=1, files=2)
    before = tree_listing(outside)
    link = tmp_path / "link"
    link.symlink_to(outside)

    removal = remove_tree(link)

    assert not os.path.lexists(link)
    assert tree_listing(outside) == before
    assert (removal.files, removal.dirs) == (1, 0)


class SwapOnFirstUnlink(Fs):
    """The first unlink swaps ``victim/sub`` for a symlink to ``outside`` (a hostile actor)."""

    def __init__(self, sub: Path, outside: Path, parked: Path) -> None:
        self.sub, self.outside, self.parked = sub, outside, parked
        self.swapped = False
        self._lock = threading.Lock()

    def unlink(self, path: str | Path, dir_fd: int | None = None) -> None:
        with self._lock:
            if not self.swapped:
                self.swapped = True
                os.rename(self.sub, self.parked)
                os.symlink(self.outside, self.sub)
        super().unlink(path, dir_fd=dir_fd)


@pytest.mark.parametrize("workers", [1, 8])
def test_directory_swapped_for_a_symlink_mid_removal_is_not_entered(
    tmp_path: Path, workers: int
) -> None:
    outside = tmp_path / "outside"
    build_tree(outside, fanout=2, depth=2, files=2)
    before = tree_listing(outside)
    top = tmp_path / "victim"
    top.mkdir()
    (top / "a_file").write_text("first unlink happens here")
    build_tree(top / "sub", fanout=1, depth=1, files=2)
    fs = SwapOnFirstUnlink(top / "sub", outside, tmp_path / "parked")

    removal = remove_tree(top, workers=workers, fs=fs)

    assert fs.swapped
    assert tree_listing(outside) == before  # nothing behind the link was touched
    assert not os.path.lexists(top)
    assert removal.left == []
    assert (tmp_path / "parked").is_dir()  # the real directory was moved away, not deleted


class BusyFs(Fs):
    """unlink/rmdir of ``name`` fails with EBUSY the first ``times`` attempts."""

    def __init__(self, name: str, times: int, op: str = "unlink") -> None:
        self.name, self.times, self.op = name, times, op
        self.attempts = 0

    def _busy(self, op: str, path: str | Path) -> None:
        if op == self.op and Path(path).name == self.name:
            self.attempts += 1
            if self.attempts <= self.times:
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))

    def unlink(self, path: str | Path, dir_fd: int | None = None) -> None:
        self._busy("unlink", path)
        super().unlink(path, dir_fd=dir_fd)

    def rmdir(self, path: str | Path, dir_fd: int | None = None) -> None:
        self._busy("rmdir", path)
        super().rmdir(path, dir_fd=dir_fd)


@pytest.mark.parametrize("op", ["unlink", "rmdir"])
@pytest.mark.parametrize("workers", [1, 8])
def test_ebusy_is_retried_then_succeeds(tmp_path: Path, op: str, workers: int) -> None:
    top = tmp_path / "victim"
    build_tree(top, fanout=2, depth=1, files=2)
    (top / "d0" / "busy.bin").write_text("busy")
    # One file (unlink) or one directory (rmdir) is busy twice.
    fs = BusyFs("busy.bin" if op == "unlink" else "d1", times=2, op=op)
    removal = remove_tree(top, workers=workers, fs=fs, busy_retries=3)
    assert not os.path.lexists(top)
    assert removal.left == []
    assert fs.attempts == 3  # two EBUSY, then success


def test_ebusy_gives_up_after_the_bounded_retries_and_reports(tmp_path: Path) -> None:
    top = tmp_path / "victim"
    (top / "sub").mkdir(parents=True)
    (top / "sub" / "busy.bin").write_text("held open elsewhere")
    (top / "sub" / "other.bin").write_text("fine")
    (top / "top.bin").write_text("fine")
    fs = BusyFs("busy.bin", times=10**9)

    removal = remove_tree(top, workers=1, fs=fs, busy_retries=2)

    assert fs.attempts == 3  # 1 try + 2 retries, not forever
    assert (top / "sub" / "busy.bin").exists()
    assert not (top / "sub" / "other.bin").exists()
    assert not (top / "top.bin").exists()
    left = dict(removal.left)
    assert left[str(top / "sub" / "busy.bin")].startswith("EBUSY")
    # The directories above it could not be removed either, and say why.
    assert left[str(top / "sub")].startswith("ENOTEMPTY")
    assert left[str(top)].startswith("ENOTEMPTY")


def test_leftover_nfs_silly_rename_files_are_cleared(tmp_path: Path) -> None:
    top = tmp_path / "victim"
    (top / "sub").mkdir(parents=True)
    (top / "sub" / "a.bin").write_text("a")

    class NfsFs(Fs):
        """Simulates NFS: unlinking a.bin leaves a .nfs file behind once."""

        done = False

        def rmdir(self, path: str | Path, dir_fd: int | None = None) -> None:
            if Path(path).name == "sub" and not self.done:
                self.done = True
                fd = os.open("sub", os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd)
                try:
                    os.close(os.open(".nfs000123", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
                finally:
                    os.close(fd)
            super().rmdir(path, dir_fd=dir_fd)

    removal = remove_tree(top, workers=1, fs=NfsFs())
    assert not os.path.lexists(top)
    assert removal.left == []


_HANG_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from ckptkeeper.effects import Fs
    from ckptkeeper.removal import remove_tree

    class RaiseInSubdir(Fs):
        def unlink(self, path, dir_fd=None):
            if Path(path).name == "boom.bin":
                raise RuntimeError("unexpected")
            super().unlink(path, dir_fd=dir_fd)

    print("ready", flush=True)
    removal = remove_tree(Path(sys.argv[1]), workers=4, fs=RaiseInSubdir())
    print("done", removal.left, flush=True)
    """
)


def test_remove_tree_does_not_hang_when_a_worker_fails_below_the_top(tmp_path: Path) -> None:
    top = tmp_path / "victim"
    (top / "sub").mkdir(parents=True)
    (top / "sub" / "boom.bin").write_text("x")
    # In a child process: a hung remove_tree must not leave threads behind in this one.
    child = subprocess.Popen(
        [sys.executable, "-c", _HANG_CHILD, str(top)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        try:
            child.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pytest.fail("remove_tree hung")
        out = child.stdout.read()
        assert out.startswith("done")
        assert "internal error" in out  # the failure is reported, not swallowed
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)


_RMDIR_HANG_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from ckptkeeper.effects import Fs
    from ckptkeeper.removal import remove_tree

    class RaiseOnRmdir(Fs):
        def rmdir(self, path, dir_fd=None):
            if Path(path).name == "sub":
                raise RuntimeError("unexpected")
            super().rmdir(path, dir_fd=dir_fd)

    print("ready", flush=True)
    removal = remove_tree(Path(sys.argv[1]), workers=int(sys.argv[2]), fs=RaiseOnRmdir())
    print("done", removal.left, flush=True)
    """
)


@pytest.mark.parametrize("workers", [1, 4])
def test_remove_tree_does_not_hang_when_an_rmdir_fails_unexpectedly(
    tmp_path: Path, workers: int
) -> None:
    top = tmp_path / "victim"
    (top / "sub" / "deeper").mkdir(parents=True)
    (top / "sub" / "deeper" / "f.bin").write_text("x")
    child = subprocess.Popen(
        [sys.executable, "-c", _RMDIR_HANG_CHILD, str(top), str(workers)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pytest.fail("remove_tree hung")
        out = child.stdout.read()
        assert out.startswith("done")
        assert "internal error" in out and "/sub'" in out
        assert not (top / "sub" / "deeper").exists()  # everything below it went
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)


@pytest.mark.parametrize("workers", [1, 4])
def test_without_count_bytes_everything_is_removed_and_counted_but_bytes(
    tmp_path: Path, workers: int
) -> None:
    top = tmp_path / "victim"
    files, dirs, _ = build_tree(top)
    (top / "link").symlink_to(tmp_path / "elsewhere")

    removal = remove_tree(top, workers=workers, count_bytes=False)

    assert not os.path.lexists(top)
    assert (removal.files, removal.dirs, removal.bytes) == (files + 1, dirs, 0)
    assert removal.left == []


def test_without_count_bytes_no_file_is_stat_ed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    top = tmp_path / "victim"
    build_tree(top, fanout=2, depth=1, files=3)
    stat_calls: list[str] = []
    real_scandir = os.scandir

    class CountingEntry:  # os.DirEntry is a C type: count its stat() through a wrapper
        def __init__(self, entry: os.DirEntry[str]) -> None:
            self._entry = entry
            self.name = entry.name

        def inode(self) -> int:
            return self._entry.inode()

        def is_dir(self, *, follow_symlinks: bool = True) -> bool:
            return self._entry.is_dir(follow_symlinks=follow_symlinks)

        def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
            stat_calls.append(self.name)
            return self._entry.stat(follow_symlinks=follow_symlinks)

    class CountingScandir:
        def __init__(self, fd: int) -> None:
            self._it = real_scandir(fd)

        def __enter__(self) -> CountingScandir:
            return self

        def __exit__(self, *exc: object) -> None:
            self._it.close()

        def __iter__(self) -> CountingScandir:
            return self

        def __next__(self) -> CountingEntry:
            return CountingEntry(next(self._it))

    monkeypatch.setattr(os, "scandir", CountingScandir)

    removal = remove_tree(top, workers=1, count_bytes=False)
    assert not os.path.lexists(top) and removal.left == []
    assert removal.files > 0 and stat_calls == []

    build_tree(top, fanout=2, depth=1, files=3)
    removal = remove_tree(top, workers=1)
    assert removal.bytes > 0 and len(stat_calls) == removal.files


class CancelAfter(Fs):
    """Sets ``cancel`` inside the ``after``-th unlink; counts every unlink."""

    def __init__(self, cancel: threading.Event, after: int) -> None:
        self.cancel, self.after = cancel, after
        self.unlinks = 0
        self._lock = threading.Lock()

    def unlink(self, path: str | Path, dir_fd: int | None = None) -> None:
        with self._lock:
            self.unlinks += 1
            if self.unlinks == self.after:
                self.cancel.set()
        super().unlink(path, dir_fd=dir_fd)


def test_cancel_set_before_the_start_removes_nothing_and_reports_the_top(tmp_path: Path) -> None:
    top = tmp_path / "victim"
    build_tree(top, fanout=2, depth=1, files=2)
    before = tree_listing(top)
    cancel = threading.Event()
    cancel.set()

    removal = remove_tree(top, workers=4, cancel=cancel)

    assert tree_listing(top) == before
    assert removal.left == [(str(top), "cancelled")]
    assert (removal.files, removal.dirs) == (0, 0)


@pytest.mark.parametrize("workers", [1, 4])
def test_cancel_stops_between_two_files_and_a_later_call_finishes(
    tmp_path: Path, workers: int
) -> None:
    top = tmp_path / "victim"
    files, dirs, size = build_tree(top, fanout=3, depth=2, files=20)
    cancel = threading.Event()
    fs = CancelAfter(cancel, after=5)

    first = remove_tree(top, workers=workers, fs=fs, cancel=cancel)

    # Each thread finishes at most the unlink it is in, then stops: no directory is finished.
    assert fs.unlinks <= 5 + workers
    assert first.files == fs.unlinks
    assert top.is_dir()
    left = dict(first.left)
    assert left[str(top)] == "cancelled"
    assert set(left.values()) == {"cancelled"}
    assert len(left) == len(first.left)  # each directory listed once

    second = remove_tree(top, workers=workers)
    assert not os.path.lexists(top)
    assert second.left == []
    assert (first.files + second.files, first.dirs + second.dirs) == (files, dirs)
    assert first.bytes + second.bytes == size


class SlowFs(Fs):
    """Each unlink waits ``delay`` seconds (a server round trip); records the threads used."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.threads: set[int] = set()

    def unlink(self, path: str | Path, dir_fd: int | None = None) -> None:
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)
        super().unlink(path, dir_fd=dir_fd)


def make_shards(top: Path, dirs: int, files: int) -> None:
    for d in range(dirs):
        (top / f"shard_{d:03d}").mkdir(parents=True)
        for i in range(files):
            (top / f"shard_{d:03d}" / f"f{i}").write_bytes(b"")


def test_slow_unlinks_add_threads_up_to_workers(tmp_path: Path) -> None:
    top = tmp_path / "victim"
    make_shards(top, dirs=48, files=10)
    fs = SlowFs(0.002)  # 2 ms per unlink: the threads wait, they do not work

    removal = remove_tree(top, workers=8, fs=fs, pacing=Pacing(cores=2))

    assert not os.path.lexists(top) and removal.left == []
    assert removal.files == 480
    assert len(fs.threads) == 8  # grew from 2 (one per core) to the bound


def test_quick_unlinks_stay_at_one_thread_per_core(tmp_path: Path) -> None:
    pacing = Pacing(cores=2, slow_op_s=0.05)  # no local unlink is that slow
    top = tmp_path / "victim"
    make_shards(top, dirs=100, files=10)
    fs = SlowFs(0.0)

    removal = remove_tree(top, workers=16, fs=fs, pacing=pacing)

    assert not os.path.lexists(top) and removal.left == []
    assert removal.files == 1000
    assert len(fs.threads) <= 2


def test_one_worker_runs_in_the_calling_thread(tmp_path: Path) -> None:
    top = tmp_path / "victim"
    make_shards(top, dirs=3, files=2)
    fs = SlowFs(0.0)
    remove_tree(top, workers=1, fs=fs)
    assert fs.threads == {threading.get_ident()}


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize("workers", [1, 4])
def test_a_wide_tree_holds_few_descriptors_open(tmp_path: Path, workers: int) -> None:
    top = tmp_path / "victim"
    for d in range(150):  # wide: 150 directories, each with two of its own
        for s in range(2):
            (top / f"d{d:03d}" / f"s{s}").mkdir(parents=True)
            (top / f"d{d:03d}" / f"s{s}" / "f").write_bytes(b"")
    baseline = len(os.listdir("/proc/self/fd"))

    class CountFds(Fs):
        most = 0

        def unlink(self, path: str | Path, dir_fd: int | None = None) -> None:
            CountFds.most = max(CountFds.most, len(os.listdir("/proc/self/fd")))
            super().unlink(path, dir_fd=dir_fd)

    removal = remove_tree(top, workers=workers, fs=CountFds())

    assert not os.path.lexists(top) and removal.left == []
    # Depth-first: about workers x depth directories open (plus scandir's own), not 150.
    assert CountFds.most - baseline <= 4 * (workers + 1)
    assert len(os.listdir("/proc/self/fd")) == baseline  # and all closed at the end


def test_an_interrupt_is_re_raised_after_every_descriptor_is_closed(tmp_path: Path) -> None:
    top = tmp_path / "victim"
    make_shards(top, dirs=5, files=5)

    class InterruptAt(Fs):
        calls = 0

        def unlink(self, path: str | Path, dir_fd: int | None = None) -> None:
            InterruptAt.calls += 1
            if InterruptAt.calls == 7:
                raise KeyboardInterrupt
            super().unlink(path, dir_fd=dir_fd)

    baseline = set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    with pytest.raises(KeyboardInterrupt):
        remove_tree(top, workers=1, fs=InterruptAt())
    assert InterruptAt.calls == 7  # nothing more was removed after it
    assert top.is_dir()
    if baseline is not None:
        assert set(os.listdir("/proc/self/fd")) == baseline
    assert remove_tree(top).left == []  # and a later call finishes the job
    assert not os.path.lexists(top)


# -- RootLock --------------------------------------------------------------------------------------


def test_root_lock_excludes_a_second_open_until_released(tmp_path: Path) -> None:
    first = RootLock(tmp_path)
    assert first.acquire() is True
    assert first.held
    assert (tmp_path / ".ckptkeeper" / "lock").is_file()
    second = RootLock(tmp_path, timeout=0)
    assert second.acquire() is False
    assert not second.held
    started = time.monotonic()
    assert RootLock(tmp_path, timeout=0.2).acquire() is False
    assert time.monotonic() - started >= 0.2
    first.release()
    assert not first.held
    assert second.acquire() is True
    second.release()
    first.release()  # releasing twice is harmless


def test_root_lock_context_manager_raises_when_busy(tmp_path: Path) -> None:
    with RootLock(tmp_path) as held:
        assert held.held
        with pytest.raises(BlockingIOError), RootLock(tmp_path, timeout=0):
            pass
    with RootLock(tmp_path, timeout=0) as again:
        assert again.held
    assert not again.held


def test_root_lock_waits_until_a_holder_releases(tmp_path: Path) -> None:
    holder = RootLock(tmp_path)
    holder.acquire()
    released = threading.Event()

    def release_later() -> None:
        released.wait()
        holder.release()

    t = threading.Thread(target=release_later)
    t.start()
    waiter = RootLock(tmp_path, timeout=30)
    released.set()
    assert waiter.acquire() is True
    waiter.release()
    t.join()


def test_root_lock_is_exclusive_across_processes(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import sys
        from ckptkeeper.effects import RootLock
        lock = RootLock(sys.argv[1])
        assert lock.acquire()
        print("locked", flush=True)
        sys.stdin.read()
        lock.release()
        print("released", flush=True)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == "locked\n"
        assert RootLock(tmp_path, timeout=0).acquire() is False
        child.stdin.close()
        waiter = RootLock(tmp_path, timeout=30)
        assert waiter.acquire() is True  # blocks until the child lets go
        waiter.release()
        assert child.stdout.readline() == "released\n"
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)


def test_root_lock_refuses_a_file_where_its_directory_should_be(tmp_path: Path) -> None:
    (tmp_path / ".ckptkeeper").write_text("not a dir")
    with pytest.raises(NotADirectoryError):
        RootLock(tmp_path).acquire()


# -- markers, writer lock, trash ----------------------------------------------------------------


def test_write_marker_writes_json_with_time_host_and_pid(tmp_path: Path) -> None:
    before = time.time()
    path = write_marker(tmp_path, ".complete", step=7)
    assert path == tmp_path / ".complete"
    assert path.is_file()
    payload = json.loads(path.read_text())
    assert before <= payload["time"] <= time.time()
    assert payload["host"] == socket.gethostname()
    assert payload["pid"] == os.getpid()
    assert payload["step"] == 7


def test_write_marker_goes_through_fs_and_syncs(tmp_path: Path) -> None:
    calls: list[str] = []

    class Recording(Fs):
        def open(
            self, path: str | Path, flags: int, mode: int = 0o644, dir_fd: int | None = None
        ) -> int:
            calls.append("open")
            return super().open(path, flags, mode, dir_fd)

        def write(self, fd: int, data: bytes) -> int:
            calls.append("write")
            return super().write(fd, data)

        def fsync(self, fd: int) -> None:
            calls.append("fsync")
            super().fsync(fd)

    write_marker(tmp_path, "DONE", fs=Recording())
    assert calls == ["open", "write", "fsync", "fsync"]  # file, then its directory


def test_write_marker_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    d = tmp_path / "tmp_step_1"
    d.mkdir()
    (d / ".complete").symlink_to(victim)
    write_marker(d, ".complete")
    assert victim.read_text() == "precious"
    assert (d / ".complete").is_file() and not (d / ".complete").is_symlink()
    assert sorted(os.listdir(d)) == [".complete"]  # no temporary left


def test_write_marker_survives_the_save_being_finalized_the_moment_it_appears(
    tmp_path: Path,
) -> None:
    d = tmp_path / "tmp_step_1"
    d.mkdir()
    finalized = tmp_path / "step_1"

    class FinalizeOnRename(Fs):
        def rename(self, src: Path, dst: Path) -> None:
            super().rename(src, dst)
            os.rename(d, finalized)  # a keeper pass lands right here

    write_marker(d, ".complete", fs=FinalizeOnRename())
    assert (finalized / ".complete").is_file()


@pytest.mark.parametrize("failing", ["write", "fsync", "rename"])
def test_write_marker_failure_leaves_no_marker_and_no_temporary(
    tmp_path: Path, failing: str
) -> None:
    d = tmp_path / "tmp_step_1"
    d.mkdir()

    class Failing(Fs):
        def write(self, fd: int, data: bytes) -> int:
            if failing == "write":
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(fd, data)

        def fsync(self, fd: int) -> None:
            if failing == "fsync":
                raise OSError(errno.EIO, "Input/output error")
            super().fsync(fd)

        def rename(self, src: Path, dst: Path) -> None:
            if failing == "rename":
                raise OSError(errno.EROFS, "Read-only file system")
            super().rename(src, dst)

    with pytest.raises(OSError):
        write_marker(d, ".complete", fs=Failing())
    assert os.listdir(d) == []


def test_writer_lock_context_is_seen_by_writer_lock_held(tmp_path: Path) -> None:
    assert writer_lock_held(tmp_path) is False
    with writer_lock(tmp_path):
        assert (tmp_path / ".writer.lock").is_file()
        assert writer_lock_held(tmp_path) is True
    assert writer_lock_held(tmp_path) is False


def test_move_to_trash_renames_into_the_trash_with_a_time_prefix(tmp_path: Path) -> None:
    victim = tmp_path / "step_3"
    victim.mkdir()
    (victim / "w.pt").write_text("w")
    before = time.time()
    dest = move_to_trash(tmp_path, victim)
    assert dest is not None
    assert dest.parent == trash_dir(tmp_path)
    assert dest.name.endswith("-step_3")
    when = parse_trash_name(dest.name)
    assert when is not None and before - 1 <= when <= time.time() + 1
    assert (dest / "w.pt").read_text() == "w"
    assert not victim.exists()


def test_move_to_trash_of_a_vanished_path_returns_none(tmp_path: Path) -> None:
    assert move_to_trash(tmp_path, tmp_path / "step_9") is None
    assert trash_dir(tmp_path).is_dir()
    assert list(trash_dir(tmp_path).iterdir()) == []


def test_move_to_trash_moves_a_symlink_itself_not_its_target(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("f")
    link = tmp_path / "root" / "step_1"
    link.parent.mkdir()
    link.symlink_to(outside)
    dest = move_to_trash(tmp_path / "root", link)
    assert dest is not None and dest.is_symlink()
    assert (outside / "f").read_text() == "f"
