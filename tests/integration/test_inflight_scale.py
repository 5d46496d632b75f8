"""The real daemon with thousands of in-flight saves: its threads stay few, a marker is finalized
within seconds, SIGTERM is obeyed, passes go on under a task limit, and watches past their bound
(ours, or the kernel's: a user namespace with few inotify watches) fall back to polling, logged
once."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers import Daemon, steps, write_checkpoint
from tests.userns import inotify_limited, userns_unavailable

from ckptkeeper import write_marker

MAX_THREADS = 50
KEEP_ALL = ["--keep-latest-n", "1000000"]


def saves(root: Path, count: int) -> list[Path]:
    """``count`` empty in-flight saves (a trainer's mkdir, nothing written yet)."""
    root.mkdir(parents=True, exist_ok=True)
    tmps = [root / f"tmp_step_{n}" for n in range(1, count + 1)]
    for t in tmps:
        t.mkdir()
    return tmps


def tasks(d: Daemon) -> int:
    return len(os.listdir(f"/proc/{d.proc.pid}/task"))


def finalize_seconds(d: Daemon, tmp: Path, step: int, timeout: float = 10.0) -> float:
    started = time.monotonic()
    write_marker(tmp, ".complete")
    d.wait_for("finalized", step=step, timeout=timeout)
    return time.monotonic() - started


def sigterm_seconds(d: Daemon) -> float:
    started = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0
    return time.monotonic() - started


def test_threads_stay_bounded_with_2000_in_flight_saves(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    root = tmp_path / "run"
    tmps = saves(root, 2000)
    d = Daemon([str(root), *KEEP_ALL, "--sweep-interval", "1h"])
    daemons.append(d)
    d.wait_ready(timeout=60)
    assert d.find("first_pass_done")
    assert tasks(d) <= MAX_THREADS
    assert finalize_seconds(d, tmps[-1], 2000) < 10
    assert finalize_seconds(d, tmps[0], 1) < 10
    assert tasks(d) <= MAX_THREADS
    assert sigterm_seconds(d) < 10


@pytest.mark.slow
def test_a_marker_among_20000_in_flight_saves_is_finalized_and_sigterm_obeyed_within_10s(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    root = tmp_path / "run"
    tmps = saves(root, 20_000)
    d = Daemon([str(root), *KEEP_ALL, "--sweep-interval", "1h"])
    daemons.append(d)
    d.wait_ready(timeout=90)
    assert tasks(d) <= MAX_THREADS
    # Saves are watched in name order: tmp_step_1 by inotify, tmp_step_9999 past the bound
    # (8192 inotify watches of in-flight saves) is polled.
    assert finalize_seconds(d, tmps[0], 1) < 10
    assert finalize_seconds(d, tmps[9998], 9999) < 10
    assert len(d.find("watch_limit_reached")) == 1
    assert tasks(d) <= MAX_THREADS
    assert sigterm_seconds(d) < 10


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """A directory another uid can reach (pytest's tmp_path is root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="ckptkeeper-nproc-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_passes_keep_working_under_a_task_limit(shared_base: Path, daemons: list[Daemon]) -> None:
    prlimit, setpriv = shutil.which("prlimit"), shutil.which("setpriv")
    if prlimit is None or setpriv is None:
        pytest.skip("prlimit and setpriv (util-linux) are needed")
    # RLIMIT_NPROC counts every task of a real uid and is not enforced for root: a uid of its own.
    uid = 47_000 + os.getpid() % 1000
    root = shared_base / "run"
    tmps = saves(root, 2000)
    write_checkpoint(root, 5000, final=True)
    for path in [root, *root.rglob("*")]:
        os.lchown(path, uid, uid)
    limit = [prlimit, "--nproc=64:64", setpriv, f"--reuid={uid}", f"--regid={uid}"]
    args = [str(root), *KEEP_ALL, "--sweep-interval", "1s", "--log-level", "debug"]
    d = Daemon(args, prefix=[*limit, "--clear-groups"])
    daemons.append(d)
    d.wait_ready(timeout=60)
    assert d.find("first_pass_done")
    passes = len(d.find("pass_done"))
    d.wait_for("pass_done", count=passes + 3, timeout=15)  # the periodic sweep goes on
    marker = tmps[-1] / ".complete"
    write_marker(tmps[-1], ".complete")
    os.lchown(marker, uid, uid)
    d.wait_for("finalized", step=2000, timeout=10)
    assert not [line for line in d.stderr if "can't start new thread" in line]
    assert not d.find("pass_crashed")
    assert sigterm_seconds(d) < 10


def test_max_tmp_watches_from_the_config_bounds_watches_and_is_logged_once(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    root = tmp_path / "run"
    tmps = saves(root, 6)
    cfg = tmp_path / "ckptkeeper.toml"
    cfg.write_text(
        '[defaults]\nkeep_latest_n = 100\nsweep_interval = "1h"\n\n'
        f'[daemon]\nmax_tmp_watches = 2\n\n[[root]]\npath = "{root}"\n'
    )
    d = Daemon(["--config", str(cfg)])
    daemons.append(d)
    d.wait_ready()
    limited = d.wait_for("watch_limit_reached")[0]
    assert limited["max_tmp_watches"] == 2 and limited["fallback"] == "polling"
    for step in (6, 5, 1):  # polled past the bound (6, 5) and watched by inotify (1)
        assert finalize_seconds(d, tmps[step - 1], step) < 10
    assert len(d.find("watch_limit_reached")) == 1
    assert steps(root) == {1, 5, 6}
    assert sigterm_seconds(d) < 10


def test_inotify_watches_running_out_fall_back_to_polling_logged_once(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    reason = userns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path / "run"
    tmps = saves(root, 5)
    # The user may hold 3 inotify watches: the root and two saves; three saves get polled.
    d = Daemon(
        [str(root), *KEEP_ALL, "--observer", "inotify", "--sweep-interval", "1h"],
        prefix=inotify_limited([], watches=3),
    )
    daemons.append(d)
    d.wait_ready()
    exhausted = d.wait_for("inotify_watches_exhausted")[0]
    assert exhausted["fallback"] == "polling"
    for step in (5, 4, 3, 1):
        assert finalize_seconds(d, tmps[step - 1], step) < 10
    assert len(d.find("inotify_watches_exhausted")) == 1
    assert not d.find("watch_problem")
    assert sigterm_seconds(d) < 10
