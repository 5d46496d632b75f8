"""Deletion never follows a symlink, even one swapped in mid-pass (DESIGN section 2, invariant 4).

In-process, with the library and the daemon's own pass (`ckptkeeperd.reconcile.reconcile`):

* a ``step_N`` planned for deletion is replaced by a symlink (to a directory outside the root, or
  to a step the policy keeps) between plan and apply, or inside the executor right before its
  rename: the target is untouched; the link is skipped (identity re-check) or removed as a link;
* a subdirectory of a step already in trash is replaced by a symlink in the middle of its removal
  (hook in ``Fs.unlink``): the link is unlinked, never entered;
* ckptkeeper's own area (``.ckptkeeper`` or ``.ckptkeeper/trash``) is replaced by a symlink during a
  pass: nothing outside the root may be removed through it;
* a whole ``ckptkeeper sweep`` under ``strace -f``: every mutating system call and every open for
  writing targets a path under the root.

"Untouched" is checked with a snapshot of the target tree: every path, its type, size, mtime,
content hash (and link target), before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import wait_until, write_checkpoint

from ckptkeeper import (
    Action,
    Fs,
    Policy,
    RootLock,
    apply_plan,
    plan,
    purge_trash,
    scan_root,
)
from ckptkeeper.scan import trash_dir
from ckptkeeperd.reconcile import reconcile

POLICY = Policy(keep_top_k=1, metric_name="r", higher_is_better=True)  # keeps the highest step
VICTIM = 2


def snapshot(top: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry below (and including) ``top``: type, size, mtime_ns, content hash / target."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        for name in [".", *dirnames, *filenames]:
            p = Path(dirpath) / name if name != "." else Path(dirpath)
            st = os.lstat(p)
            rel = str(p.relative_to(top))
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode, st.st_mtime_ns)
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out[rel] = ("file", st.st_size, st.st_mtime_ns, st.st_mode, digest)
    return out


def files_of(top: Path) -> dict[str, tuple[Any, ...]]:
    """The snapshot of ``top`` without its directories' own entries (a moved directory's
    times change)."""
    return {k: v for k, v in snapshot(top).items() if v[0] != "dir"}


def make_outside(base: Path) -> Path:
    """A directory that looks like a checkpoint tree, beside the root: nothing may touch it."""
    out = base / "outside"
    (out / "weights" / "deep").mkdir(parents=True)
    (out / "precious.txt").write_text("do not delete")
    (out / "training_info.json").write_text(json.dumps({"r": 0.0}))
    (out / "weights" / "w.bin").write_bytes(os.urandom(4096))
    (out / "weights" / "deep" / "x.bin").write_bytes(os.urandom(100))
    return out


def make_root(base: Path, steps: int = 5) -> Path:
    root = base / "run"
    root.mkdir()
    for step in range(1, steps + 1):
        write_checkpoint(root, step, {"r": float(step)}, files=3, final=True)
    return root


def swap_for_symlink(path: Path, target: Path, parked: Path) -> None:
    """Rename the real directory away (outside the root) and put a symlink in its place."""
    os.rename(path, parked)
    os.symlink(target, path)


def trash_entries(root: Path) -> list[Path]:
    trash = trash_dir(root)
    return sorted(trash.iterdir()) if trash.is_dir() else []


@pytest.fixture(params=["outside", "kept_step"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[Path], Path]:
    """Where the swapped-in symlink points: outside the root, or at the step the policy keeps."""

    def pick(root: Path) -> Path:
        return make_outside(tmp_path) if request.param == "outside" else root / "step_5"

    return pick


def test_step_swapped_for_a_symlink_between_plan_and_apply(
    tmp_path: Path, target: Callable[[Path], Path]
) -> None:
    root = make_root(tmp_path)
    dest = target(root)
    decided = plan(scan_root(root), POLICY, time.time())
    assert decided.deleted_steps == {1, 2, 3, 4}
    before = snapshot(dest)
    parked = tmp_path / "parked"
    swap_for_symlink(root / f"step_{VICTIM}", dest, parked)
    parked_before = snapshot(parked)

    with RootLock(root):
        outcomes = apply_plan(decided)
    purge_trash(root, trash_entries(root))

    [victim] = [o for o in outcomes if o.decision.step == VICTIM]
    assert victim.status == "skipped" and "no longer a directory" in victim.detail
    assert snapshot(dest) == before
    assert snapshot(parked) == parked_before
    link = root / f"step_{VICTIM}"
    assert not os.path.lexists(link) or os.path.islink(link)  # left alone, or removed as a link
    assert {p.name for p in root.iterdir()} >= {"step_5"}
    assert trash_entries(root) == []


class SwapBeforeRename(Fs):
    """Swaps ``step_<VICTIM>`` for a symlink right before the executor renames it into trash:
    after the identity re-check, so only the rename's no-follow semantics protect the target."""

    def __init__(self, root: Path, dest: Path, parked: Path) -> None:
        self.root, self.dest, self.parked = root, dest, parked
        self.swapped = False

    def rename(self, src: Path, dst: Path) -> None:
        if not self.swapped and Path(src) == self.root / f"step_{VICTIM}":
            self.swapped = True
            swap_for_symlink(Path(src), self.dest, self.parked)
        super().rename(src, dst)


@pytest.mark.parametrize("runner", ["library", "daemon_pass"])
def test_step_swapped_for_a_symlink_right_before_its_rename(
    tmp_path: Path, target: Callable[[Path], Path], runner: str
) -> None:
    root = make_root(tmp_path)
    dest = target(root)
    before = snapshot(dest)
    parked = tmp_path / "parked"
    fs = SwapBeforeRename(root, dest, parked)

    if runner == "library":
        with RootLock(root):
            decided = plan(scan_root(root), POLICY, time.time())
            apply_plan(decided, fs=fs)
        purge_trash(root, trash_entries(root), fs=fs)
    else:
        report = reconcile(root, POLICY, fs=fs)
        assert report.status == "ok", report.problems

    assert fs.swapped
    assert snapshot(dest) == before
    assert (parked / "training_info.json").is_file()  # the real directory was never entered
    assert not os.path.lexists(root / f"step_{VICTIM}")  # the link went to trash, then away
    assert trash_entries(root) == []
    assert {p.name for p in root.iterdir() if p.name.startswith("step_")} == {"step_5"}


class SwapMidRemoval(Fs):
    """On the first unlink inside ``parent``, swaps ``parent/<name>`` (a directory not visited
    yet) for a symlink to ``dest``; the real directory is parked outside the root."""

    def __init__(self, parent: Path, name: str, dest: Path, parked: Path) -> None:
        self.parent, self.name, self.dest, self.parked = parent, name, dest, parked
        self.swapped = False

    def unlink(self, path: str | Path, dir_fd: int | None = None) -> None:
        if not self.swapped and dir_fd is not None:
            where = Path(os.readlink(f"/proc/self/fd/{dir_fd}"))
            if where == self.parent:
                self.swapped = True
                swap_for_symlink(self.parent / self.name, self.dest, self.parked)
        super().unlink(path, dir_fd=dir_fd)


@pytest.mark.parametrize("workers", [1, 8])
@pytest.mark.parametrize("depth", ["top", "nested"])
def test_subdirectory_swapped_for_a_symlink_mid_removal(
    tmp_path: Path, workers: int, depth: str
) -> None:
    root = make_root(tmp_path, steps=1)
    outside = make_outside(tmp_path)
    entry = trash_dir(root) / "1700000000000000000-step_9"
    (entry / "sub" / "deeper" / "deepest").mkdir(parents=True)
    for d in (entry, entry / "sub", entry / "sub" / "deeper", entry / "sub" / "deeper" / "deepest"):
        for i in range(3):
            (d / f"f{i}.bin").write_bytes(os.urandom(64))
    before = snapshot(outside)
    parent, name = (entry, "sub") if depth == "top" else (entry / "sub", "deeper")
    real_before = files_of(parent / name)
    parked = tmp_path / "parked"
    fs = SwapMidRemoval(parent, name, outside, parked)

    [(_, removal)] = purge_trash(root, [entry], workers=workers, fs=fs)

    assert fs.swapped
    assert snapshot(outside) == before
    assert not os.path.lexists(entry), removal
    assert removal.left == []
    assert files_of(parked) == real_before  # parked before it was visited: never entered
    assert (root / "step_1" / "training_info.json").is_file()


def test_trash_swapped_for_a_symlink_is_not_followed(tmp_path: Path) -> None:
    """``.ckptkeeper/trash`` replaced by a symlink to a directory of trash-like entries."""
    root = make_root(tmp_path)
    outside = make_outside(tmp_path)
    (outside / "1700000000000000000-step_7").mkdir()
    (outside / "1700000000000000000-step_7" / "precious.txt").write_text("keep")
    before = snapshot(outside)
    area = root / ".ckptkeeper"
    area.mkdir()
    os.symlink(outside, area / "trash")

    report = reconcile(root, POLICY)

    assert snapshot(outside) == before
    assert os.path.islink(area / "trash")
    assert report.errors  # the pass could not use its trash: reported, not forced
    assert not any(o.status == "done" for o in report.outcomes if o.decision.action is Action.PURGE)


class SwapOwnArea(Fs):
    """Replaces ``<root>/.ckptkeeper`` by a symlink to ``outside/area`` at a chosen moment: right
    after the root lock is taken (``when="locked"``) or right after the pass renamed a step into
    trash (``when="trashed"``, mirroring the trash entry's name outside, as an attacker who
    watches the trash could)."""

    def __init__(self, root: Path, outside: Path, parked: Path, when: str) -> None:
        self.root, self.outside, self.parked, self.when = root, outside, parked, when
        self.swapped = False

    def _swap(self) -> None:
        self.swapped = True
        os.rename(self.root / ".ckptkeeper", self.parked)
        os.symlink(self.outside / "area", self.root / ".ckptkeeper")

    def flock(self, fd: int, operation: int) -> None:
        super().flock(fd, operation)
        if self.when == "locked" and not self.swapped:
            self._swap()

    def rename(self, src: Path, dst: Path) -> None:
        super().rename(src, dst)
        if self.when == "trashed" and not self.swapped and Path(dst).parent.name == "trash":
            decoy = self.outside / "area" / "trash" / Path(dst).name
            decoy.mkdir(parents=True)
            (decoy / "precious.txt").write_text("not a checkpoint of this root")
            self._swap()


@pytest.mark.parametrize("when", ["locked", "trashed"])
def test_own_area_swapped_for_a_symlink_mid_pass(tmp_path: Path, when: str) -> None:
    root = make_root(tmp_path, steps=2)  # exactly one delete: step_1
    outside = make_outside(tmp_path)
    trash = root / ".ckptkeeper" / "trash"
    trash.mkdir(parents=True)
    if when == "locked":  # something to purge: outside holds trash-like entries under the link
        (outside / "area" / "trash" / "1700000000000000000-step_8").mkdir(parents=True)
        (outside / "area" / "trash" / "1700000000000000000-step_8" / "precious.txt").write_text(
            "not a checkpoint of this root"
        )
    fs = SwapOwnArea(root, outside, tmp_path / "parked_area", when)
    before = snapshot(outside) if when == "locked" else None

    reconcile(root, POLICY, fs=fs)

    assert fs.swapped
    if before is not None:
        assert snapshot(outside) == before
    else:
        assert list((outside / "area" / "trash").rglob("precious.txt")), "deleted outside the root"


# -- strace: nothing outside the root is modified by a whole sweep ------------------------------

_MUTATING = {
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "rmdir",
    "mkdir",
    "mkdirat",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
    "creat",
    "truncate",
}
_OPENS = {"open", "openat", "openat2"}
_WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC")
_LINE = re.compile(r"^(?P<pid>\d+)\s+(?P<call>\w+)\((?P<args>.*)")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_FD = re.compile(r"^(?:AT_FDCWD|-?\d+)(?:<(?P<path>[^>]*)>)?")


def _split_args(args: str) -> list[str]:
    """Top-level comma-separated arguments of one strace call (quotes and <...> respected)."""
    out, depth, quoted, current = [], 0, False, ""
    i = 0
    while i < len(args):
        c = args[i]
        if quoted:
            current += c
            if c == "\\" and i + 1 < len(args):
                current += args[i + 1]
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted, current = True, current + c
        elif c in "<[{(":
            depth, current = depth + 1, current + c
        elif c in ">]})":
            depth, current = depth - 1, current + c
        elif c == "," and depth == 0:
            out.append(current.strip())
            current = ""
        else:
            current += c
        i += 1
    if current.strip():
        out.append(current.strip())
    return out


def _resolve(dirfd: str | None, path: str, cwd: Path) -> Path:
    if path.startswith("/"):
        return Path(os.path.normpath(path))
    base = cwd
    if dirfd is not None and (m := _FD.match(dirfd)) and m["path"]:
        base = Path(m["path"])
    return Path(os.path.normpath(base / path))


def mutated_paths(trace: str, cwd: Path) -> list[tuple[str, Path]]:
    """(call, absolute path) of every mutating call and every open for writing in an
    ``strace -f -y`` log (dir fds shown as ``N</path>``)."""
    found: list[tuple[str, Path]] = []
    for line in trace.splitlines():
        m = _LINE.match(line)
        if m is None or "resumed>" in line:
            continue
        call = m["call"]
        args = _split_args(m["args"].split(" <unfinished", 1)[0].rsplit(") = ", 1)[0])
        if call in _OPENS:
            dirfd, path_arg, flags = (
                (args[0], args[1], args[2]) if call != "open" else (None, args[0], args[1])
            )
            if not any(f in flags for f in _WRITE_FLAGS):
                continue
            found.append((call, _resolve(dirfd, _unquote(path_arg), cwd)))
        elif call in _MUTATING:
            pairs: list[tuple[str | None, str]] = []
            if call in ("renameat", "renameat2", "linkat"):
                pairs = [(args[0], args[1]), (args[2], args[3])]
            elif call in ("unlinkat", "mkdirat"):
                pairs = [(args[0], args[1])]
            elif call == "symlinkat":
                pairs = [(args[1], args[2])]
            elif call in ("rename", "link"):
                pairs = [(None, args[0]), (None, args[1])]
            elif call == "symlink":
                pairs = [(None, args[1])]
            else:
                pairs = [(None, args[0])]
            found.extend((call, _resolve(fd, _unquote(p), cwd)) for fd, p in pairs)
    return found


def _unquote(arg: str) -> str:
    m = _STRING.search(arg)
    return m[1].encode().decode("unicode_escape") if m else arg


def _allowed(path: Path, root: Path) -> bool:
    text = str(path)
    return (
        path == root
        or path.is_relative_to(root)
        or text in ("/dev/null", "/dev/tty")
        or text.startswith(("/proc/", "pipe:", "socket:"))
    )


def test_a_whole_sweep_modifies_nothing_outside_the_root(tmp_path: Path, harness: Any) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install -y strace)")
    root = make_root(tmp_path)
    outside = make_outside(tmp_path)
    os.symlink(outside, root / "step_99")  # a symlink with a checkpoint name: reported only
    os.symlink(outside, root / "step_3" / "link_out")  # a symlink inside a deleted step
    write_checkpoint(root, 6, {"r": 6.0})  # a complete save to finalize (it becomes the best)
    stale = write_checkpoint(root, 7, {"r": 0.5}, complete=False)
    old = time.time() - 7200
    for p in [stale, *stale.rglob("*")]:
        os.utime(p, (old, old), follow_symlinks=False)
    # Abandoned for longer than --stale-after 1s by its ctime too (a ctime cannot be set back).
    changed = max(os.lstat(p).st_ctime for p in [stale, *stale.rglob("*")])
    wait_until(lambda: time.time() > changed + 1.5, timeout=10, what="tmp_step_7 to be stale")
    os.rename(root / "step_4", root / "old_step_4")  # an interrupted replace to undo
    (trash_dir(root) / "123-step_0" / "deep").mkdir(parents=True)
    (trash_dir(root) / "123-step_0" / "deep" / "x.bin").write_bytes(b"x")
    before = snapshot(outside)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    log = tmp_path / "strace.log"
    calls = ",".join(sorted(_MUTATING | _OPENS))
    env = {"PYTHONDONTWRITEBYTECODE": "1"}

    done = harness.run(
        [
            strace,
            "-f",
            "-y",
            "-qq",
            "-s",
            "4096",
            "-e",
            f"trace={calls}",
            "-o",
            str(log),
            harness.CKPTKEEPER,
            "sweep",
            str(root),
            "--keep-top-k",
            "1",
            "--metric",
            "r",
            "--higher-is-better",
            "--stale-after",
            "1s",
            "--json",
        ],
        env=env,
        cwd=cwd,
    )
    if done.returncode != 0 and "PTRACE" in done.stderr.upper():
        pytest.skip(f"strace cannot trace here: {done.stderr.strip()[:200]}")
    doc = json.loads(done.stdout)
    actions = {(o["action"], o["status"]) for o in doc["roots"][0]["outcomes"]}
    assert {("finalize", "done"), ("delete", "done"), ("collect", "done")} <= actions
    assert ("restore", "done") in actions

    calls_seen = mutated_paths(log.read_text(), cwd)
    assert any(call.startswith("rename") for call, _ in calls_seen), "the trace caught nothing"
    outside_root = [(c, str(p)) for c, p in calls_seen if not _allowed(p, root)]
    assert outside_root == [], outside_root
    assert snapshot(outside) == before
    assert os.path.islink(root / "step_99")
    assert {p.name for p in root.iterdir() if p.name.startswith(("step_", "tmp_", "old_"))} == {
        "step_6",
        "step_99",
    }


def test_the_trace_parser_sees_writes_outside_the_root(tmp_path: Path) -> None:
    root, cwd = tmp_path / "run", tmp_path / "cwd"
    trace = "\n".join(
        [
            f'1 openat(AT_FDCWD<{cwd}>, "{root}/.ckptkeeper/lock", O_RDWR|O_CREAT, 0644) = 3',
            f'1 openat(AT_FDCWD<{cwd}>, "/etc/passwd", O_RDONLY|O_CLOEXEC) = 4',
            f'1 openat(AT_FDCWD<{cwd}>, "/dev/null", O_WRONLY) = 5',
            f'2 unlinkat(7<{tmp_path}/outside>, "precious.txt", 0) = 0',
            f'2 renameat2(AT_FDCWD<{cwd}>, "{root}/step_1", 9<{root}/x>, "y", 0 <unfinished ...>',
            '3 mkdir("relative", 0755) = 0',
            "3 <... renameat2 resumed>) = 0",
        ]
    )
    seen = mutated_paths(trace, cwd)
    outside = sorted(str(p) for _, p in seen if not _allowed(p, root))
    assert outside == [f"{cwd}/relative", f"{tmp_path}/outside/precious.txt"]
    assert ("renameat2", root / "x" / "y") in seen
