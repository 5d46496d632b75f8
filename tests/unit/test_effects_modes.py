"""What ckptkeeper creates follows the process umask, and the root lock needs no write access
(issue: "trainer and keeper as different users lock each other out").

``.ckptkeeper/``, its lock, its trash, the completion marker (and its temporary) and the writer
lock are created with 0o777 / 0o666 less the umask: with the README's umask 002 they are
group-writable, with 022 what they were before, with 077 private. A lock file made by another
user without group write is opened read-only and still excludes (flock needs no write access);
the cross-user cases run in a forked child with another uid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers import run_as

from ckptkeeper import RootLock, write_marker
from ckptkeeper.effects import move_to_trash, writer_lock

OTHER_UID, GID = 40002, 40000


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory other uids can reach (pytest's tmp_path sits below a 0700 directory)."""
    if os.geteuid() != 0:
        pytest.skip("not root: cannot run a child as another uid")
    path = Path(tempfile.mkdtemp(prefix="ckptkeeper-modes-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize(
    ("mask", "dirs", "files"),
    [(0o002, 0o775, 0o664), (0o022, 0o755, 0o644), (0o077, 0o700, 0o600)],
    ids=["umask002", "umask022", "umask077"],
)
def test_area_lock_trash_marker_and_writer_lock_follow_the_umask(
    tmp_path: Path, mask: int, dirs: int, files: int
) -> None:
    root = tmp_path / "run"
    (root / "tmp_step_1").mkdir(parents=True)
    (root / "step_1").mkdir()
    with umask(mask):
        with RootLock(root):
            trashed = move_to_trash(root, root / "step_1")
        write_marker(root / "tmp_step_1", ".complete")
        with writer_lock(root / "tmp_step_1"):
            pass
    assert trashed is not None
    assert mode(root / ".ckptkeeper") == dirs
    assert mode(root / ".ckptkeeper" / "trash") == dirs
    assert mode(root / ".ckptkeeper" / "lock") == files
    assert mode(root / "tmp_step_1" / ".complete") == files
    assert mode(root / "tmp_step_1" / ".writer.lock") == files


def test_a_lock_file_without_write_access_is_opened_read_only_and_excludes(
    shared_tmp: Path,
) -> None:
    root = shared_tmp / "run"
    root.mkdir()
    root.chmod(0o755)
    with umask(0o022), RootLock(root):  # made by root, as an older keeper made it: 0755 / 0644
        pass
    assert mode(root / ".ckptkeeper" / "lock") == 0o644

    def try_lock() -> bool:
        lock = RootLock(root, timeout=0)
        taken = lock.acquire()
        lock.release()
        return taken

    free = run_as(OTHER_UID, GID, try_lock)
    assert free == {"ok": True, "value": True}, free.get("traceback", free)
    with RootLock(root):  # held here: the read-only descriptor's flock conflicts with it
        busy = run_as(OTHER_UID, GID, try_lock)
    assert busy == {"ok": True, "value": False}, busy.get("traceback", busy)


def test_a_missing_lock_in_an_area_not_writable_reports_the_permission_error(
    shared_tmp: Path,
) -> None:
    root = shared_tmp / "run"
    (root / ".ckptkeeper").mkdir(parents=True)
    for path in (root, root / ".ckptkeeper"):
        path.chmod(0o755)

    def try_lock() -> bool:
        return RootLock(root, timeout=0).acquire()

    denied = run_as(OTHER_UID, GID, try_lock)
    assert not denied["ok"] and denied["error"].startswith("PermissionError"), denied
    assert str(root / ".ckptkeeper" / "lock") in denied["error"]
