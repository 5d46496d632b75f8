"""Hostile layouts (tests/reliability/layouts.py) against the running daemon and `ckptkeeper sweep`.

One module-scoped fixture builds every layout twice (one tree for ``ckptkeeper run``, one for
``ckptkeeper sweep``), each group beside a healthy root, runs one daemon over all run-tree roots
(``--sweep-interval 1s``, several passes) and one sweep over all sweep-tree roots, and snapshots
what must not change. Layouts marked ``user=NOBODY`` get their own daemon and sweep run as
``nobody`` through ``setpriv`` (root ignores permission bits). The tests then read the results:

* ``test_keeper_survives``: the daemon stays up and exits 0 on SIGTERM, nothing crashes, and the
  healthy root is finalized and pruned while the hostile roots sit beside it;
* ``test_problem_logged_once``: each expected event is there, names the path (or root) and a
  reason, and is logged once although the daemon made several passes;
* ``test_nothing_else_touched``: everything outside the roots and every non-checkpoint name inside
  them is identical (paths, types, modes, sizes, mtimes, content hashes, symlink targets); what
  must remain remains, what must go is gone; no root is discovered inside a checkpoint.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests import helpers
from tests.helpers import Daemon, wait_until
from tests.reliability.layouts import (
    HUGE_INFO_BYTES,
    LAYOUTS,
    METRIC,
    NOBODY,
    Expect,
    Layout,
    make_step,
)

from ckptkeeper.names import parse_name

MODES = ("run", "sweep")
PASSES = 3  # passes every daemon root must make after the last change before we look
SETPRIV = shutil.which("setpriv")
CRASH_EVENTS = {"pass_crashed", "refresh_failed"}


# -- snapshots ------------------------------------------------------------------------------------


def _describe(path: Path) -> tuple[Any, ...]:
    st = os.lstat(path)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        return ("link", os.readlink(path))
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as fh:
            digest = hashlib.file_digest(fh, "blake2b").hexdigest()
        return ("file", mode, st.st_size, st.st_mtime_ns, digest)
    if stat.S_ISDIR(st.st_mode):
        return ("dir", mode, st.st_mtime_ns)
    return ("other", stat.S_IFMT(st.st_mode), mode, st.st_mtime_ns)


def snapshot(path: Path, prefix: str = "") -> dict[str, tuple[Any, ...]]:
    """Every entry below ``path`` (included), symlinks never followed."""
    out: dict[str, tuple[Any, ...]] = {}
    if not os.path.lexists(path):
        return out
    stack = [(path, prefix or ".")]
    while stack:
        current, rel = stack.pop()
        out[rel] = _describe(current)
        if out[rel][0] == "dir":
            for name in os.listdir(current):
                stack.append((current / name, f"{rel}/{name}"))
    return out


def inside_snapshot(root: Path, untouched: tuple[str, ...]) -> dict[str, tuple[Any, ...]]:
    """The root's non-checkpoint names (except .ckptkeeper) plus the ``untouched`` entries."""
    if not os.path.lexists(root):
        return {}
    if not stat.S_ISDIR(os.lstat(root).st_mode):
        return {".": _describe(root)}
    out: dict[str, tuple[Any, ...]] = {}
    names = set(os.listdir(root))
    for name in sorted(names | set(untouched)):
        wanted = name in untouched or (parse_name(name) is None and name != ".ckptkeeper")
        if not wanted:
            continue
        if name not in names:
            out[name] = ("missing",)
        else:
            out.update(snapshot(root / name, name))
    return out


# -- the shared run -------------------------------------------------------------------------------


@dataclass
class Built:
    layout: Layout
    mode: str
    group: str
    dir: Path
    root: Path
    outside: Path
    skip: str | None = None
    error: str | None = None
    before_outside: dict[str, Any] = field(default_factory=dict)
    before_inside: dict[str, Any] = field(default_factory=dict)
    after_outside: dict[str, Any] = field(default_factory=dict)
    after_inside: dict[str, Any] = field(default_factory=dict)

    def take_before(self) -> None:
        self.before_outside = snapshot(self.outside)
        self.before_inside = inside_snapshot(self.root, self.layout.untouched)

    def take_after(self) -> None:
        self.after_outside = snapshot(self.outside)
        self.after_inside = inside_snapshot(self.root, self.layout.untouched)


@dataclass
class Group:
    """One keeper invocation: the daemon (mode run) or the sweep (mode sweep) of one user."""

    mode: str
    user: int | None
    dir: Path
    healthy: Path
    layouts: list[Built] = field(default_factory=list)
    daemon: Daemon | None = None
    sweep: subprocess.Popen[str] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    stderr: str = ""
    rc: int | None = None
    alive_before_stop: bool = False
    healthy_names: set[str] = field(default_factory=set)
    skip: str | None = None

    @property
    def key(self) -> str:
        return f"{self.mode}-{'nobody' if self.user else 'root'}"

    def roots(self) -> list[Path]:
        usable = [b for b in self.layouts if b.skip is None and b.error is None]
        return [self.healthy, *(b.root for b in usable if not b.layout.discover)]

    def config(self) -> Path:
        lines = [
            "[defaults]",
            "keep_top_k = 1",
            f'metric_name = "{METRIC}"',
            "higher_is_better = true",
            'sweep_interval = "1s"',
        ]
        for b in self.layouts:
            if b.skip is None and b.error is None:
                for pattern in b.layout.discover:
                    lines += ["", "[[discover]]", f"glob = {json.dumps(str(b.dir / pattern))}"]
        path = self.dir / "ckptkeeper.toml"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o644)
        return path

    def command_prefix(self) -> list[str]:
        if self.user is None:
            return []
        assert SETPRIV is not None
        return [SETPRIV, f"--reuid={self.user}", f"--regid={self.user}", "--clear-groups"]


def _unprivileged_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "not running as root: cannot switch to nobody (and permission bits apply anyway)"
    if SETPRIV is None:
        return "setpriv not installed: cannot run the keeper as nobody"
    probe = subprocess.run(
        [
            SETPRIV,
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            helpers.CKPTKEEPER,
            "--version",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"cannot run ckptkeeper as nobody: {probe.stderr.strip()[:200]}"
    return None


def _mount_unavailable(base: Path) -> str | None:
    if os.geteuid() != 0:
        return "not root: cannot bind-mount read-only"
    src, dst = base / ".probe_src", base / ".probe_dst"
    src.mkdir()
    dst.mkdir()
    try:
        done = subprocess.run(
            ["mount", "--bind", str(src), str(dst)], capture_output=True, text=True
        )
        if done.returncode != 0:
            return f"mount --bind refused: {done.stderr.strip()[:200]}"
        ro = subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(dst)], capture_output=True, text=True
        )
        subprocess.run(["umount", "-l", str(dst)], capture_output=True)
        if ro.returncode != 0:
            return f"read-only remount refused: {ro.stderr.strip()[:200]}"
        return None
    finally:
        src.rmdir()
        dst.rmdir()


def _write_healthy(group: Group) -> None:
    root = group.healthy
    root.mkdir(parents=True)
    make_step(root, "step_1", {METRIC: 0.1})
    make_step(root, "step_2", {METRIC: 0.2})
    if group.mode == "sweep":
        make_step(root, "tmp_step_3", {METRIC: 0.3}, marker=True)
    if group.user is not None:
        _chown(root, group.user)


def _chown(path: Path, uid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), uid, uid)
    os.lchown(path, uid, uid)


def _publish_healthy_save(group: Group) -> None:
    """A complete save appears atomically in the healthy root (staged, then one rename)."""
    staging = group.dir / "staging"
    staging.mkdir()
    save = make_step(staging, "tmp_step_3", {METRIC: 0.3}, marker=True)
    if group.user is not None:
        _chown(save, group.user)
    os.rename(save, group.healthy / "tmp_step_3")


def _build(group: Group, layout: Layout, skips: dict[str, str | None]) -> Built:
    ldir = group.dir / layout.name
    root = ldir / layout.root_rel
    outside = ldir / "outside"
    built = Built(layout, group.mode, group.key, ldir, root, outside)
    if layout.user is not None and skips["nobody"]:
        built.skip = skips["nobody"]
        return built
    if layout.needs_mount and skips["mount"]:
        built.skip = skips["mount"]
        return built
    outside.mkdir(parents=True)
    try:
        layout.build(root, outside)
    except Exception as exc:  # reported by the layout's tests, not by the whole module
        built.error = f"build failed: {exc!r}"
    return built


def _parse_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                out.append(event)
    return out


def _pass_count(events: list[dict[str, Any]], root: Path) -> int:
    return sum(1 for e in events if e.get("event") == "pass_done" and e.get("root") == str(root))


def _base_dir() -> Path:
    """A fresh directory for every tree: tmpfs when there is one (10,000 entries and two 100 MB
    files are built and snapshotted in a blink there), else the default temp dir."""
    parent = os.environ.get("CKPTKEEPER_HOSTILE_BASE")
    if parent is None and os.access("/dev/shm", os.W_OK):
        vfs = os.statvfs("/dev/shm")
        if vfs.f_bavail * vfs.f_frsize >= 4 * HUGE_INFO_BYTES + (256 << 20):  # two 100 MB files
            parent = "/dev/shm"
    base = Path(tempfile.mkdtemp(prefix="ckptkeeper-hostile-", dir=parent))
    base.chmod(0o755)  # nobody must reach its roots
    return base


def _start_daemon(group: Group, base: Path) -> Daemon:
    args = ["--config", str(group.config()), "--log-level", "debug"]
    args += [str(r) for r in group.roots()]
    prefix = group.command_prefix()
    if not prefix:
        return Daemon(args)
    # Daemon runs [helpers.CKPTKEEPER, "run", ...]: point it at a wrapper that drops privileges
    # (exec all the way down: SIGTERM reaches the keeper itself).
    wrapper = base / f"ckptkeeper-as-{group.user}"
    wrapper.write_text(f'#!/bin/sh\nexec {" ".join(prefix)} {helpers.CKPTKEEPER} "$@"\n')
    wrapper.chmod(0o755)
    saved, helpers.CKPTKEEPER = helpers.CKPTKEEPER, str(wrapper)
    try:
        return Daemon(args)
    finally:
        helpers.CKPTKEEPER = saved


def _drive_passes(group: Group) -> None:
    """Make every root of the daemon pass ``PASSES`` more times.

    Passes are driven by SIGHUP (reload = re-expand roots + a pass of every root) rather than
    by waiting for ``sweep_interval`` (that the periodic sweep runs is checked by
    test_periodic_sweep_keeps_its_interval): it is faster and each pass is known to have run.
    """
    d = group.daemon
    assert d is not None
    roots = [*group.roots(), *(b.root for b in group.layouts if b.layout.discover)]

    def all_passed(marks: dict[Path, int]) -> bool:
        return all(_pass_count(d.events, r) > marks[r] for r in roots)

    for i in range(PASSES):
        marks = {r: _pass_count(d.events, r) for r in roots}
        reloads = len(d.find("config_reloaded"))
        d.signal(signal.SIGHUP)
        d.wait_for("config_reloaded", count=reloads + 1, timeout=20)
        wait_until(
            functools.partial(all_passed, marks),
            timeout=30,
            interval=0.05,
            what=f"pass {i + 1}/{PASSES} of every root of {group.key}",
        )


@pytest.fixture(scope="module")
def hostile(report_summary: Callable[[str], None]) -> Iterator[dict[str, Group]]:
    started = time.monotonic()
    base = _base_dir()
    skips = {"nobody": _unprivileged_unavailable(), "mount": _mount_unavailable(base)}
    groups: dict[str, Group] = {}
    try:
        for mode in MODES:
            for user in (None, NOBODY):
                gdir = base / f"{mode}-{'nobody' if user else 'root'}"
                gdir.mkdir()
                group = Group(mode, user, gdir, gdir / "healthy" / "root")
                if user is not None and skips["nobody"]:
                    group.skip = skips["nobody"]
                groups[group.key] = group
                for layout in LAYOUTS:
                    if (layout.user is None) == (user is None):
                        group.layouts.append(_build(group, layout, skips))
                if group.skip is None:
                    _write_healthy(group)
        live = [g for g in groups.values() if g.skip is None]
        for group in live:
            for b in group.layouts:
                if b.skip is None and b.error is None and b.layout.mutate is None:
                    b.take_before()
        for group in live:
            if group.mode == "run":
                group.daemon = _start_daemon(group, base)
        # Sweeps: apply the changes first (nothing watches), then one pass over everything.
        for group in live:
            if group.mode != "sweep":
                continue
            for b in group.layouts:
                if b.skip is None and b.error is None and b.layout.mutate is not None:
                    b.layout.mutate(b.root, b.outside)
                    b.take_before()
            cmd = [
                *group.command_prefix(),
                helpers.CKPTKEEPER,
                "sweep",
                "--config",
                str(group.config()),
                *(str(r) for r in group.roots()),
            ]
            group.sweep = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        # Daemons: change the watched roots, publish a save in the healthy root, then make every
        # root pass a few more times so that "logged once" means something.
        for group in live:
            if group.daemon is None:
                continue
            group.daemon.wait_ready(timeout=60)
            for b in group.layouts:
                if b.skip is None and b.error is None and b.layout.mutate is not None:
                    b.layout.mutate(b.root, b.outside)
                    b.take_before()
            _publish_healthy_save(group)
        for group in live:
            d = group.daemon
            if d is None:
                continue
            with contextlib.suppress(AssertionError):  # test_keeper_survives reports it
                d.wait_for("deleted", root=str(group.healthy), step=2, timeout=20)
            _drive_passes(group)
            group.alive_before_stop = d.proc.poll() is None
            group.rc = d.stop(timeout=15)
            group.events = list(d.events)
            group.stderr = "".join(d.stderr)
        for group in live:
            if group.sweep is not None:
                out, err = group.sweep.communicate(timeout=120)
                group.rc = group.sweep.returncode
                group.events = _parse_lines(out)
                group.stderr = err
        for group in live:
            group.healthy_names = set(os.listdir(group.healthy))
            for b in group.layouts:
                if b.skip is None and b.error is None:
                    b.take_after()
        skipped = sorted({b.layout.name for g in groups.values() for b in g.layouts if b.skip})
        report_summary(
            f"hostile layouts: {len(LAYOUTS)} layouts x {len(MODES)} modes (run, sweep), "
            f"{len(skipped)} skipped, shared daemons+sweeps in {time.monotonic() - started:.1f}s",
        )
        yield groups
    finally:
        for group in groups.values():
            if group.daemon is not None:
                group.daemon.kill()
            if group.sweep is not None and group.sweep.poll() is None:
                group.sweep.kill()
                group.sweep.communicate()
            for b in group.layouts:
                if b.layout.teardown is not None and b.skip is None:
                    with contextlib.suppress(Exception):
                        b.layout.teardown(b.root, b.outside)
        shutil.rmtree(base, ignore_errors=True)


def _built(groups: dict[str, Group], mode: str, layout: Layout) -> tuple[Group, Built]:
    key = f"{mode}-{'nobody' if layout.user else 'root'}"
    group = groups[key]
    built = next(b for b in group.layouts if b.layout is layout)
    if built.skip is not None:
        pytest.skip(built.skip)
    assert built.error is None, built.error
    return group, built


# -- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["run-root", "run-nobody", "sweep-root", "sweep-nobody"])
def test_keeper_survives(hostile: dict[str, Group], key: str) -> None:
    group = hostile[key]
    if group.skip is not None:
        pytest.skip(group.skip)
    crashes = [e for e in group.events if e.get("event") in CRASH_EVENTS]
    assert not crashes, crashes
    assert "Traceback" not in group.stderr, group.stderr[-3000:]
    if group.mode == "run":
        assert group.alive_before_stop, f"daemon died: {group.stderr[-3000:]}"
        assert group.rc == 0, f"daemon exit code {group.rc}: {group.stderr[-3000:]}"
    else:
        assert group.rc in (0, 1), f"sweep exit code {group.rc}: {group.stderr[-3000:]}"
    # The healthy root beside the hostile ones is kept as usual: finalized, then pruned.
    healthy = str(group.healthy)
    assert [e for e in group.events if e.get("event") == "finalized" and e.get("root") == healthy]
    deleted = {
        e.get("step")
        for e in group.events
        if e.get("event") == "deleted" and e.get("root") == healthy
    }
    assert deleted == {1, 2}, deleted
    assert group.healthy_names == {"step_3", ".ckptkeeper"}, group.healthy_names


def _matches(events: list[dict[str, Any]], built: Built, exp: Expect) -> list[dict[str, Any]]:
    root = str(built.root)
    found = []
    for e in events:
        if e.get("event") != exp.event:
            continue
        if exp.path is None:
            if e.get("root") != root:
                continue
        else:
            path = e.get("path")
            if not isinstance(path, str) or not path.startswith(root + "/"):
                continue
            if not fnmatch.fnmatchcase(path[len(root) + 1 :], exp.path):
                continue
        text = " ".join(str(e.get(k, "")) for k in ("reason", "error", "errno"))
        if all(part in text for part in exp.reason):
            found.append(e)
    return found


def _expect_params() -> list[Any]:
    params = []
    for layout in LAYOUTS:
        for i, exp in enumerate(layout.expect):
            for mode in exp.modes:
                params.append(pytest.param(mode, layout, exp, id=f"{mode}-{layout.name}-{i}"))
    return params


@pytest.mark.parametrize(("mode", "layout", "exp"), _expect_params())
def test_problem_logged_once(
    hostile: dict[str, Group], mode: str, layout: Layout, exp: Expect
) -> None:
    group, built = _built(hostile, mode, layout)
    found = _matches(group.events, built, exp)
    if exp.absent:
        assert not found, f"{exp.event} must not be logged here: {found[:4]}"
        return
    assert found, (
        f"no {exp.event} for {exp.path or 'the root'} with {exp.reason} in {built.root}; events "
        f"there: {[e for e in group.events if str(built.root) in json.dumps(e)][:8]}"
    )
    for e in found:
        assert e.get("root") == str(built.root), e
        assert e.get("reason") or e.get("error"), e
        if exp.path is not None:
            assert e.get("path"), e
    if exp.once:
        assert len(found) == 1, f"logged {len(found)} times: {found[:4]}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay.name for lay in LAYOUTS])
@pytest.mark.parametrize("mode", MODES)
def test_nothing_else_touched(hostile: dict[str, Group], mode: str, layout: Layout) -> None:
    group, built = _built(hostile, mode, layout)
    assert built.after_outside == built.before_outside, _diff(
        built.before_outside, built.after_outside
    )
    assert built.after_inside == built.before_inside, _diff(built.before_inside, built.after_inside)
    for rel in layout.remain:
        assert os.path.lexists(built.root / rel), f"{rel} vanished"
    for rel in layout.gone:
        hits = [p for p in _glob(built.root, rel)]
        assert not hits, f"{hits} should be gone"
    for e in group.events:
        path, root = e.get("path"), e.get("root")
        for name in layout.silent:
            assert path != str(built.root / name), f"{name!r} is not a checkpoint: {e}"
        # No root is ever found inside this layout but the layout's root itself.
        if isinstance(root, str) and root.startswith(str(built.dir) + "/"):
            assert root == str(built.root), f"unexpected root {root}: {e}"


def _glob(root: Path, pattern: str) -> list[Path]:
    if not any(c in pattern for c in "*?["):
        return [root / pattern] if os.path.lexists(root / pattern) else []
    parent = root / os.path.dirname(pattern)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    return [parent / n for n in names if fnmatch.fnmatchcase(n, os.path.basename(pattern))]


def _diff(before: dict[str, Any], after: dict[str, Any]) -> str:
    lines = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            lines.append(f"{key!r}: {before.get(key)} -> {after.get(key)}")
    return "changed:\n" + "\n".join(lines[:20])


def test_periodic_sweep_keeps_its_interval(tmp_path: Path) -> None:
    """With ``--sweep-interval 0.5s`` and nothing else happening, passes come every 0.5 s."""
    root = tmp_path / "run"
    make_step(root, "step_1", {METRIC: 0.1})
    d = Daemon([str(root), "--sweep-interval", "0.5s", "--log-level", "debug"])
    try:
        d.wait_ready()
        after_ready = len(d.find("pass_done"))
        d.wait_for("pass_done", count=after_ready + 6, timeout=10)  # ~3 s
    finally:
        assert d.stop() == 0


def test_layout_table_is_large_enough() -> None:
    assert len(LAYOUTS) >= 25
