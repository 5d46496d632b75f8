"""Hostile root layouts: a table of builders and what must hold after the keeper has seen them.

Every layout is built twice: once under a running ``ckptkeeper run`` and once for a
``ckptkeeper sweep`` (see ``test_hostile_layouts.py``). The policy for every root is the same:
``keep_top_k = 1``, ``metric_name = "val"``, ``higher_is_better = true`` (the latest step is
kept too), so a layout that the keeper misreads shows up as a wrong deletion.

A builder gets ``root`` (the checkpoint root the keeper is pointed at; not created yet) and
``outside`` (an existing directory beside the root that nothing may modify) and lays files out.
``mutate`` (optional) runs once the keeper is watching (daemon) or just before the sweep.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptkeeper import write_marker
from ckptkeeper.removal import MOUNTED

__all__ = [
    "HUGE_INFO_BYTES",
    "LAYOUTS",
    "METRIC",
    "NOBODY",
    "Expect",
    "Layout",
    "make_step",
]

METRIC = "val"
NOBODY = 65534
HUGE_INFO_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class Expect:
    """One log event the keeper must emit (exactly once when ``once``).

    ``path``: fnmatch pattern relative to the root matched against the event's ``path``;
    ``None``: the event must carry ``root`` == the root instead. ``reason``: substrings that must
    all appear in the event's reason/error/errno text. ``absent``: no such event may be logged.
    """

    event: str
    path: str | None = None
    reason: tuple[str, ...] = ()
    modes: tuple[str, ...] = ("run", "sweep")
    once: bool = True
    absent: bool = False  # the event must NOT be logged


@dataclass(frozen=True)
class Layout:
    name: str
    build: Callable[[Path, Path], None]
    expect: tuple[Expect, ...]
    remain: tuple[str, ...] = ()  # relative paths that must exist afterwards (lexists)
    gone: tuple[str, ...] = ()  # relative paths that must not exist afterwards
    untouched: tuple[str, ...] = ()  # checkpoint-named entries whose whole subtree is identical
    silent: tuple[str, ...] = ()  # names no log event may mention
    mutate: Callable[[Path, Path], None] | None = None
    teardown: Callable[[Path, Path], None] | None = None
    user: int | None = None  # uid/gid the daemon and the sweep run as (None: root)
    needs_mount: bool = False  # builds a read-only bind mount (skipped where mount is refused)
    root_rel: str = "root"  # where the root lies inside the layout's directory
    discover: tuple[str, ...] = ()  # [[discover]] globs relative to the layout's directory
    extra: dict[str, Any] = field(default_factory=dict)


# -- building blocks ------------------------------------------------------------------------------


def make_step(
    parent: Path,
    name: str,
    info: Any = None,
    *,
    raw: bytes | None = None,
    marker: bool = False,
    files: int = 2,
) -> Path:
    """A checkpoint-like directory ``parent/name`` with a few shards and a training_info.json.

    ``info``: a JSON-able object (NaN/inf allowed); ``raw``: exact bytes instead; neither: no
    training_info.json at all. ``marker``: write the completion marker last.
    """
    path = parent / name
    (path / "policy").mkdir(parents=True)
    for i in range(files):
        (path / "policy" / f"shard_{i}.bin").write_bytes(f"{name}:{i}".encode() * 32)
    if raw is not None:
        (path / "training_info.json").write_bytes(raw)
    elif info is not None:
        (path / "training_info.json").write_text(json.dumps(info, allow_nan=True))
    if marker:
        write_marker(path, ".complete")
    return path


def _steps(root: Path, *values: tuple[int, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for step, value in values:
        make_step(root, f"step_{step}", {METRIC: value, "step": step})


def _victim(outside: Path, name: str = "victim") -> Path:
    """A directory outside the root that looks like a prunable checkpoint root."""
    victim = outside / name
    victim.mkdir()
    make_step(victim, "step_1", {METRIC: 0.0})
    make_step(victim, "step_2", {METRIC: 0.0})
    make_step(victim, "tmp_step_3", {METRIC: 0.0}, marker=True)
    (victim / "notes.txt").write_text("outside: never touched\n")
    return victim


def _chown_tree(path: Path, uid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), uid, uid)
    os.lchown(path, uid, uid)


def _readme(root: Path) -> None:
    (root / "README.md").write_text("a non-checkpoint file beside the steps\n")


# -- training_info.json ---------------------------------------------------------------------------


def _bad_info(raw: bytes) -> Callable[[Path, Path], None]:
    def build(root: Path, outside: Path) -> None:
        _steps(root, (2, 0.5), (3, 0.2))
        make_step(root, "step_1", raw=raw)
        _readme(root)

    return build


def _unranked_step_1(name: str, build: Callable[[Path, Path], None], *reason: str) -> Layout:
    """step_1 (beside step_2 and step_3) cannot be ranked, for ``reason``: it is kept, untouched."""
    return Layout(
        name,
        build,
        (Expect("unranked", "step_1", reason),),
        remain=("step_1", "step_2", "step_3"),
        untouched=("step_1",),
    )


def _info_layout(name: str, raw: bytes, *reason: str) -> Layout:
    return _unranked_step_1(name, _bad_info(raw), *reason)


def _build_huge(root: Path, outside: Path) -> None:
    _steps(root, (2, 0.5), (3, 0.2))
    step = make_step(root, "step_1")
    # A valid JSON object of 100 MB: one long string value, written in 1 MiB chunks.
    head = b'{"val": 0.99, "blob": "'
    tail = b'"}'
    chunk = b"x" * (1 << 20)
    with open(step / "training_info.json", "wb") as fh:
        fh.write(head)
        left = HUGE_INFO_BYTES - len(head) - len(tail)
        while left > 0:
            fh.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        fh.write(tail)


def _build_info_fifo(root: Path, outside: Path) -> None:
    _steps(root, (2, 0.5), (3, 0.2))
    step = make_step(root, "step_1")
    os.mkfifo(step / "training_info.json")  # opening it for reading would block forever


def _build_info_symlink(root: Path, outside: Path) -> None:
    _steps(root, (2, 0.5), (3, 0.2))
    step = make_step(root, "step_1")
    (outside / "best.json").write_text(json.dumps({METRIC: 99.0}))
    os.symlink(outside / "best.json", step / "training_info.json")


def _build_info_dir(root: Path, outside: Path) -> None:
    _steps(root, (2, 0.5), (3, 0.2))
    step = make_step(root, "step_1")
    (step / "training_info.json").mkdir()


def _build_no_info(root: Path, outside: Path) -> None:
    _steps(root, (2, 0.5), (3, 0.2))
    make_step(root, "step_1")


# -- metric values --------------------------------------------------------------------------------


def _metric_layout(name: str, bad: Any, why: str) -> Layout:
    """step_1 best, step_2 bad (ranked last: deleted), step_3 worse (deleted), step_4 bad but the
    latest (kept). A NaN compared as a number would scramble the ranking and drop step_1."""

    def build(root: Path, outside: Path) -> None:
        _steps(root, (1, 0.9), (2, bad), (3, 0.1), (4, bad))
        _readme(root)

    return Layout(
        name,
        build,
        (
            Expect("deleted", "step_2", (why, "ranked last")),
            Expect("unranked", "step_4", (why,)),
        ),
        remain=("step_1", "step_4"),
        gone=("step_2", "step_3"),
        untouched=("step_1", "step_4"),
    )


# -- symlinks, hard links, odd file types ---------------------------------------------------------


def _build_step_symlink(root: Path, outside: Path) -> None:
    _steps(root, (1, 0.5), (2, 0.6))
    victim = _victim(outside)
    os.symlink(victim / "step_1", root / "step_0")  # would be pruned if followed (val 0.0)


def _build_tmp_symlink(root: Path, outside: Path) -> None:
    _steps(root, (1, 0.5), (2, 0.6))
    victim = _victim(outside)
    os.symlink(victim / "tmp_step_3", root / "tmp_step_3")  # complete: would be finalized


def _build_old_symlink(root: Path, outside: Path) -> None:
    _steps(root, (1, 0.5), (2, 0.6))
    victim = _victim(outside)
    os.symlink(victim / "step_2", root / "old_step_2")  # beside step_2: would be discarded


def _build_link_inside(root: Path, outside: Path) -> None:
    _steps(root, (1, 0.1), (2, 0.6))
    data = outside / "dataset"
    data.mkdir()
    for i in range(3):
        (data / f"part_{i}.bin").write_bytes(b"d" * 100)
    (outside / "vocab.txt").write_text("never delete me\n")
    step1 = root / "step_1"
    os.symlink(data, step1 / "policy" / "dataset")  # a dir symlink inside a step to be deleted
    os.symlink(outside / "vocab.txt", step1 / "vocab.txt")
    os.symlink(outside, step1 / "up")


def _build_hardlink_inside(root: Path, outside: Path) -> None:
    _steps(root, (1, 0.1), (2, 0.6))
    shared = outside / "shared_weights.bin"
    shared.write_bytes(b"w" * 4096)
    os.link(shared, root / "step_1" / "policy" / "weights.bin")


def _build_step_file(root: Path, outside: Path) -> None:
    _steps(root, (1, 0.1), (2, 0.2))
    (root / "step_3").write_text(json.dumps({METRIC: 0.0}))


def _build_step_fifo(root: Path, outside: Path) -> None:
    _steps(root, (1, 0.1), (2, 0.2))
    os.mkfifo(root / "step_3")


def _build_ambiguous(root: Path, outside: Path) -> None:
    _steps(root, (8, 0.9), (9, 0.5))
    make_step(root, "step_7", {METRIC: 0.1})
    make_step(root, "step_07", {METRIC: 0.1})


# -- names outside the grammar --------------------------------------------------------------------


def _odd_name(name: str) -> Layout:
    """A directory named almost like a checkpoint (with a worst metric) beside real steps."""

    def build(root: Path, outside: Path) -> None:
        _steps(root, (1, 0.1), (2, 0.2))
        make_step(root, name, {METRIC: 0.0})

    slug = {
        "step_-1": "negative",
        "step_1e3": "exponent",
        "step_1-hf": "hf_suffix",
        "step_\u0663": "arabic_indic_digit",
        "step_\uff13\uff12": "fullwidth_digits",
        "step_\u00b9": "superscript_digit",
        "step_1\n": "trailing_newline",
        "tmp_step_4.partial": "tmp_suffix",
    }[name]
    return Layout(
        f"name_{slug}",
        build,
        (Expect("deleted", "step_1", ("outside top-1",)),),
        remain=("step_2", name),
        gone=("step_1",),
        silent=(name,),
    )


# -- permissions (run as nobody: root ignores permission bits) ------------------------------------


def _perm_build(mode: int, *, subdir: bool = False) -> Callable[[Path, Path], None]:
    def build(root: Path, outside: Path) -> None:
        _steps(root, (1, 0.1), (2, 0.2), (3, 0.3))
        _readme(root)
        _chown_tree(root, NOBODY)
        target = root / "step_1" / "policy" if subdir else root / "step_1"
        os.chmod(target, mode)

    return build


def _trash_denied(name: str, build: Callable[[Path, Path], None]) -> Layout:
    """step_1 goes to trash, but (as nobody) part of it cannot be removed: reported as
    ``removal_incomplete``, never ``purged``."""
    trashed = ".ckptkeeper/trash/*-step_1"
    return Layout(
        name,
        build,
        (
            Expect("removal_incomplete", trashed, ("EACCES",), once=False),
            Expect("removal_incomplete", trashed, ("EACCES",), modes=("run",)),
            Expect("purged", trashed, modes=("run",), absent=True),
        ),
        remain=("step_3",),
        gone=("step_1", "step_2"),
        user=NOBODY,
        extra={"repeat_check": True},
    )


def _build_root_denied(root: Path, outside: Path) -> None:
    _steps(root, (1, 0.1), (2, 0.2))
    os.chmod(root, 0o700)  # owned by root: nobody cannot even list it


# -- unmarked saves: times and writer locks ------------------------------------------------------

LOCK_OWNER = 4242  # the trainer's uid: neither root nor the keeper (nobody)
_holders: dict[Path, subprocess.Popen[str]] = {}


def _build_preserved_mtimes(root: Path, outside: Path) -> None:
    """tmp_step_3 filled by ``cp -a`` from a save whose mtimes are 3 days old, no marker yet:
    its mtimes are old, its ctimes are now. With stale_after 6h it must not be collected."""
    _steps(root, (1, 0.1), (2, 0.2))
    source = make_step(outside, "source_save", {METRIC: 0.9})
    old = time.time() - 3 * 86400
    for dirpath, dirnames, filenames in os.walk(source):
        for name in [*dirnames, *filenames]:
            os.utime(os.path.join(dirpath, name), (old, old), follow_symlinks=False)
    os.utime(source, (old, old))
    subprocess.run(["cp", "-a", str(source), str(root / "tmp_step_3")], check=True)


def _unreadable_lock_build(held: bool) -> Callable[[Path, Path], None]:
    """An unmarked tmp_step_3 the keeper (nobody) could collect (stale_after 0s, its directory
    is nobody's), but its .writer.lock is the trainer's, mode 0600: the keeper cannot open it,
    so it cannot tell whether it is held (``held``: it is, by the trainer's process)."""

    def build(root: Path, outside: Path) -> None:
        _steps(root, (1, 0.1), (2, 0.2))
        make_step(root, "tmp_step_3", {METRIC: 0.9})
        (root / "ckptkeeper.toml").write_text('stale_after = "0s"\n')
        _chown_tree(root, NOBODY)
        lock = root / "tmp_step_3" / ".writer.lock"
        lock.touch()
        os.chown(lock, LOCK_OWNER, LOCK_OWNER)
        os.chmod(lock, 0o600)
        if held:
            _hold(root, lock)

    return build


def _hold(root: Path, lock: Path) -> None:
    """The trainer's process: flock(1) holding LOCK_EX on its lock, as the trainer's uid."""
    setpriv = shutil.which("setpriv") or "setpriv"
    ids = [f"--reuid={LOCK_OWNER}", f"--regid={LOCK_OWNER}", "--clear-groups"]
    holder = subprocess.Popen(
        [setpriv, *ids, "flock", "-x", str(lock), "sh", "-c", "echo locked; read line"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    _holders[root] = holder
    assert holder.stdout is not None
    if holder.stdout.readline() != "locked\n":
        raise RuntimeError(f"the trainer could not take {lock}")


def _release(root: Path, outside: Path) -> None:
    holder = _holders.pop(root, None)
    if holder is not None:
        assert holder.stdin is not None
        holder.stdin.close()
        try:
            holder.wait(timeout=10)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()


def _build_tmp_beside_step_symlink(root: Path, outside: Path) -> None:
    """A complete tmp_step_3 whose step_3 is a symlink: it cannot be finalized (not over a
    symlink), pass after pass; that is reported once, with that reason."""
    _steps(root, (1, 0.1), (2, 0.2))
    make_step(root, "tmp_step_3", {METRIC: 0.3}, marker=True)
    victim = _victim(outside)
    os.symlink(victim / "step_1", root / "step_3")


def _unreadable_lock_layout(name: str, held: bool) -> Layout:
    why = ("writer lock unreadable (Permission denied): treated as held",)
    return Layout(
        name,
        _unreadable_lock_build(held),
        (
            Expect("skipped", "tmp_step_3", why),
            Expect("garbage_collected", "tmp_step_3", absent=True),
            Expect("deleted", "step_1", ("outside top-1",)),
        ),
        remain=("tmp_step_3", "step_2"),
        gone=("step_1",),
        untouched=("tmp_step_3",),
        teardown=_release if held else None,
        user=NOBODY,
    )


# -- the root itself ------------------------------------------------------------------------------


def _build_plain(root: Path, outside: Path) -> None:
    _steps(root, (1, 0.1), (2, 0.2))
    _readme(root)


def _mutate_delete(root: Path, outside: Path) -> None:
    shutil.rmtree(root)


def _mutate_recreate(root: Path, outside: Path) -> None:
    shutil.rmtree(root)
    root.mkdir()
    _readme(root)
    make_step(root, "step_4", {METRIC: 0.1})
    make_step(root, "tmp_step_5", {METRIC: 0.5}, marker=True)


def _build_for_symlink(root: Path, outside: Path) -> None:
    _build_plain(root, outside)
    _victim(outside)


def _mutate_symlink(root: Path, outside: Path) -> None:
    os.rename(root, root.with_name("root.moved"))
    os.symlink(outside / "victim", root)


def _mutate_file(root: Path, outside: Path) -> None:
    shutil.rmtree(root)
    root.write_text("not a directory\n")


def _ro_build(with_area: bool) -> Callable[[Path, Path], None]:
    def build(root: Path, outside: Path) -> None:
        src = root.with_name("ro_source")
        _steps(src, (1, 0.1), (2, 0.2))
        make_step(src, "tmp_step_3", {METRIC: 0.3}, marker=True)
        _readme(src)
        if with_area:
            (src / ".ckptkeeper" / "trash").mkdir(parents=True)
            (src / ".ckptkeeper" / "lock").touch()
        root.mkdir()
        subprocess.run(["mount", "--bind", str(src), str(root)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(root)], check=True)

    return build


def _ro_teardown(root: Path, outside: Path) -> None:
    subprocess.run(["umount", "-l", str(root)], check=False, capture_output=True)


def _build_mounts_inside(root: Path, outside: Path) -> None:
    """step_1 (to be deleted) holds a bind mount of a directory of the root's own filesystem
    (same st_dev) and a tmpfs (bound from outside, so the snapshot of ``outside`` sees it)."""
    _steps(root, (1, 0.1), (2, 0.2))
    _readme(root)
    dataset = outside / "dataset"
    (dataset / "sub").mkdir(parents=True)
    for i in range(3):
        (dataset / f"part_{i}.bin").write_bytes(b"d" * 100)
        (dataset / "sub" / f"x_{i}").write_text("never delete me\n")
    scratch = outside / "scratch"
    scratch.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "ckpt-hostile", str(scratch)], check=True
    )
    (scratch / "cache.bin").write_bytes(b"c" * 100)
    for source, target in (
        (dataset, root / "step_1" / "policy" / "dataset"),
        (scratch, root / "step_1" / "scratch"),
    ):
        target.mkdir()
        subprocess.run(["mount", "--bind", str(source), str(target)], check=True)


def _unmount_all(root: Path, outside: Path) -> None:
    """Every mount below the layout's directory, wherever it went (a step moved into trash takes
    its mounts along), deepest first."""
    prefix = str(outside.parent) + "/"
    with open("/proc/self/mountinfo") as fh:
        points = [line.split(" ")[4].encode().decode("unicode_escape") for line in fh]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


# -- ckptkeeper's own area ------------------------------------------------------------------------


def _build_area_symlink(root: Path, outside: Path) -> None:
    _build_plain(root, outside)
    (outside / "area").mkdir()
    (outside / "area" / "lock").write_text("someone else's file\n")
    os.symlink(outside / "area", root / ".ckptkeeper")


def _build_area_file(root: Path, outside: Path) -> None:
    _build_plain(root, outside)
    (root / ".ckptkeeper").write_text("not a directory\n")


def _build_lock_symlink(root: Path, outside: Path) -> None:
    _build_plain(root, outside)
    (outside / "precious.txt").write_text("must not be truncated or locked\n")
    (root / ".ckptkeeper").mkdir()
    os.symlink(outside / "precious.txt", root / ".ckptkeeper" / "lock")


def _build_trash_symlink(root: Path, outside: Path) -> None:
    _build_plain(root, outside)
    fake = outside / "fake_trash"
    fake.mkdir()
    make_step(fake, "1700000000000000000-step_5", {METRIC: 0.0})
    (root / ".ckptkeeper").mkdir()
    os.symlink(fake, root / ".ckptkeeper" / "trash")


def _build_trash_entry_symlink(root: Path, outside: Path) -> None:
    _build_plain(root, outside)
    data = outside / "data"
    make_step(outside, "data", {METRIC: 0.0})
    trash = root / ".ckptkeeper" / "trash"
    trash.mkdir(parents=True)
    os.symlink(data, trash / "1700000000000000000-step_9")


# -- scale and nesting ----------------------------------------------------------------------------


def _build_many(root: Path, outside: Path) -> None:
    _steps(root, (1, 0.1), (2, 0.2))
    for i in range(7000):
        (root / f"junk_{i:05d}").mkdir()
    for i in range(1000):
        (root / f"step_{i}-hf").write_bytes(b"h")
    for i in range(1000):
        (root / f"step_{i}.bak").mkdir()
    for i in range(1000):
        os.symlink(f"../elsewhere/step_{i}", root / f"link_{i:04d}")


def _build_nested(root: Path, outside: Path) -> None:
    # root = <layout>/runs/run_a; the [[discover]] globs reach into its steps.
    _steps(root, (1, 0.9), (2, 0.2))
    make_step(root, "tmp_step_3", {METRIC: 0.1}, marker=True)
    step1 = root / "step_1"
    make_step(step1, "step_1", {METRIC: 0.0})  # a run nested inside a checkpoint
    make_step(step1, "step_2", {METRIC: 0.0})
    make_step(step1, "tmp_step_9", {METRIC: 0.0}, marker=True)
    make_step(step1 / "eval", "step_5", {METRIC: 0.0})
    make_step(step1 / "eval", "tmp_step_6", {METRIC: 0.0}, marker=True)


# -- the table ------------------------------------------------------------------------------------

_nested_root = "runs/run_a"

LAYOUTS: list[Layout] = [
    # training_info.json
    _info_layout("info_corrupt", b'{"val": 0.7, "step": ', "not valid JSON"),
    _info_layout("info_empty", b"", "not valid JSON"),
    _info_layout("info_not_object", b"[0.1, 0.2]", "not a JSON object", "list"),
    _info_layout("info_scalar", b"0.5", "not a JSON object", "float"),
    _info_layout("info_deep_nesting", b"[" * 200_000 + b"]" * 200_000, "not valid JSON"),
    _info_layout("info_invalid_utf8", b'{"val": "\xff\xfe\xfa"}', "not valid JSON"),
    _unranked_step_1("info_huge_100mb", _build_huge, "too large"),
    _unranked_step_1("info_fifo", _build_info_fifo, "not a regular file"),
    _unranked_step_1("info_symlink_outside", _build_info_symlink, "not a regular file"),
    _unranked_step_1("info_is_directory", _build_info_dir, "not a regular file"),
    _unranked_step_1("info_missing", _build_no_info, "no training_info.json"),
    # metric values
    _metric_layout("metric_nan", float("nan"), "not finite"),
    _metric_layout("metric_inf", float("inf"), "not finite"),
    _metric_layout("metric_neg_inf", float("-inf"), "not finite"),
    _metric_layout("metric_string", "0.95", "not a number (str)"),
    _metric_layout("metric_bool", True, "not a number (bool)"),
    _metric_layout("metric_nested", {"mean": 0.95}, "not a number (dict)"),
    # symlinks, links and odd types
    Layout(
        "step_symlink_outside",
        _build_step_symlink,
        (Expect("ignored", "step_0", ("symlink",)),),
        remain=("step_0", "step_2"),
        gone=("step_1",),
        untouched=("step_0",),
    ),
    Layout(
        "tmp_step_symlink_outside",
        _build_tmp_symlink,
        (Expect("ignored", "tmp_step_3", ("symlink",)),),
        remain=("tmp_step_3", "step_2"),
        gone=("step_3",),
        untouched=("tmp_step_3",),
    ),
    Layout(
        "old_step_symlink_outside",
        _build_old_symlink,
        (Expect("ignored", "old_step_2", ("symlink",)),),
        remain=("old_step_2", "step_2"),
        untouched=("old_step_2",),
    ),
    Layout(
        "symlinks_inside_deleted_step",
        _build_link_inside,
        (Expect("deleted", "step_1", ("outside top-1",)),),
        remain=("step_2",),
        gone=("step_1",),
    ),
    Layout(
        "hardlink_inside_deleted_step",
        _build_hardlink_inside,
        (Expect("deleted", "step_1", ("outside top-1",)),),
        remain=("step_2",),
        gone=("step_1",),
    ),
    Layout(
        "step_is_regular_file",
        _build_step_file,
        (Expect("ignored", "step_3", ("not a directory",)),),
        remain=("step_2", "step_3"),
        gone=("step_1",),
        untouched=("step_3",),
    ),
    Layout(
        "step_is_fifo",
        _build_step_fifo,
        (Expect("ignored", "step_3", ("not a directory",)),),
        remain=("step_2", "step_3"),
        gone=("step_1",),
        untouched=("step_3",),
    ),
    Layout(
        "ambiguous_step_7_and_step_07",
        _build_ambiguous,
        (
            Expect("ignored", "step_7", ("ambiguous",)),
            Expect("ignored", "step_07", ("ambiguous",)),
        ),
        remain=("step_7", "step_07", "step_8", "step_9"),
        untouched=("step_7", "step_07"),
    ),
    # names outside the grammar
    *(
        _odd_name(n)
        for n in (
            "step_-1",
            "step_1e3",
            "step_1-hf",
            "step_\u0663",
            "step_\uff13\uff12",
            "step_\u00b9",
            "step_1\n",
            "tmp_step_4.partial",
        )
    ),
    # permissions (as nobody)
    Layout(
        "perm_step_mode_000",
        _perm_build(0o000),
        (Expect("unranked", "step_1", ("EACCES",)),),
        remain=("step_1", "step_3"),
        gone=("step_2",),
        untouched=("step_1",),
        user=NOBODY,
    ),
    Layout(
        "perm_step_no_execute",
        _perm_build(0o600),
        (Expect("unranked", "step_1", ("EACCES",)),),
        remain=("step_1", "step_3"),
        gone=("step_2",),
        untouched=("step_1",),
        user=NOBODY,
    ),
    _trash_denied("perm_step_no_read", _perm_build(0o300)),
    _trash_denied("perm_subdir_mode_000", _perm_build(0o000, subdir=True)),
    Layout(
        "perm_root_not_accessible",
        _build_root_denied,
        (Expect("root_problem", None, ("EACCES",)),),
        remain=("step_1", "step_2"),
        untouched=("step_1", "step_2"),
        user=NOBODY,
    ),
    # unmarked saves: times and writer locks
    Layout(
        "tmp_step_preserved_mtimes",
        _build_preserved_mtimes,
        (
            Expect("garbage_collected", "tmp_step_3", absent=True),
            Expect("deleted", "step_1", ("outside top-1",)),
        ),
        remain=("tmp_step_3", "step_2"),
        gone=("step_1",),
        untouched=("tmp_step_3",),
    ),
    _unreadable_lock_layout("tmp_step_writer_lock_unreadable_held", held=True),
    _unreadable_lock_layout("tmp_step_writer_lock_unreadable_not_held", held=False),
    Layout(
        "complete_tmp_step_beside_step_symlink",
        _build_tmp_beside_step_symlink,
        (
            Expect("skipped", "tmp_step_3", ("step_3 is in the way (symlink: not followed)",)),
            Expect("ignored", "step_3", ("symlink",)),
            Expect("finalized", "tmp_step_3", absent=True),
            Expect("deleted", "step_1", ("outside top-1",)),
        ),
        remain=("tmp_step_3", "step_3", "step_2"),
        gone=("step_1",),
        untouched=("tmp_step_3", "step_3"),
    ),
    # the root itself
    Layout(
        "root_deleted_while_watched",
        _build_plain,
        (Expect("root_problem", None, ("root does not exist",)),),
        mutate=_mutate_delete,
    ),
    Layout(
        "root_recreated_while_watched",
        _build_plain,
        (
            Expect("finalized", "tmp_step_5"),
            Expect("deleted", "step_4", ("outside top-1",)),
        ),
        remain=("step_5",),
        gone=("step_4", "tmp_step_5"),
        mutate=_mutate_recreate,
    ),
    Layout(
        "root_replaced_by_symlink",
        _build_for_symlink,
        (Expect("root_problem", None, ("symlink",)),),
        mutate=_mutate_symlink,
    ),
    Layout(
        "root_replaced_by_file",
        _build_plain,
        (Expect("root_problem", None, ("not a directory",)),),
        mutate=_mutate_file,
    ),
    Layout(
        "root_readonly_bind_mount",
        _ro_build(with_area=False),
        (Expect("root_problem", None, ("EROFS",)),),
        remain=("step_1", "step_2", "tmp_step_3"),
        untouched=("step_1", "step_2", "tmp_step_3"),
        teardown=_ro_teardown,
        needs_mount=True,
    ),
    Layout(
        "root_readonly_bind_mount_with_area",
        _ro_build(with_area=True),
        (Expect("root_problem", None, ("EROFS",)),),
        remain=("step_1", "step_2", "tmp_step_3"),
        untouched=("step_1", "step_2", "tmp_step_3", ".ckptkeeper"),
        teardown=_ro_teardown,
        needs_mount=True,
    ),
    Layout(
        "mount_points_inside_deleted_step",
        _build_mounts_inside,
        (
            Expect("deleted", "step_1", ("outside top-1",)),
            # Left in trash, both mount points named once, never entered, no EBUSY.
            Expect("removal_incomplete", ".ckptkeeper/trash/*-step_1", (MOUNTED,), once=False),
            Expect("removal_incomplete", ".ckptkeeper/trash/*-step_1", (MOUNTED,), modes=("run",)),
            Expect("removal_incomplete", ".ckptkeeper/trash/*", ("EBUSY",), absent=True),
            Expect("purged", ".ckptkeeper/trash/*-step_1", modes=("run",), absent=True),
        ),
        remain=("step_2",),
        gone=("step_1",),
        teardown=_unmount_all,
        needs_mount=True,
    ),
    # ckptkeeper's own area
    Layout(
        "area_is_symlink_outside",
        _build_area_symlink,
        (Expect("root_problem", None, ("ENOTDIR",)),),
        remain=("step_1", "step_2"),
        untouched=("step_1", "step_2", ".ckptkeeper"),
    ),
    Layout(
        "area_is_regular_file",
        _build_area_file,
        (Expect("root_problem", None, ("ENOTDIR",)),),
        remain=("step_1", "step_2"),
        untouched=("step_1", "step_2", ".ckptkeeper"),
    ),
    Layout(
        "lock_is_symlink_outside",
        _build_lock_symlink,
        (Expect("root_problem", None, ("ELOOP",)),),
        remain=("step_1", "step_2"),
        untouched=("step_1", "step_2", ".ckptkeeper"),
    ),
    Layout(
        "trash_is_symlink_outside",
        _build_trash_symlink,
        (
            # The delete cannot go through a trash that is not a directory: named, with errno.
            Expect("action_failed", "step_1", ("ENOTDIR",), once=False),
            Expect("action_failed", "step_1", ("ENOTDIR",), modes=("run",)),
            Expect("removal_incomplete", ".ckptkeeper/trash/*", absent=True),
        ),
        remain=("step_1", "step_2"),
    ),
    Layout(
        "trash_entry_symlink_outside",
        _build_trash_entry_symlink,
        (Expect("purged", ".ckptkeeper/trash/1700000000000000000-step_9"),),
        remain=("step_2",),
        gone=("step_1", ".ckptkeeper/trash/1700000000000000000-step_9"),
    ),
    # scale and nesting
    Layout(
        "top_level_10000_entries",
        _build_many,
        (Expect("deleted", "step_1", ("outside top-1",)),),
        remain=("step_2",),
        gone=("step_1",),
    ),
    Layout(
        "nested_runs_not_discovered",
        _build_nested,
        (
            Expect("finalized", "tmp_step_3"),
            Expect("deleted", "step_2", ("outside top-1",)),
        ),
        remain=("step_1", "step_3"),
        gone=("step_2", "tmp_step_3"),
        untouched=("step_1",),
        root_rel=_nested_root,
        discover=("runs/*", "runs/*/*", "runs/*/*/*", "runs/*/*/*/*"),
    ),
]

assert len({layout.name for layout in LAYOUTS}) == len(LAYOUTS)


def is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False
