"""Signals against the real `ckptkeeper run` process: storms, and signals during start-up."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import Daemon, wait_until

# A child that sends SIGHUP to argv[1] in a tight loop for 2 s (at most 200000 signals).
STORM = (
    "import os, signal, sys, time\n"
    "pid, end, sent = int(sys.argv[1]), time.monotonic() + 2.0, 0\n"
    "while time.monotonic() < end and sent < 200000:\n"
    "    os.kill(pid, signal.SIGHUP)\n"
    "    sent += 1\n"
    "print(sent)\n"
)


def _config(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    root.mkdir()
    cfg = tmp_path / "ckptkeeper.toml"
    cfg.write_text(f'[defaults]\nkeep_latest_n = 2\n\n[[root]]\npath = "{root}"\n')
    return cfg


def _importing_dependencies(d: Daemon) -> bool:
    """True once the daemon process maps pydantic's compiled core: it is past the interpreter's
    own start-up and importing ckptkeeper's dependencies (the heavy part of its start-up)."""
    if d.proc.poll() is not None:
        return True
    try:
        with open(f"/proc/{d.proc.pid}/maps") as fh:
            return "pydantic_core" in fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_sighup_storm_then_sigterm_exits_zero_and_reloads(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    d = Daemon(["--config", str(_config(tmp_path))])
    daemons.append(d)
    d.wait_ready()
    storm = subprocess.run(
        [sys.executable, "-c", STORM, str(d.proc.pid)], capture_output=True, text=True, timeout=60
    )
    assert storm.returncode == 0, storm.stderr
    assert int(storm.stdout) > 1000  # a storm, not a handful
    assert d.proc.poll() is None, "".join(d.stderr[-20:])
    d.wait_for("config_reloaded")
    assert d.stop() == 0
    d.wait_for("stopped")
    assert not any("Traceback" in line for line in d.stderr), "".join(d.stderr)


def test_sighup_during_start_up_does_not_kill_the_daemon(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    d = Daemon(["--config", str(_config(tmp_path))])
    daemons.append(d)
    wait_until(lambda: _importing_dependencies(d), timeout=20, what="daemon importing")
    sent, deadline = 0, time.monotonic() + 30
    # From here until it is ready, SIGHUP after SIGHUP (send_signal never signals a reaped pid).
    while not d.find("ready") and d.proc.poll() is None and time.monotonic() < deadline:
        d.proc.send_signal(signal.SIGHUP)
        sent += 1
    assert sent > 0
    assert d.proc.poll() is None, f"rc={d.proc.poll()} after {sent} SIGHUPs"
    d.wait_ready()
    d.wait_for("config_reloaded")  # what was asked for during start-up is done once serving
    assert d.stop() == 0


def test_sigterm_during_start_up_stops_within_ten_seconds_with_exit_zero(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    d = Daemon(["--config", str(_config(tmp_path))])
    daemons.append(d)
    wait_until(lambda: _importing_dependencies(d), timeout=20, what="daemon importing")
    started = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0
    assert time.monotonic() - started < 10
    d.wait_for("stopped")
