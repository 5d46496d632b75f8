"""The sidecar (`run ... -- TRAINER`, `--watch-pid`) as a real process: start errors, final pass."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers import CKPTKEEPER, Daemon, step_names, wait_until

REPO = Path(__file__).resolve().parents[2]
FINAL_LOCK_WAIT = 30.0  # the documented bound (like `sweep`)

# Writes one complete tmp_step_1, touches <root>/trainer-done, exits with argv[2].
TRAINER = (
    "import sys; from pathlib import Path; from tests.helpers import write_checkpoint\n"
    "root = Path(sys.argv[1]); write_checkpoint(root, 1, {'r': 1.0})\n"
    "(root / 'trainer-done').touch(); sys.exit(int(sys.argv[2]))\n"
)

# Holds the root's lock (the protocol's flock on .ckptkeeper/lock) until its stdin closes.
HOLDER = (
    "import fcntl, os, sys\n"
    "os.makedirs(os.path.join(sys.argv[1], '.ckptkeeper'), exist_ok=True)\n"
    "fd = os.open(os.path.join(sys.argv[1], '.ckptkeeper', 'lock'), os.O_RDWR | os.O_CREAT)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()\n"
)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CKPTKEEPER, "run", *args], capture_output=True, text=True, timeout=60)


def _sidecar(root: Path, trainer_code: int) -> Daemon:
    args = [str(root), "--keep-latest-n", "1", "--sweep-interval", "1h"]
    return Daemon(
        [*args, "--", sys.executable, "-c", TRAINER, str(root), str(trainer_code)], cwd=REPO
    )


@pytest.fixture
def locked_root(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    root = tmp_path / "run"
    root.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    yield root, holder
    if holder.poll() is None:
        holder.kill()
    holder.wait()
    for pipe in (holder.stdin, holder.stdout):
        if pipe is not None:
            pipe.close()


def _release(holder: subprocess.Popen[str]) -> None:
    assert holder.stdin is not None
    holder.stdin.close()
    holder.wait(5)


def _wait_skipped_in_final_pass(d: Daemon) -> None:
    [final] = d.wait_for("final_pass", timeout=30)
    wait_until(
        lambda: [e for e in d.find("skipped") if e["timestamp"] >= final["timestamp"]],
        timeout=10,
        what="a locked attempt in the final pass",
    )


def test_watch_pid_of_a_process_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: no process has this pid now (unless it was reused in between)
    proc = _run(str(tmp_path), "--keep-latest-n", "1", "--watch-pid", str(gone.pid))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert f"--watch-pid {gone.pid}" in proc.stderr and "no such process" in proc.stderr
    assert "Traceback" not in proc.stderr and '"ready"' not in proc.stdout


@pytest.mark.parametrize(
    ("make", "code", "words"),
    [
        (lambda d: str(d / "missing" / "train"), 127, "No such file or directory"),
        (lambda d: "ckptkeeper-no-such-trainer", 127, "command not found"),
        (lambda d: _not_executable(d / "train.sh"), 126, "Permission denied"),
        (lambda d: str(d), 126, "Permission denied"),  # a directory, as a shell says 126
    ],
    ids=["missing-path", "not-on-path", "no-x-bit", "directory"],
)
def test_trainer_that_cannot_be_started_exits_like_a_shell(
    tmp_path: Path, make: object, code: int, words: str
) -> None:
    assert callable(make)
    cmd = make(tmp_path)
    proc = _run(str(tmp_path), "--keep-latest-n", "1", "--", cmd, "--lr", "1e-4")
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert proc.stderr == f"ckptkeeper: {cmd}: {words}\n"
    assert '"ready"' not in proc.stdout  # nothing was started


def _not_executable(path: Path) -> str:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o644)
    return str(path)


def test_final_pass_waits_for_a_locked_root(
    locked_root: tuple[Path, subprocess.Popen[str]], daemons: list[Daemon]
) -> None:
    root, holder = locked_root
    d = _sidecar(root, 0)
    daemons.append(d)
    wait_until(lambda: (root / "trainer-done").exists(), timeout=30, what="trainer done")
    # The trainer has exited; its save can only be finalized once the lock is free.
    wait_until(
        lambda: d.proc.poll() is not None or d.find("final_pass"), timeout=30, what="final pass"
    )
    assert d.proc.poll() is None, "gave up on the locked root at once"
    _wait_skipped_in_final_pass(d)  # it tried, found the root locked, and waits
    _release(holder)
    assert d.proc.wait(FINAL_LOCK_WAIT) == 0
    assert step_names(root) == {"step_1"}
    d.wait_for("finalized", step=1)
    assert not d.find("final_pass_incomplete")


@pytest.mark.parametrize(("trainer_code", "expected"), [(0, 75), (3, 3)])
def test_final_pass_interrupted_by_sigterm_reports_it(
    locked_root: tuple[Path, subprocess.Popen[str]],
    daemons: list[Daemon],
    trainer_code: int,
    expected: int,
) -> None:
    root, _holder = locked_root
    d = _sidecar(root, trainer_code)
    daemons.append(d)
    _wait_skipped_in_final_pass(d)
    started = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.proc.wait(10) == expected  # the trainer's failure wins over ours
    assert time.monotonic() - started < 10
    [incomplete] = d.find("final_pass_incomplete")
    assert incomplete["root"] == str(root) and incomplete["status"] == "busy"
    assert step_names(root) == {"tmp_step_1"}  # nothing done without the lock


def test_final_pass_gives_up_after_the_bound_and_exits_75(
    locked_root: tuple[Path, subprocess.Popen[str]], daemons: list[Daemon]
) -> None:
    root, _holder = locked_root
    d = _sidecar(root, 0)
    daemons.append(d)
    d.wait_for("final_pass", timeout=30)
    started = time.monotonic()
    assert d.proc.wait(FINAL_LOCK_WAIT + 15) == 75
    assert time.monotonic() - started >= FINAL_LOCK_WAIT - 5
    [incomplete] = d.find("final_pass_incomplete")
    assert incomplete["root"] == str(root) and "locked" in incomplete["reason"]
    assert step_names(root) == {"tmp_step_1"}


def test_sigterm_goes_to_the_trainer_and_its_last_save_is_finalized(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    # On SIGTERM the trainer writes a last save and exits 0 (what a preempted trainer does).
    trainer = (
        "import signal, sys, threading; from pathlib import Path\n"
        "from tests.helpers import write_checkpoint\n"
        "root, done = Path(sys.argv[1]), threading.Event()\n"
        "signal.signal(signal.SIGTERM, lambda *_: done.set())\n"
        "(root / 'trainer-ready').touch()\n"
        "while not done.wait(0.1): pass\n"
        "write_checkpoint(root, 5, {'r': 1.0})\n"
    )
    args = [str(root), "--keep-latest-n", "1", "--sweep-interval", "1h"]
    d = Daemon([*args, "--", sys.executable, "-c", trainer, str(root)], cwd=REPO)
    daemons.append(d)
    d.wait_ready()
    wait_until(lambda: (root / "trainer-ready").exists(), timeout=30, what="trainer ready")
    d.signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    assert d.find("signal_forwarded", signal="SIGTERM")
    assert step_names(root) == {"step_5"}  # the save written after SIGTERM is finalized
