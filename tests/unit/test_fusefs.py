"""The FUSE passthrough used to stand in for a network filesystem behaves like one."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fusefs import FS_SUBTYPE, fuse_available, passthrough_mount
from tests.helpers import wait_until

from ckptkeeperd.fstype import filesystem_type, find_mount, is_network_fs

_UNAVAILABLE = fuse_available()
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or "")

WAIT_TIMEOUT_S = 10.0
RENAME_NOREPLACE = 1
AT_FDCWD = -100


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "source"
    path.mkdir()
    return path


@pytest.fixture
def mountpoint(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


@pytest.fixture
def mounted(source: Path, mountpoint: Path) -> Iterator[Path]:
    with passthrough_mount(source, mountpoint) as mnt:
        yield mnt


def test_dirs_and_files_created_through_mount_appear_in_source(source: Path, mounted: Path) -> None:
    (mounted / "run1" / "step_100").mkdir(parents=True)
    (mounted / "run1" / "step_100" / "model.bin").write_bytes(b"w" * 70_000)
    assert (source / "run1" / "step_100").is_dir()
    assert (source / "run1" / "step_100" / "model.bin").read_bytes() == b"w" * 70_000
    assert sorted(os.listdir(mounted / "run1")) == ["step_100"]


def test_rename_unlink_and_rmdir_through_mount_change_source(source: Path, mounted: Path) -> None:
    (mounted / "tmp.partial").mkdir()
    (mounted / "tmp.partial" / "f").write_text("x")
    os.rename(mounted / "tmp.partial", mounted / "step_1")
    assert sorted(os.listdir(source)) == ["step_1"]
    os.unlink(mounted / "step_1" / "f")
    assert not (source / "step_1" / "f").exists()
    os.rmdir(mounted / "step_1")
    assert os.listdir(source) == []


def test_changes_made_in_source_are_seen_through_mount_at_once(source: Path, mounted: Path) -> None:
    (source / "direct").write_text("from source")
    assert (mounted / "direct").read_text() == "from source"
    (source / "direct").unlink()
    assert not (mounted / "direct").exists()


def test_mount_reports_a_fuse_type_that_counts_as_network_fs(mounted: Path) -> None:
    fstype = filesystem_type(mounted)
    assert fstype == f"fuse.{FS_SUBTYPE}"
    assert is_network_fs(fstype)
    assert filesystem_type(mounted / "not-yet-created") == fstype


def test_unmount_on_exit_removes_the_mount(source: Path, mountpoint: Path) -> None:
    with passthrough_mount(source, mountpoint) as mnt:
        (mnt / "kept").write_text("1")
        assert find_mount(mnt).mount_point == str(mountpoint.resolve())
    assert find_mount(mountpoint).mount_point != str(mountpoint.resolve())
    assert not (mountpoint / "kept").exists()
    assert (source / "kept").read_text() == "1"


def test_exit_with_a_file_still_open_detaches_the_mount(source: Path, mountpoint: Path) -> None:
    with passthrough_mount(source, mountpoint) as mnt:
        held = open(mnt / "held", "wb", buffering=0)  # noqa: SIM115 - open across the unmount
    try:
        assert find_mount(mountpoint).mount_point != str(mountpoint.resolve())
        with pytest.raises(OSError) as excinfo:
            held.write(b"late")  # the server is gone: the file is dead, not hung
        assert excinfo.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    finally:
        with contextlib.suppress(OSError):
            held.close()
    assert (source / "held").exists()


def test_mount_goes_away_when_the_process_that_made_it_is_killed(
    source: Path, mountpoint: Path
) -> None:
    script = (
        "import sys\n"
        "from tests.fusefs import passthrough_mount\n"
        "with passthrough_mount(sys.argv[1], sys.argv[2]):\n"
        "    print('mounted', flush=True)\n"
        "    sys.stdin.read()\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script, str(source), str(mountpoint)],
        cwd=Path(__file__).resolve().parents[2],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert owner.stdout is not None
        assert owner.stdout.readline() == b"mounted\n"
        assert is_network_fs(filesystem_type(mountpoint))
        owner.kill()  # no chance to clean up: the server notices its stdin closing
        owner.wait()
        wait_until(lambda: not is_network_fs(filesystem_type(mountpoint)), timeout=WAIT_TIMEOUT_S)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        for stream in (owner.stdin, owner.stdout):
            if stream is not None:
                stream.close()


def test_unlinks_in_separate_directories_run_in_parallel(source: Path, mountpoint: Path) -> None:
    latency, threads, per_thread = 0.01, 4, 5
    total = threads * per_thread
    for name, count in [("serial", total)] + [(f"d{t}", per_thread) for t in range(threads)]:
        (source / name).mkdir()
        for i in range(count):
            (source / name / f"f{i}").touch()

    with passthrough_mount(source, mountpoint, op_latency_s=latency) as mnt:
        started = time.perf_counter()
        for i in range(total):
            os.unlink(mnt / "serial" / f"f{i}")
        serial = time.perf_counter() - started

        barrier = threading.Barrier(threads + 1)

        def unlink_dir(directory: Path) -> None:
            barrier.wait()
            for i in range(per_thread):
                os.unlink(directory / f"f{i}")

        workers = [
            threading.Thread(target=unlink_dir, args=(mnt / f"d{t}",)) for t in range(threads)
        ]
        for worker in workers:
            worker.start()
        barrier.wait()
        started = time.perf_counter()
        for worker in workers:
            worker.join()
        parallel = time.perf_counter() - started

    assert serial >= total * latency  # the latency really is injected into every unlink
    assert all(not any((source / f"d{t}").iterdir()) for t in range(threads))
    # Fully serialised is ratio ~1.0, perfect overlap 1/threads (0.25); measured 0.25-0.45.
    assert parallel / serial < 0.7, f"serial {serial:.3f}s, parallel {parallel:.3f}s"


def test_latency_applies_only_to_listed_operations(source: Path, mountpoint: Path) -> None:
    latency, count = 0.05, 6
    with passthrough_mount(source, mountpoint, op_latency_s=latency, latency_ops=["rmdir"]) as mnt:
        started = time.perf_counter()
        for i in range(count):
            (mnt / f"d{i}").mkdir()
        mkdirs = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(count):
            (mnt / f"d{i}").rmdir()
        rmdirs = time.perf_counter() - started
    assert rmdirs >= count * latency
    assert mkdirs < rmdirs / 2


def test_unknown_latency_op_is_rejected(source: Path, mountpoint: Path) -> None:
    with (
        pytest.raises(ValueError, match="unlnk"),
        passthrough_mount(source, mountpoint, op_latency_s=0.01, latency_ops=["unlnk"]),
    ):
        pass


def test_symlinks_are_reported_and_created_without_following(source: Path, mounted: Path) -> None:
    (source / "target").mkdir()
    (source / "dangling").symlink_to("../outside/nowhere")
    (mounted / "to_target").symlink_to("target")
    assert (mounted / "dangling").is_symlink()
    assert os.readlink(mounted / "dangling") == "../outside/nowhere"
    assert os.readlink(source / "to_target") == "target"  # link text stored verbatim
    assert (mounted / "to_target").is_symlink()
    assert (mounted / "to_target").is_dir()  # the kernel, not the server, follows it
    os.utime(mounted / "dangling", ns=(10**9, 2 * 10**9), follow_symlinks=False)
    assert os.lstat(source / "dangling").st_mtime_ns == 2 * 10**9
    with pytest.raises(OSError) as excinfo:
        os.open(mounted / "to_target", os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY)
    assert excinfo.value.errno in (errno.ELOOP, errno.ENOTDIR)


def test_flock_through_mount_excludes_flock_on_source(source: Path, mounted: Path) -> None:
    (mounted / "lock").touch()
    via_mount = os.open(mounted / "lock", os.O_RDWR)
    via_source = os.open(source / "lock", os.O_RDWR)
    other_via_mount = os.open(mounted / "lock", os.O_RDWR)
    try:
        fcntl.flock(via_mount, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            fcntl.flock(via_source, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            fcntl.flock(other_via_mount, fcntl.LOCK_SH | fcntl.LOCK_NB)
        granted = threading.Event()

        def wait_for_lock() -> None:
            fcntl.flock(other_via_mount, fcntl.LOCK_EX)  # blocks in a server thread
            granted.set()

        waiter = threading.Thread(target=wait_for_lock)
        waiter.start()
        os.close(via_mount)  # closing releases the flock, as on a local filesystem
        via_mount = -1
        assert granted.wait(WAIT_TIMEOUT_S)
        waiter.join()
    finally:
        for fd in (via_mount, via_source, other_via_mount):
            if fd >= 0:
                os.close(fd)


def _blocked_flock_waiters(inode: int) -> int:
    with open("/proc/locks") as f:
        return sum(
            1
            for line in f
            if "->" in line
            and "FLOCK" in line
            and any(field.endswith(f":{inode}") for field in line.split())
        )


def test_many_blocked_flocks_do_not_starve_other_operations(source: Path, mounted: Path) -> None:
    # Each blocking flock parks one server thread; with libfuse's default cap of 10 threads
    # nothing would be left for a plain listdir. The lock is held on the source side, so
    # releasing it needs no server thread and this test cannot deadlock itself.
    waiters = 16
    (source / "lock").touch()
    inode = os.stat(source / "lock").st_ino
    holder = os.open(source / "lock", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    fds = [os.open(mounted / "lock", os.O_RDWR) for _ in range(waiters)]
    threads = [
        threading.Thread(target=fcntl.flock, args=(fd, fcntl.LOCK_SH), daemon=True) for fd in fds
    ]
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: _blocked_flock_waiters(inode) >= waiters, timeout=WAIT_TIMEOUT_S)
        listed: list[list[str]] = []
        probe = threading.Thread(target=lambda: listed.append(os.listdir(mounted)), daemon=True)
        probe.start()
        probe.join(WAIT_TIMEOUT_S)
        assert listed == [["lock"]]
    finally:
        os.close(holder)  # grants every waiter, so nothing stays parked
        for thread in threads:
            thread.join(WAIT_TIMEOUT_S)
        for fd in fds:
            os.close(fd)
    assert not any(thread.is_alive() for thread in threads)


def test_rename_noreplace_refuses_an_existing_target(source: Path, mounted: Path) -> None:
    (mounted / "a").write_text("a")
    (mounted / "b").write_text("b")
    libc = ctypes.CDLL(None, use_errno=True)
    old, new = os.fsencode(mounted / "a"), os.fsencode(mounted / "b")
    assert libc.renameat2(AT_FDCWD, old, AT_FDCWD, new, RENAME_NOREPLACE) == -1
    assert ctypes.get_errno() == errno.EEXIST
    assert (source / "b").read_text() == "b"
    assert (source / "a").read_text() == "a"


def test_file_data_and_metadata_operations_pass_through(source: Path, mounted: Path) -> None:
    path = mounted / "data"
    with open(path, "wb") as f:
        f.write(b"0123456789" * 1000)
        f.flush()
        os.fsync(f.fileno())
        f.truncate(25)
    assert (source / "data").read_bytes() == b"0123456789" * 2 + b"01234"
    os.truncate(path, 4)
    os.chmod(path, 0o640)
    os.utime(path, ns=(5 * 10**9 + 1, 7 * 10**9 + 3))
    st, real = os.stat(path), os.stat(source / "data")
    assert (st.st_size, st.st_mode, st.st_ino) == (4, real.st_mode, real.st_ino)
    assert (real.st_atime_ns, real.st_mtime_ns) == (5 * 10**9 + 1, 7 * 10**9 + 3)
    assert os.statvfs(mounted).f_blocks == os.statvfs(source).f_blocks
    os.link(path, mounted / "hardlink")
    assert os.stat(source / "data").st_nlink == 2
    dir_fd = os.open(mounted, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fsync(dir_fd)  # fsyncdir after a rename, as the library does
        os.mkdir("sub", dir_fd=dir_fd)
        os.rmdir("sub", dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def test_new_files_and_dirs_get_the_callers_umask_not_the_servers(
    source: Path, mounted: Path
) -> None:
    old_umask = os.umask(0o002)
    try:
        os.mkdir(mounted / "group_writable", 0o777)
        os.close(os.open(mounted / "file", os.O_CREAT | os.O_WRONLY, 0o666))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(source / "group_writable").st_mode) == 0o775
    assert stat.S_IMODE(os.stat(source / "file").st_mode) == 0o664


def test_unlinking_an_open_file_leaves_a_hidden_file_until_closed(
    source: Path, mounted: Path
) -> None:
    (mounted / "open").write_text("x")
    with open(mounted / "open") as held:
        os.unlink(mounted / "open")
        hidden = [name for name in os.listdir(source) if name.startswith(".fuse_hidden")]
        assert len(hidden) == 1  # like NFS's .nfsXXXX silly rename
        assert held.read() == "x"
    wait_until(
        lambda: os.listdir(source) == [], timeout=WAIT_TIMEOUT_S
    )  # FUSE release is asynchronous


def test_hard_remove_unlinks_an_open_file_at_once(source: Path, mountpoint: Path) -> None:
    with passthrough_mount(source, mountpoint, hard_remove=True) as mnt:
        (mnt / "open").write_text("x")
        with open(mnt / "open"):
            os.unlink(mnt / "open")
            assert os.listdir(source) == []
