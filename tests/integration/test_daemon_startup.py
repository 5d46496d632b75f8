"""The keeper's first pass runs several roots at a time (bench P9K: on a cold disk a pass mostly
waits for reads), even with ``[daemon] workers = 1``, and no root's first pass is skipped."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fusefs import fuse_available, passthrough_mount
from tests.helpers import Daemon, steps, wait_until, write_checkpoint

from ckptkeeper import RootLock, write_marker

_REASON = fuse_available()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"FUSE unavailable: {_REASON}")

ROOTS = 8
READ_LATENCY_S = 0.5  # every read(2) through the mount waits this long: a slow network server


def test_first_pass_overlaps_roots_and_skips_none(tmp_path: Path) -> None:
    source, mountpoint = tmp_path / "src", tmp_path / "mnt"
    for r in range(ROOTS):
        for step in (1, 2):
            write_checkpoint(source / f"run-{r}", step, final=True, files=0)
    mountpoint.mkdir()
    with passthrough_mount(
        source, mountpoint, op_latency_s=READ_LATENCY_S, latency_ops=("read",)
    ) as mnt:
        config = tmp_path / "ckptkeeper.toml"
        lines = ["[defaults]", "keep_latest_n = 1", 'observer = "polling"', "", "[daemon]"]
        lines += ["workers = 1", ""]
        for r in range(ROOTS):
            lines += ["[[root]]", f'path = "{mnt / f"run-{r}"}"', ""]
        config.write_text("\n".join(lines))
        started = time.monotonic()
        daemon = Daemon(["--config", str(config)])
        try:
            daemon.wait_ready(timeout=60.0)
            took = time.monotonic() - started
            assert daemon.find("first_pass_done")
            # Every root's first pass acted: step_1 went, step_2 stayed (none skipped).
            for r in range(ROOTS):
                assert wait_until(lambda r=r: steps(source / f"run-{r}") == {2}, timeout=10.0)
        finally:
            daemon.stop(timeout=30.0)
    # One root at a time, the passes alone would wait at least ROOTS * READ_LATENCY_S for
    # the training_info.json reads (two per root, one is enough for the bound).
    assert took < ROOTS * READ_LATENCY_S, f"first pass took {took:.1f} s: roots did not overlap"


SLOW_STEPS = 6  # training_info.json reads per root's first pass
SLOW_READ_S = 1.0  # a first pass takes at least SLOW_STEPS x 1 s: a round of 12 at least 6 s


@contextlib.contextmanager
def slow_fleet(tmp_path: Path, count: int, last_steps: int = SLOW_STEPS) -> Iterator[list[Path]]:
    """``count`` roots behind a FUSE mount whose every read waits SLOW_READ_S, ``SLOW_STEPS``
    checkpoints in each (``last_steps`` in the last root)."""
    source, mountpoint = tmp_path / "src", tmp_path / "mnt"
    for r in range(count):
        for step in range(1, (last_steps if r == count - 1 else SLOW_STEPS) + 1):
            write_checkpoint(source / f"run-{r:02d}", step, final=True, files=0)
    mountpoint.mkdir()
    with passthrough_mount(
        source, mountpoint, op_latency_s=SLOW_READ_S, latency_ops=("read",)
    ) as mnt:
        yield [mnt / f"run-{r:02d}" for r in range(count)]


def keeper_of(roots: list[Path]) -> Daemon:
    args = [*map(str, roots), "--observer", "inotify", "--sweep-interval", "1h"]
    return Daemon([*args, "--log-level", "debug"])


def test_saves_are_finalized_during_a_slow_first_pass(tmp_path: Path) -> None:
    """READY means serving: once every root is watched, a save in a root whose first pass has
    not run yet is finalized at once, as is one that was in flight before the keeper started,
    before any root's first pass is over (let alone the whole, ``first_pass_done``)."""
    with slow_fleet(tmp_path, 24) as roots:  # 2 rounds of START_WORKERS (12) first passes
        held = write_checkpoint(roots[-1], 100, files=0, complete=False)  # in flight at start
        daemon = keeper_of(roots)
        try:
            daemon.wait_ready(timeout=60.0, first_pass=False)
            assert not daemon.find("first_pass_done"), "READY waited for the first pass"
            write_marker(held, ".complete")
            write_checkpoint(roots[-2], 100, files=0)  # a new save in a root not passed yet
            for root in roots[-2:]:
                daemon.wait_for("finalized", path=str(root / "tmp_step_100"), timeout=60.0)
            order = [e["event"] for e in daemon.events if e["event"] in ("finalized", "pass_done")]
            assert order[:2] == ["finalized", "finalized"], order  # before any first pass ended
            daemon.wait_for("first_pass_done", timeout=120.0)
            assert all(100 in steps(root) for root in roots[-2:])
        finally:
            daemon.stop(timeout=30.0)


def test_a_save_the_lock_held_back_waits_for_no_backlog(tmp_path: Path) -> None:
    """A marker arriving while another actor holds the root's lock is finalized by a pass of
    the root once the lock is free, not when the start's backlog reaches the root: the last of
    48 roots, taken by the start's 12 threads only once 36 first passes are over."""
    with slow_fleet(tmp_path, 48, last_steps=1) as roots:
        tmp = write_checkpoint(roots[-1], 100, files=0, complete=False)
        daemon = keeper_of(roots)
        try:
            daemon.wait_ready(timeout=60.0, first_pass=False)
            with RootLock(roots[-1]):
                write_marker(tmp, ".complete")
                daemon.wait_for("skipped", root=str(roots[-1]), timeout=60.0)
            daemon.wait_for("finalized", path=str(tmp), timeout=120.0)
            seen = list(daemon.events)  # in order (one reader thread appends)
            done = seen.index(daemon.find("finalized")[0])
            before = {e["root"] for e in seen[:done] if e["event"] == "pass_done"}
            assert len(before) < 36, f"finalized after {len(before)} first passes"
        finally:
            daemon.stop(timeout=30.0)
