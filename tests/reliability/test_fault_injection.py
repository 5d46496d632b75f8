"""Fault injection at every mutation site of `ckptkeeper.effects` (through an `Fs` subclass).

One root exercises every site in one pass: an interrupted replace to restore (old_step_6, pinned),
a replace (complete tmp_step_4 over step_4), a finalize (tmp_step_8), an old_step leftover beside
its step (old_step_5), a stale unmarked save (tmp_step_7), two steps to delete (step_1 holding a
symlink to a file outside the root, step_5), a trash leftover, and a non-checkpoint README.

For every op the pass calls (mkdir, open, flock, rename, fsync, unlink, rmdir), every errno in
ERRNOS and every k in 1..N (N: that op's count in a clean pass), the k-th call of that op raises
``OSError(errno)`` instead of acting. After the faulty pass:

* no exception escapes ``reconcile``;
* every visible ``step_N`` is complete (exactly the files of one complete version of step N);
* every step the policy keeps and that was visible before is still visible; a save to finalize
  or an interrupted replace to restore is either done or still intact;
* nothing outside the root and no non-checkpoint name inside it changed;
* the failure is logged once, naming the path (or root) and the errno (``action_failed`` with
  ``errno``, ``removal_incomplete`` or ``root_problem`` with the errno name in ``reason``), except
  that EBUSY on unlink/rmdir is retried (absorbed: the pass completes) and ENOENT from a removal
  is a lost race (silent, or a follow-up ``removal_incomplete``).

A clean pass afterwards recovers: exactly the planned steps with the right contents, no
old_step, no tmp_step, empty trash.

`write` is not called by a reconcile pass (the marker is written by trainers through
`write_marker`); the marker sites (open, write, fsync of the file, fsync of the directory) are
injected into `write_marker` directly in ``test_failed_marker_write_leaves_no_marker``.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import stat
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from ckptkeeper import Policy, write_marker
from ckptkeeper.effects import Fs
from ckptkeeperd.logs import ProblemLog
from ckptkeeperd.reconcile import reconcile

OPS = ("mkdir", "open", "flock", "rename", "fsync", "write", "unlink", "rmdir")
ERRNOS = (errno.EIO, errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EBUSY, errno.ENOENT)
POLICY = Policy(
    keep_top_k=1,
    metric_name="val",
    higher_is_better=True,
    keep_every_n_steps=4,
    stale_after=60.0,
)
FINAL_STEPS = {2, 3, 4, 6, 8, 9}

ERROR_EVENTS = ("action_failed", "removal_incomplete", "root_problem")


def clock() -> float:
    """The scene's passes run an hour ahead: tmp_step_7, written as the scene is built, is then
    an hour old by its ctime (which, unlike its mtime, cannot be set back)."""
    return time.time() + 3600.0


# -- the faulty filesystem ------------------------------------------------------------------------


class FaultyFs(Fs):
    """Counts every call per op; the ``k``-th call of ``op`` raises ``OSError(err)`` instead."""

    def __init__(
        self, op: str | None = None, err: int = 0, k: int = 0, *, record: Path | None = None
    ) -> None:
        self.op, self.err, self.k = op, err, k
        self.counts: Counter[str] = Counter()
        self.injected: tuple[str, ...] | None = None  # what the failing call was about
        self.record = record  # when set: keep every call as text relative to this directory
        self.calls: dict[str, list[str]] = {op: [] for op in OPS}
        self.sequence: list[tuple[str, str]] = []  # (op, call) in call order, when recording
        self._lock = threading.Lock()

    def _describe(self, about: tuple[Any, ...]) -> str:
        assert self.record is not None
        shown = []
        for a in about:
            text = os.readlink(f"/proc/self/fd/{a}") if isinstance(a, int) else str(a)
            if text.startswith(f"{self.record}/"):
                text = text[len(str(self.record)) + 1 :]
            shown.append(text)
        return " -> ".join(shown)

    def _hit(self, op: str, *about: Any) -> None:
        with self._lock:
            self.counts[op] += 1
            if self.record is not None:
                self.calls[op].append(self._describe(about))
                self.sequence.append((op, self.calls[op][-1]))
            hit = op == self.op and self.counts[op] == self.k
            if hit:
                self.injected = tuple(str(a) for a in about)
        if hit:
            filename = str(about[0]) if about and not isinstance(about[0], int) else None
            filename2 = str(about[1]) if len(about) > 1 else None
            raise OSError(self.err, os.strerror(self.err), filename, None, filename2)

    def rename(self, src: Path, dst: Path) -> None:
        self._hit("rename", src, dst)
        super().rename(src, dst)

    def unlink(self, path: str | Path, dir_fd: int | None = None) -> None:
        self._hit("unlink", path)
        super().unlink(path, dir_fd=dir_fd)

    def rmdir(self, path: str | Path, dir_fd: int | None = None) -> None:
        self._hit("rmdir", path)
        super().rmdir(path, dir_fd=dir_fd)

    def mkdir(self, path: str | Path, mode: int = 0o755, dir_fd: int | None = None) -> None:
        self._hit("mkdir", path)
        super().mkdir(path, mode, dir_fd=dir_fd)

    def open(
        self, path: str | Path, flags: int, mode: int = 0o644, dir_fd: int | None = None
    ) -> int:
        self._hit("open", path)
        return super().open(path, flags, mode, dir_fd=dir_fd)

    def write(self, fd: int, data: bytes) -> int:
        self._hit("write", fd)
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._hit("fsync", fd)
        super().fsync(fd)

    def flock(self, fd: int, operation: int) -> None:
        self._hit("flock", fd)
        super().flock(fd, operation)


# -- the root -------------------------------------------------------------------------------------

Tree = dict[str, Any]  # relative path -> bytes | ("link", target) | ("dir",)


def read_tree(path: Path) -> Tree:
    out: Tree = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            full = Path(dirpath) / name
            rel = str(full.relative_to(path))
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            else:
                out[rel] = full.read_bytes()
    return out


def snapshot(path: Path) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [".", *dirnames, *filenames]:
            full = Path(dirpath) / name if name != "." else Path(dirpath)
            st = os.lstat(full)
            data = full.read_bytes() if stat.S_ISREG(st.st_mode) else None
            target = os.readlink(full) if stat.S_ISLNK(st.st_mode) else None
            out[str(full)] = (
                stat.S_IFMT(st.st_mode),
                st.st_mode,
                st.st_size,
                st.st_mtime_ns,
                data,
                target,
            )
    return out


def _mk(parent: Path, name: str, val: float, *, marker: bool = False, pin: bool = False) -> Path:
    path = parent / name
    (path / "policy").mkdir(parents=True)
    (path / "policy" / "w0.bin").write_bytes(f"{name}:weights".encode() * 8)
    (path / "training_info.json").write_text(json.dumps({"val": val}))
    if pin:
        (path / "KEEP").touch()
    if marker:
        write_marker(path, ".complete")
    return path


@dataclass
class Scene:
    base: Path
    root: Path
    outside: Path
    versions: dict[int, list[Tree]] = field(default_factory=dict)  # complete versions of step N
    final: dict[int, Tree] = field(default_factory=dict)  # what each kept step holds at the end
    outside_before: dict[str, Any] = field(default_factory=dict)
    readme: bytes = b""


def build_scene(base: Path) -> Scene:
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "dataset.txt").write_text("outside the root: never touched\n")
    s1 = _mk(root, "step_1", 0.1)
    os.symlink(outside / "dataset.txt", s1 / "dataset")
    _mk(root, "step_2", 0.9)  # top-1
    _mk(root, "step_3", 0.2, pin=True)  # pinned
    _mk(root, "step_4", 0.3)  # milestone (every 4), replaced by tmp_step_4
    _mk(root, "tmp_step_4", 0.35, marker=True)
    _mk(root, "step_5", 0.4)  # deleted
    _mk(root, "old_step_5", 0.41)  # leftover beside step_5: discarded
    _mk(root, "old_step_6", 0.6, pin=True)  # interrupted replace, no new save: restored
    stale = _mk(root, "tmp_step_7", 0.7)  # no marker, untouched for an hour (clock): collected
    old = time.time() - 3600
    for p in [stale, *stale.rglob("*")]:
        os.utime(p, (old, old), follow_symlinks=False)
    _mk(root, "tmp_step_8", 0.5, marker=True)  # finalized (milestone)
    _mk(root, "step_9", 0.05)  # latest
    trash = root / ".ckptkeeper" / "trash"
    trash.mkdir(parents=True)
    _mk(trash, "1700000000000000000-step_0", 0.0)  # left by an earlier pass
    (root / "README.md").write_text("not a checkpoint\n")

    scene = Scene(base, root, outside)
    tree = {n: read_tree(root / n) for n in os.listdir(root) if n != ".ckptkeeper"}
    scene.versions = {
        1: [tree["step_1"]],
        2: [tree["step_2"]],
        3: [tree["step_3"]],
        4: [tree["step_4"], tree["tmp_step_4"]],
        5: [tree["step_5"]],
        6: [tree["old_step_6"]],
        8: [tree["tmp_step_8"]],
        9: [tree["step_9"]],
    }
    scene.final = {
        2: tree["step_2"],
        3: tree["step_3"],
        4: tree["tmp_step_4"],
        6: tree["old_step_6"],
        8: tree["tmp_step_8"],
        9: tree["step_9"],
    }
    scene.outside_before = snapshot(outside)
    scene.readme = (root / "README.md").read_bytes()
    return scene


def _tmp_parent() -> str | None:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


@functools.cache
def clean_calls() -> dict[str, tuple[str, ...]]:
    """What a clean pass over a fresh scene calls, per op, in order: each call as text (paths
    relative to the scene's directory, fds as the path they refer to), with its context: a
    mkdir or fsync also names the rename it serves (``mkdir root/.ckptkeeper [for rename ...]``).
    """
    base = Path(tempfile.mkdtemp(prefix="ckptkeeper-faults-", dir=_tmp_parent()))
    try:
        scene = build_scene(base)
        fs = FaultyFs(record=base)
        with capture_logs():
            report = reconcile(scene.root, POLICY, fs=fs, delete_workers=1, clock=clock)
        assert report.status == "ok" and report.errors == 0, report
        out: dict[str, list[str]] = {op: [] for op in OPS}
        renames = [(i, call) for i, (op, call) in enumerate(fs.sequence) if op == "rename"]
        for i, (op, call) in enumerate(fs.sequence):
            if op == "mkdir":  # the root lock, or the rename of the move_to_trash it prepares
                after = [(o, c) for o, c in fs.sequence[i + 1 :] if o in ("open", "rename")]
                call += (
                    " [for the root lock]"
                    if after[0][0] == "open"
                    else f" [for rename {after[0][1]}]"
                )
            elif op == "fsync":  # the rename whose directory entry it makes durable
                call += " [after rename " + [c for j, c in renames if j < i][-1] + "]"
            out[op].append(call)
        return {op: tuple(calls) for op, calls in out.items()}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def clean_counts() -> dict[str, int]:
    return {op: len(calls) for op, calls in clean_calls().items()}


# -- expectations ---------------------------------------------------------------------------------


def _cases() -> list[Any]:
    calls = clean_calls()
    params = []
    for op in OPS:
        for err in ERRNOS:
            for k in range(1, len(calls[op]) + 1):
                params.append(pytest.param(op, err, k, 1, id=f"{op}-{errno.errorcode[err]}-{k}"))
    # The threaded removal path (workers > 1): every unlink/rmdir site once with EIO.
    for op in ("unlink", "rmdir"):
        for k in range(1, len(calls[op]) + 1):
            params.append(pytest.param(op, errno.EIO, k, 4, id=f"{op}-EIO-{k}-threads"))
    return params


@dataclass
class Stats:
    cases: int = 0
    recovered: int = 0
    sites: set[str] = field(default_factory=set)
    errnos: set[int] = field(default_factory=set)
    marker_cases: int = 0
    marker_clean: int = 0  # marker faults that left no marker behind
    marker_sites: set[str] = field(default_factory=set)


@pytest.fixture(scope="module")
def stats(report_summary: Callable[[str], None]) -> Iterator[Stats]:
    s = Stats()
    started = time.monotonic()
    yield s
    line = (
        f"faults: sites={len(s.sites)} errnos={len(s.errnos)} cases={s.cases} "
        f"recovered={s.recovered}; marker: sites={len(s.marker_sites)} cases={s.marker_cases} "
        f"no-marker-left={s.marker_clean} ({time.monotonic() - started:.1f}s)"
    )
    report_summary(line)


@pytest.fixture
def scene() -> Iterator[Scene]:
    base = Path(tempfile.mkdtemp(prefix="ckptkeeper-faults-", dir=_tmp_parent()))
    try:
        yield build_scene(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- checks ---------------------------------------------------------------------------------------


def _names(root: Path) -> set[str]:
    return set(os.listdir(root))


def check_invariants(scene: Scene) -> None:
    """What must hold after any pass, however it failed."""
    root = scene.root
    names = _names(root)
    for name in names:
        if name.startswith("step_"):
            n = int(name[5:])
            assert n in scene.versions, f"unexpected {name}"
            content = read_tree(root / name)
            assert content in scene.versions[n], f"{name} is not a complete version: {content}"
    # Kept steps that were visible before the pass are still visible.
    for n in (2, 3, 4, 9):
        assert f"step_{n}" in names, f"kept step_{n} is not visible: {sorted(names)}"
    # A restore or finalize not done yet leaves its source intact.
    if "step_6" not in names:
        assert read_tree(root / "old_step_6") == scene.final[6]
    if "step_8" not in names:
        assert read_tree(root / "tmp_step_8") == scene.final[8]
    if "step_4" in names and read_tree(root / "step_4") != scene.final[4]:
        assert read_tree(root / "tmp_step_4") == scene.final[4]  # the replace is still to do
    assert snapshot(scene.outside) == scene.outside_before, "outside the root changed"
    assert (root / "README.md").read_bytes() == scene.readme
    assert {n for n in names if not n.startswith(("step_", "tmp_step_", "old_step_"))} == {
        ".ckptkeeper",
        "README.md",
    }


def check_final(scene: Scene) -> None:
    root = scene.root
    names = _names(root)
    assert names == {".ckptkeeper", "README.md", *(f"step_{n}" for n in FINAL_STEPS)}, sorted(names)
    for n in FINAL_STEPS:
        assert read_tree(root / f"step_{n}") == scene.final[n], f"step_{n} content"
    assert os.listdir(root / ".ckptkeeper" / "trash") == []
    assert snapshot(scene.outside) == scene.outside_before
    assert (root / "README.md").read_bytes() == scene.readme


def _text(event: dict[str, Any]) -> str:
    return " ".join(str(event.get(k, "")) for k in ("errno", "reason", "error"))


def check_logged(
    logs: list[dict[str, Any]], root: Path, op: str, err: int, faulty: FaultyFs
) -> None:
    name = errno.errorcode[err]
    errors = [e for e in logs if e.get("event") in ERROR_EVENTS]
    removal = op in ("unlink", "rmdir")
    if removal and err == errno.EBUSY:
        assert not errors, f"EBUSY on {op} is retried, yet: {errors}"
        return
    if removal and err == errno.ENOENT:  # a lost race: silent or a follow-up leftover report
        assert all(e["event"] == "removal_incomplete" for e in errors), errors
        assert len(errors) <= 1, errors
        return
    naming = [e for e in errors if name in _text(e)]
    assert naming, (
        f"the injected {name} at {op} #{faulty.k} ({faulty.injected}) is not logged with its "
        f"errno name; logged: {[(e.get('event'), _text(e)) for e in logs]}"
    )
    assert len(naming) == 1, f"logged {len(naming)} times: {naming}"
    [event] = naming
    assert event.get("root") == str(root), event
    if event["event"] == "action_failed":
        assert event.get("errno") == name and event.get("path"), event
    elif event["event"] == "removal_incomplete":
        assert event.get("path") and event.get("reason"), event
    else:
        assert event.get("reason"), event


# -- tests ----------------------------------------------------------------------------------------


def test_a_clean_pass_exercises_every_site(scene: Scene) -> None:
    counts = clean_counts()
    assert {op for op in OPS if counts[op]} == set(OPS) - {"write"}, counts
    with capture_logs() as logs:
        report = reconcile(scene.root, POLICY, delete_workers=1, clock=clock)
    assert report.errors == 0, logs
    check_final(scene)
    done = Counter(e["event"] for e in logs)
    assert done["finalized"] == 1 and done["replaced"] == 1 and done["deleted"] == 2, done
    assert done["recovered"] == 2 and done["garbage_collected"] == 1 and done["purged"] == 1, done


@pytest.mark.parametrize(("op", "err", "k", "workers"), _cases())
def test_fault_then_recovery(
    scene: Scene, stats: Stats, op: str, err: int, k: int, workers: int
) -> None:
    stats.cases += 1
    stats.sites.add(op)
    stats.errnos.add(err)
    faulty = FaultyFs(op, err, k)
    log = structlog.get_logger("ckptkeeper").bind(root=str(scene.root))
    with capture_logs() as logs:
        report = reconcile(
            scene.root,
            POLICY,
            fs=faulty,
            log=log,
            problems=ProblemLog(),
            delete_workers=workers,
            clock=clock,
        )
    assert faulty.injected is not None, f"{op} #{k} was never called"
    # Check the faulty pass, but run the recovery pass whatever it found: both are reported.
    problem: AssertionError | None = None
    try:
        check_invariants(scene)
        check_logged(logs, scene.root, op, err, faulty)
        if not (op in ("unlink", "rmdir") and err in (errno.EBUSY, errno.ENOENT)):
            assert report.errors or report.status != "ok", f"no error counted: {report}"
    except AssertionError as exc:
        problem = exc

    with capture_logs() as logs:
        again = reconcile(scene.root, POLICY, delete_workers=workers, clock=clock)
    assert again.errors == 0 and again.status == "ok", logs
    check_final(scene)
    stats.recovered += 1
    if problem is not None:
        raise problem


def _marker_cases() -> list[Any]:
    params = []
    for op, k, label in [
        ("open", 1, "open"),
        ("write", 1, "write"),
        ("fsync", 1, "fsync-file"),
        ("rename", 1, "rename"),
        ("fsync", 2, "fsync-dir"),
    ]:
        for err in ERRNOS:
            params.append(pytest.param(op, k, err, id=f"{label}-{errno.errorcode[err]}"))
    return params


@pytest.mark.parametrize(("op", "k", "err"), _marker_cases())
def test_failed_marker_write_leaves_no_marker(
    tmp_path: Path, stats: Stats, op: str, k: int, err: int
) -> None:
    """When write_marker raises, the save must not look complete: no marker is left."""
    stats.marker_cases += 1
    stats.marker_sites.add(f"{op}-{k}")
    root = tmp_path / "run"
    root.mkdir()
    tmp = _mk(root, "tmp_step_3", 0.3)
    faulty = FaultyFs(op, err, k)
    with pytest.raises(OSError) as raised:
        write_marker(tmp, ".complete", fs=faulty)
    assert raised.value.errno == err
    assert faulty.injected is not None
    left = (tmp / ".complete").exists()
    with capture_logs():
        reconcile(root, POLICY)
    if not left:
        stats.marker_clean += 1
    assert not left, "a failed marker write left a marker behind"
    assert (root / "tmp_step_3").is_dir() and not (root / "step_3").exists()
