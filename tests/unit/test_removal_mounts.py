"""Removal never crosses into a mounted filesystem (issue: "removal crosses into another
filesystem mounted inside a step").

Real mounts (``mount -t tmpfs``, ``mount --bind``): skipped with the reason where mounting is
refused. Every mount is undone in a ``finally``. Checked: nothing below a mount point is
unlinked, the mount point is reported once (no EBUSY, no ``ENOTEMPTY`` for its parents), and a
later removal finishes the job once it is unmounted; in the daemon's pass the trash entry stays
with one ``removal_incomplete`` logged once, and is purged by the pass after the unmount.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ckptkeeper import Policy
from ckptkeeper.effects import Fs
from ckptkeeper.removal import MOUNTED, remove_tree
from ckptkeeperd.logs import ProblemLog
from ckptkeeperd.reconcile import reconcile


def _mount(*args: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("not root: cannot mount")
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} refused: {done.stderr.strip()[:200]}")


def mount_points_under(base: Path) -> list[str]:
    """From /proc/self/mountinfo (octal escapes decoded), deepest first."""
    with open("/proc/self/mountinfo") as fh:
        points = [line.split(" ")[4].encode().decode("unicode_escape") for line in fh]
    prefix = str(base) + "/"
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


@contextlib.contextmanager
def mounts(base: Path) -> Iterator[list[Path]]:
    """Yields a list the mounts made are appended to; on exit unmounts every mount point below
    ``base`` wherever it went (a step moved into trash takes its mounts along), deepest first."""
    targets: list[Path] = []
    try:
        yield targets
    finally:
        for point in mount_points_under(base):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        assert not mount_points_under(base), "a test mount was left behind"


def tmpfs(target: Path, held: list[Path], files: int = 3) -> None:
    target.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", "size=4m", "ckptkeeper-test", str(target))
    held.append(target)
    (target / "inner").mkdir()
    for i in range(files):
        (target / "inner" / f"f{i}").write_bytes(b"keep" * 8)
        (target / f"g{i}").write_bytes(b"keep")


def bind(source: Path, target: Path, held: list[Path]) -> None:
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    _mount("--bind", str(source), str(target))
    held.append(target)


def dataset(where: Path) -> Path:
    (where / "sub").mkdir(parents=True)
    for i in range(3):
        (where / f"part_{i}").write_bytes(b"d" * 64)
        (where / "sub" / f"x{i}").write_bytes(b"x")
    return where


def listing(top: Path) -> list[str]:
    return sorted(str(p.relative_to(top)) for p in top.rglob("*"))


def checkpoint(top: Path) -> None:
    (top / "policy" / "deep").mkdir(parents=True)
    for i in range(4):
        (top / "policy" / f"shard_{i}").write_bytes(b"w" * 100)
        (top / "policy" / "deep" / f"s{i}").write_bytes(b"w")
    (top / "training_info.json").write_text("{}")


@pytest.mark.parametrize("workers", [1, 8])
def test_a_tmpfs_and_a_same_filesystem_bind_mount_inside_are_not_entered(
    tmp_path: Path, workers: int
) -> None:
    top = tmp_path / "step_1"
    checkpoint(top)
    source = dataset(tmp_path / "elsewhere")
    before = listing(source)
    with mounts(tmp_path) as held:
        bind(source, top / "policy" / "data", held)
        tmpfs(top / "scratch", held)
        # The bind mount keeps st_dev: only the mount table tells it apart.
        assert os.stat(top / "policy" / "data").st_dev == os.stat(top).st_dev
        assert os.stat(top / "scratch").st_dev != os.stat(top).st_dev

        removal = remove_tree(top, workers=workers)

        assert sorted(removal.left) == [
            (str(top / "policy" / "data"), MOUNTED),
            (str(top / "scratch"), MOUNTED),
        ]
        assert listing(source) == before  # nothing below the mount was unlinked
        assert len(listing(top / "scratch")) == 7
        assert listing(top) == sorted(
            ["policy", "policy/data", "scratch"]
            + [f"policy/data/{p}" for p in before]
            + [f"scratch/{p}" for p in listing(top / "scratch")]
        )
        # A second try while still mounted: the same single report, nothing else.
        again = remove_tree(top, workers=workers)
        assert sorted(again.left) == sorted(removal.left)
        assert (again.files, again.dirs) == (0, 0)
    finished = remove_tree(top, workers=workers)
    assert finished.left == [] and not os.path.lexists(top)
    assert listing(source) == before


def test_a_tree_that_is_itself_a_mount_point_is_left_whole(tmp_path: Path) -> None:
    top = tmp_path / "entry"
    with mounts(tmp_path) as held:
        tmpfs(top, held)
        removal = remove_tree(top)
        assert removal.left == [(str(top), MOUNTED)]
        assert (removal.files, removal.dirs) == (0, 0)
        assert len(listing(top)) == 7


def test_a_file_mounted_over_is_left_without_ebusy_retries(tmp_path: Path) -> None:
    top = tmp_path / "step_1"
    checkpoint(top)
    precious = tmp_path / "precious.bin"
    precious.write_bytes(b"p" * 10)
    calls: list[str] = []

    class Recording(Fs):
        def unlink(self, path: str | Path, dir_fd: int | None = None) -> None:
            calls.append(str(path))
            super().unlink(path, dir_fd=dir_fd)

    with mounts(tmp_path) as held:
        bind(precious, top / "policy" / "weights.bin", held)
        removal = remove_tree(top, fs=Recording(), busy_retries=50)
        assert removal.left == [(str(top / "policy" / "weights.bin"), MOUNTED)]
        assert "weights.bin" not in calls
    assert precious.read_bytes() == b"p" * 10
    assert remove_tree(top).left == [] and not os.path.lexists(top)


def test_a_mount_made_after_the_mount_table_was_read_is_caught_by_st_dev(tmp_path: Path) -> None:
    """The table is read once per removal; a mount of another filesystem appearing later (here:
    on a directory not visited yet, at the first unlink) is still seen, by its ``st_dev``."""
    top = tmp_path / "step_1"
    checkpoint(top)
    (top / "zz" / "late").mkdir(parents=True)
    (top / "a_file").write_bytes(b"a")
    with mounts(tmp_path) as held:

        class MountAtFirstUnlink(Fs):
            def unlink(self, path: str | Path, dir_fd: int | None = None) -> None:
                if not held:
                    tmpfs(top / "zz" / "late", held)
                super().unlink(path, dir_fd=dir_fd)

        removal = remove_tree(top, workers=1, fs=MountAtFirstUnlink())
        assert held, "the mount was never made"
        assert removal.left == [(str(top / "zz" / "late"), MOUNTED)]
        assert len(listing(top / "zz" / "late")) == 7
    assert remove_tree(top).left == [] and not os.path.lexists(top)


def _info(step: Path, val: float) -> None:
    (step / "training_info.json").write_text(json.dumps({"step": int(step.name[5:]), "val": val}))


def test_the_pass_keeps_the_entry_in_trash_reports_once_and_purges_after_the_unmount(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    for step, val in ((1, 0.1), (2, 0.9)):
        checkpoint(root / f"step_{step}")
        _info(root / f"step_{step}", val)
    source = dataset(tmp_path / "elsewhere")
    before = listing(source)
    policy = Policy(keep_top_k=1, metric_name="val", higher_is_better=True, keep_latest=False)
    problems = ProblemLog()
    with mounts(tmp_path) as held:
        bind(source, root / "step_1" / "data", held)
        tmpfs(root / "step_1" / "scratch", held)
        with capture_logs() as logs:
            for _ in range(3):
                reconcile(root, policy, problems=problems)
        trash = list((root / ".ckptkeeper" / "trash").iterdir())
        assert [t.name.split("-", 1)[1] for t in trash] == ["step_1"]
        incomplete = [e for e in logs if e["event"] == "removal_incomplete"]
        assert len(incomplete) == 1, incomplete
        assert incomplete[0]["path"] == str(trash[0]) and incomplete[0]["left"] == 2
        assert MOUNTED in incomplete[0]["reason"]
        assert "EBUSY" not in incomplete[0]["reason"]
        assert [e["step"] for e in logs if e["event"] == "deleted"] == [1]
        assert not [e for e in logs if e["event"] == "purged"]
        assert listing(source) == before
        assert len(listing(trash[0] / "scratch")) == 7
    with capture_logs() as logs:
        reconcile(root, policy, problems=problems)
    assert [e["path"] for e in logs if e["event"] == "purged"] == [str(trash[0])]
    assert not [e for e in logs if e["event"] == "removal_incomplete"]
    assert list((root / ".ckptkeeper" / "trash").iterdir()) == []
    assert sorted(os.listdir(root)) == [".ckptkeeper", "step_2"]
    assert listing(source) == before
