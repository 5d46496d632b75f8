"""Reliability harness plumbing: seeds, the keeper as a killable subprocess, the simulated
trainer, one-shot CLI runs, and a summary section printed at the end of the session."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import CKPTKEEPER, Daemon, wait_until

TRAINER = str(Path(__file__).with_name("trainer_sim.py"))

_SUMMARY: list[str] = []


@pytest.fixture(autouse=True)
def no_thread_leak() -> Iterator[None]:
    """A reliability test leaves no thread of its own behind (output readers, samplers)."""
    before = set(threading.enumerate())
    yield
    for t in [t for t in threading.enumerate() if t not in before and t.is_alive()]:
        t.join(timeout=5)
    leaked = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, f"threads leaked: {leaked}"


def seed_from_env(var: str) -> int:
    """The run's seed: ``$var`` when set (to reproduce a failure), else a fresh random one."""
    value = os.environ.get(var)
    return int(value) if value else random.SystemRandom().randrange(1, 2**31)


def summarize(line: str) -> None:
    """Print ``line`` now (captured output) and again in the session's terminal summary; append
    it to ``$CKPTKEEPER_RELIABILITY_SUMMARY`` when that names a file."""
    print(line, flush=True)
    _SUMMARY.append(line)
    target = os.environ.get("CKPTKEEPER_RELIABILITY_SUMMARY")
    if target:
        with open(target, "a") as fh:
            fh.write(line + "\n")


@pytest.fixture(scope="session")
def report_summary() -> Callable[[str], None]:
    """`summarize`, for module-scoped fixtures (the ``harness`` fixture is per test)."""
    return summarize


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _SUMMARY:
        terminalreporter.section("ckptkeeper reliability")
        for line in _SUMMARY:
            terminalreporter.write_line(line)


class Keeper(Daemon):
    """``ckptkeeper run`` as a subprocess that tests may SIGKILL at any moment."""

    def wait_any(self, names: Iterable[str], timeout: float) -> dict[str, Any] | None:
        """The first event named in ``names`` (from the start of this process), or None when
        none arrives within ``timeout`` s or the process ends."""
        wanted = set(names)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events:
                    if e.get("event") in wanted:
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._alive_readers()):
                    return None
                self._cond.wait(min(left, 0.2))

    def alive_for(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the process to exit; True when it is still running."""
        try:
            self.proc.wait(timeout=max(seconds, 0.0))
        except subprocess.TimeoutExpired:
            return True
        return False

    def events_named(self, *names: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("event") in names]


def start_trainer(root: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, TRAINER, str(root), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_command(
    argv: list[str],
    *,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.pop("NOTIFY_SOCKET", None)
    full_env.update(env or {})
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd
    )


def ckptkeeper(
    *args: str, timeout: float = 120.0, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a one-shot ``ckptkeeper`` command (sweep, status) and capture its output."""
    return run_command([CKPTKEEPER, *args], timeout=timeout, env=env, cwd=cwd)


def json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def status_doc(root: Path, policy: list[str]) -> dict[str, Any]:
    done = ckptkeeper("status", str(root), *policy, "--json")
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def pending_actions(root: Path, policy: list[str]) -> list[tuple[int | None, str]]:
    """(step, action) of every decision ``status`` reports that is not a plain keep."""
    [report] = status_doc(root, policy)["roots"]
    return [(d["step"], d["action"]) for d in report["decisions"] if d["action"] != "keep"]


def process_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from /proc (``T`` when stopped), None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


class Frozen:
    """SIGSTOP a process for a consistent look at what it writes; SIGCONT on exit."""

    def __init__(self, proc: subprocess.Popen[Any]) -> None:
        self.proc = proc
        self.stopped = False

    def __enter__(self) -> Frozen:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGSTOP)
                self.stopped = True
            except ProcessLookupError:
                return self
            wait_until(
                lambda: process_state(self.proc.pid) in ("T", "t", "Z", "X", None),
                timeout=10,
                what="trainer stopped",
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)


class Harness:
    """What the reliability tests share (one per test; everything it started is killed after)."""

    TRAINER = TRAINER
    CKPTKEEPER = CKPTKEEPER

    def __init__(self) -> None:
        self.keepers: list[Keeper] = []
        self.procs: list[subprocess.Popen[Any]] = []

    seed = staticmethod(seed_from_env)
    summarize = staticmethod(summarize)
    cli = staticmethod(ckptkeeper)
    run = staticmethod(run_command)
    json_lines = staticmethod(json_lines)
    status_doc = staticmethod(status_doc)
    pending_actions = staticmethod(pending_actions)

    def keeper(self, args: Iterable[str]) -> Keeper:
        k = Keeper(list(args))
        self.keepers.append(k)
        return k

    def trainer(self, root: Path, *args: str) -> subprocess.Popen[str]:
        p = start_trainer(root, *args)
        self.procs.append(p)
        return p

    def frozen(self, proc: subprocess.Popen[Any]) -> Frozen:
        return Frozen(proc)

    def close(self) -> None:
        for k in self.keepers:
            k.kill()
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                    p.kill()
                except ProcessLookupError:
                    pass
            p.communicate()


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()
