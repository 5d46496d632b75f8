"""A cron ``sweep`` over many roots on several cores: forked workers, output as one process's.

The roots of a sweep are independent (each pass takes its own root's lock), so `map_chunks`
splits them into ``jobs`` contiguous chunks. Chunks 2..n run in forked children, forked before
the parent starts any thread; the parent runs chunk 1 itself, writing its output as it goes.
A child's stdout and stderr go to anonymous files (``memfd``) that the parent copies to its own,
chunk by chunk in order, so the lines come out in the order a serial sweep prints them (only
later, and a child's stdout and stderr lines are no longer interleaved with each other). Each
child hands back what ``work`` returned for its chunk as a pickle in a third one.

A child that dies (a signal, an exception) is reported, and its chunk counts as failed: the
caller exits non-zero. While children run, SIGTERM, SIGHUP and SIGINT to the parent are passed
on to them (a sweep stopped by its timer stops whole), then the parent dies of the signal.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import IO, Any, TypeVar

__all__ = ["WorkerFailed", "default_jobs", "map_chunks"]

T = TypeVar("T")
R = TypeVar("R")

_FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
_CHILD_FAILED = 70  # EX_SOFTWARE: the child's exception is on its stderr


class WorkerFailed(Exception):
    """A forked worker exited without handing back its chunk's results."""


def default_jobs() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def split(items: Sequence[T], jobs: int) -> list[Sequence[T]]:
    """``items`` in at most ``jobs`` contiguous chunks of near-equal length, none empty."""
    jobs = max(1, min(jobs, len(items)))
    size, extra = divmod(len(items), jobs)
    out: list[Sequence[T]] = []
    start = 0
    for i in range(jobs):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


class _Child:
    def __init__(self, pid: int, files: tuple[IO[bytes], IO[bytes], IO[bytes]]) -> None:
        self.pid, self.files = pid, files


def map_chunks(
    items: Sequence[T], jobs: int, work: Callable[[Sequence[T]], list[R]]
) -> list[R | WorkerFailed]:
    """``work`` of each chunk of ``items`` (`split`), the first in this process, the others in
    forked children: one result per item, in order; a `WorkerFailed` for each item of a child
    that failed (whatever it did to them is in the output it left)."""
    chunks = split(items, jobs)
    if len(chunks) <= 1:
        return list(work(items))
    sys.stdout.flush()
    sys.stderr.flush()
    children = [_fork(chunk, work) for chunk in chunks[1:]]
    previous = {sig: signal.signal(sig, _forward(children)) for sig in _FORWARDED}
    results: list[R | WorkerFailed] = []
    try:
        try:
            results.extend(work(chunks[0]))
        finally:  # even when this process's chunk failed: the children's output is shown
            later = [_collect(c, len(ch)) for c, ch in zip(children, chunks[1:], strict=True)]
        for part in later:
            results.extend(part)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return results


def _fork(chunk: Sequence[T], work: Callable[[Sequence[T]], list[R]]) -> _Child:
    files = (_scratch(), _scratch(), _scratch())
    pid = os.fork()
    if pid:
        return _Child(pid, files)
    code = _CHILD_FAILED
    try:
        for sig in _FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        os.dup2(files[0].fileno(), 1)
        os.dup2(files[1].fileno(), 2)
        result = work(chunk)
        pickle.dump(result, files[2], protocol=pickle.HIGHEST_PROTOCOL)
        files[2].flush()
        code = 0
    except BaseException:  # reported on the child's stderr, then by its exit code
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # nothing left to report it on
                stream.flush()
        os._exit(code)


def _scratch() -> IO[bytes]:
    """An anonymous file in memory (Linux: no path, so a sweep still opens nothing for writing
    outside its roots), else an unlinked temporary file; closed by `_collect`."""
    if hasattr(os, "memfd_create"):
        return os.fdopen(os.memfd_create("ckptkeeper-sweep", os.MFD_CLOEXEC), "w+b")
    return tempfile.TemporaryFile()


def _collect(child: _Child, count: int) -> list[R | WorkerFailed]:
    """Wait for ``child``, copy its output to ours, and load its ``count`` results."""
    _, status = os.waitpid(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    out, err, result = child.files
    try:
        for src, dst in ((out, sys.stdout), (err, sys.stderr)):
            src.seek(0)
            dst.flush()
            while block := src.read(1 << 16):
                dst.buffer.write(block)
            dst.flush()
        if code == 0:
            result.seek(0)
            loaded: list[R] = pickle.load(result)  # noqa: S301 - our own child's, unlinked
            if len(loaded) == count:
                return list(loaded)
    finally:
        for f in child.files:
            f.close()
    how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    return [WorkerFailed(f"sweep worker (pid {child.pid}) failed: {how}")] * count


def _forward(children: list[_Child]) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    return handler
