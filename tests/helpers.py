"""Shared test helpers: a simulated trainer, condition waits, the real daemon as a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ckptkeeper import write_marker

CKPTKEEPER = str(Path(sys.executable).with_name("ckptkeeper"))
if not os.path.exists(CKPTKEEPER):  # pragma: no cover - fallback when not run from the venv
    CKPTKEEPER = shutil.which("ckptkeeper") or "ckptkeeper"


def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def manager_config(root: Path | str, **overrides: Any) -> dict[str, Any]:
    """A NeMo-RL checkpointing config (dict form) for `CheckpointManager`: metric ``loss``, lower
    is better, every step saved, with ``overrides`` on top."""
    base = {"enabled": True, "checkpoint_dir": root, "metric_name": "loss"}
    return {**base, "higher_is_better": False, "save_period": 1, **overrides}


def write_checkpoint(
    root: Path,
    step: int,
    info: Mapping[str, Any] | None = None,
    *,
    files: int = 2,
    complete: bool = True,
    final: bool = False,
    marker: str = ".complete",
) -> Path:
    """Write ``tmp_step_N`` like a trainer (files, training_info.json, then the marker).

    ``final=True`` writes ``step_N`` directly (as if an earlier keeper had finalized it).
    """
    name = f"step_{step}" if final else f"tmp_step_{step}"
    path = Path(root) / name
    (path / "policy").mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (path / "policy" / f"shard_{i}.bin").write_bytes(f"{step}:{i}".encode() * 64)
    (path / "training_info.json").write_text(
        json.dumps(dict(info if info is not None else {"step": step}))
    )
    if complete and not final:
        write_marker(path, marker)
    return path


def write_named_save(root: Path, name: str, metric: float, *, marked: bool = False) -> Path:
    """A save named ``name`` with ``val_loss`` = ``metric``; ``marked`` writes its marker."""
    d = root / name
    d.mkdir(parents=True)
    (d / "training_info.json").write_text(json.dumps({"val_loss": metric}))
    if marked:
        write_marker(d, ".complete")
    return d


def write_metric_run(root: Path, steps: Iterable[int] = (1, 2, 3)) -> None:
    """``step_N`` directories with training_info.json ``{"loss": N}`` and a NeMo-RL config.yaml
    naming ``loss`` as the metric (the run's own settings, found by the config.yaml walk)."""
    for n in steps:
        (root / f"step_{n}").mkdir(parents=True)
        (root / f"step_{n}" / "training_info.json").write_text(json.dumps({"loss": n}))
        (root / f"step_{n}" / "config.yaml").write_text("checkpointing:\n  metric_name: loss\n")


def step_names(root: Path) -> set[str]:
    return {
        p.name
        for p in Path(root).iterdir()
        if p.name.startswith(("step_", "tmp_step_", "old_step_"))
    }


def steps(root: Path) -> set[int]:
    return {
        int(n.split("_")[1]) for n in step_names(root) if n.startswith("step_") and n[5:].isdigit()
    }


class Daemon:
    """``ckptkeeper run ...`` as a real subprocess; JSON log lines are collected as they arrive."""

    def __init__(
        self,
        args: Iterable[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        metrics_address: str | None = "127.0.0.1:0",
        prefix: Iterable[str] = (),
    ) -> None:
        """``metrics_address``: ``run --metrics-address`` (default: a free loopback port, so
        daemons running at once never contend for 9464); None passes no flag. ``prefix``: a
        command that runs the daemon (e.g. ``prlimit ...``, ``setpriv ...``)."""
        full_env = dict(os.environ)
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.update(env or {})
        flag = [] if metrics_address is None else ["--metrics-address", metrics_address]
        self.args = [*prefix, CKPTKEEPER, "run", *flag, *args]  # before any `-- TRAINER CMD`
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=cwd,
            text=True,
            bufsize=1,
        )
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.raw.append(line)
                with contextlib.suppress(ValueError):  # a non-JSON line (e.g. a warning)
                    self.events.append(json.loads(line))
                self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.stderr.append(line)
                self._cond.notify_all()

    def find(self, event: str, **match: Any) -> list[dict[str, Any]]:
        with self._cond:
            return [
                e
                for e in self.events
                if e.get("event") == event and all(e.get(k) == v for k, v in match.items())
            ]

    def wait_for(
        self, event: str, timeout: float = 15.0, count: int = 1, **match: Any
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [
                    e
                    for e in self.events
                    if e.get("event") == event and all(e.get(k) == v for k, v in match.items())
                ]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._alive_readers()):
                    raise AssertionError(
                        f"no {count}x {event} {match} within {timeout}s; rc={self.proc.poll()}\n"
                        f"stdout tail: {''.join(self.raw[-15:])}\n"
                        f"stderr tail: {''.join(self.stderr[-15:])}"
                    )
                self._cond.wait(min(left, 0.2))

    def _alive_readers(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def wait_ready(self, timeout: float = 20.0, *, first_pass: bool = True) -> None:
        """READY (every root watched); with ``first_pass`` also the end of the first pass over
        every root (``first_pass_done``), which READY does not wait for."""
        deadline = time.monotonic() + timeout
        self.wait_for("ready", timeout=timeout)
        if first_pass:
            self.wait_for("first_pass_done", timeout=max(0.0, deadline - time.monotonic()))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for t in self._threads:
                t.join(timeout=5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for t in self._threads:
            t.join(timeout=5)


def run_as(
    uid: int, gid: int, fn: Callable[[], Any], *, umask: int = 0o002, timeout: float = 60.0
) -> dict[str, Any]:
    """Run ``fn()`` in a forked child as ``uid`` with primary and only group ``gid`` and
    ``umask`` (root only). Forked, not exec'ed: the interpreter and the modules imported here
    serve the child, so the uid needs no access to them. Returns ``{"ok": True, "value": ...}``
    (the value JSON-encoded through ``str`` where needed) or ``{"ok": False, "error": ...,
    "traceback": ...}``; a child still running after ``timeout`` s is killed and reported."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            os.setgroups([gid])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            os.umask(umask)
            out: dict[str, Any] = {"ok": True, "value": fn()}
        except BaseException as exc:
            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            out["traceback"] = traceback.format_exc()
        try:
            with os.fdopen(write_end, "w") as pipe:
                pipe.write(json.dumps(out, default=str))
        finally:
            os._exit(0)
    os.close(write_end)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                return {"ok": False, "error": f"child as uid {uid} still running after {timeout}s"}
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    if not chunks:
        return {"ok": False, "error": f"child as uid {uid} died without a result"}
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result
