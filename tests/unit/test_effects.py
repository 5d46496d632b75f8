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
    remove_tree,
    write_marker,
    writer_lock,
)
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
    from ckptkeeper.effects import Fs, remove_tree

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
