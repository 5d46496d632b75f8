"""`startup.run_all`/`run_phases`: the keeper's start on threads of its own; a thread that cannot be
started (RLIMIT_NPROC) means fewer in flight, and when none starts the caller gets every item."""

from __future__ import annotations

import os
import resource
import threading
from collections.abc import Callable

import structlog
from tests.helpers import wait_until

from ckptkeeperd.startup import run_all, run_phases

UID = 61234  # no process of this uid exists but the forked child


def _in_child_with_nproc(limit: int, workers: int) -> tuple[int, int]:
    """Run ``run_all`` over 20 items as uid ``UID`` limited to ``limit`` processes/threads:
    (items done by its threads, items handed back)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            os.close(read_fd)
            resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
            os.setresgid(UID, UID, UID)
            os.setresuid(UID, UID, UID)
            done: list[int] = []
            finished = threading.Event()

            def work(item: int) -> None:
                done.append(item)
                if len(done) == 20:
                    finished.set()

            left = run_all(range(20), work, workers, name="t", log=structlog.get_logger())
            if not left:
                finished.wait(10)
            os.write(write_fd, f"{len(done)} {len(left)}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as r:
        text = r.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    done, left = map(int, text.split())
    return done, left


def test_every_item_runs_on_the_threads_that_could_start() -> None:
    assert _in_child_with_nproc(limit=3, workers=8) == (20, 0)


def test_no_thread_at_all_hands_every_item_back() -> None:
    assert _in_child_with_nproc(limit=1, workers=8) == (0, 20)


def test_items_overlap_on_several_threads() -> None:
    barrier = threading.Barrier(4, timeout=10)  # passes only if 4 items run at once
    seen: list[str] = []
    lock = threading.Lock()

    def work(item: int) -> None:
        barrier.wait()
        with lock:
            seen.append(threading.current_thread().name)

    assert run_all(range(4), work, 4, name="overlap", log=structlog.get_logger()) == []
    assert wait_until(lambda: len(seen) == 4, timeout=10)
    assert len(set(seen)) == 4 and all(n.startswith("overlap-") for n in seen)


def test_each_phase_is_reported_once_its_every_item_is_done() -> None:
    lock = threading.Lock()
    done: dict[int, set[int]] = {0: set(), 1: set()}
    seen: list[tuple[int, set[int]]] = []  # (phase, that phase's items done when reported)

    def phase(k: int) -> Callable[[int], None]:
        def work(item: int) -> None:
            with lock:
                done[k].add(item)

        return work

    def on_phase(k: int) -> None:
        with lock:
            seen.append((k, set(done[k])))

    log = structlog.get_logger()
    assert (
        run_phases(range(30), [phase(0), phase(1)], 4, name="p", log=log, on_phase=on_phase) == []
    )
    assert wait_until(lambda: len(seen) == 2, timeout=10)
    assert sorted(seen) == [(0, set(range(30))), (1, set(range(30)))]


def test_no_items_reports_every_phase_at_once() -> None:
    seen: list[int] = []
    log = structlog.get_logger()
    assert run_phases([], [print, print], 4, name="p", log=log, on_phase=seen.append) == []
    assert seen == [0, 1]
