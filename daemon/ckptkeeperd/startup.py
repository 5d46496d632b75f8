"""The keeper's start over every root, several roots at a time, in two phases.

First each root's saves in flight are found (one listing of the root, names only) and watched,
so a marker arriving in any of them is seen: the keeper is then serving (READY). Then each root's
first pass over its backlog, which may take minutes over a large fleet (bench P9K) and holds no
save back: a marker's save is finalized by a pass of its own (``Keeper.finalize_now``).

On a cold disk a pass mostly waits for inode and directory/file block reads, which release the
GIL: more passes in flight give the disk requests to overlap (bench P9K). ``run_phases`` runs
each phase's work over every item on up to ``workers`` threads of its own that end with the last
item; a thread that cannot be started (``RLIMIT_NPROC``) only means fewer in flight.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ckptkeeper.layouts import get_layout
from ckptkeeper.names import Kind

__all__ = ["in_flight_saves", "run_all", "run_phases"]

T = TypeVar("T")


def run_phases(
    items: Iterable[T],
    phases: Sequence[Callable[[T], None]],
    workers: int,
    *,
    name: str,
    log: Any,
    on_phase: Callable[[int], None] | None = None,
) -> list[T]:
    """Start ``phases[k](item)`` for every item and phase on up to ``workers`` threads (returns
    at once); a thread takes an item of the first phase with items left, so phase k+1 starts as
    phase k's last items run. ``on_phase(k)`` once phase k's last item is done (at once for no
    items). Returns the items no thread could be started for (all of them when not even one
    started, nothing run and ``on_phase`` not called): the caller's."""
    queues: list[deque[T]] = [deque(items) for _ in phases]
    left = [len(q) for q in queues]
    lock = threading.Lock()

    def finished(k: int) -> None:
        if on_phase is None:
            return
        try:
            on_phase(k)
        except Exception as exc:  # the other phases still run
            log.exception("start_phase_callback_failed", phase=k, error=repr(exc))

    def drain() -> None:
        while True:
            with lock:
                k = next((i for i, q in enumerate(queues) if q), None)
                if k is None:
                    return
                item = queues[k].popleft()
            try:
                phases[k](item)
            except Exception as exc:  # ``work`` logs its own failures; the others still run
                log.exception("start_pass_crashed", error=repr(exc))
            with lock:
                left[k] -= 1
                last = left[k] == 0
            if last:
                finished(k)

    if not any(left):
        for k in range(len(phases)):
            finished(k)
        return []
    started = 0
    for i in range(max(1, min(workers, max(left)))):
        thread = threading.Thread(target=drain, name=f"{name}-{i}", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # can't start new thread: run on the ones there are
            log.warning("start_threads_limited", started=started, wanted=workers, error=str(exc))
            break
        started += 1
    if started:
        return []
    with lock:
        back = list(queues[0])
        for q in queues:
            q.clear()
    return back


def run_all(
    items: Iterable[T],
    work: Callable[[T], None],
    workers: int,
    *,
    name: str,
    log: Any,
) -> list[T]:
    """`run_phases` with one phase: ``work`` over ``items``."""
    return run_phases(items, [work], workers, name=name, log=log)


def in_flight_saves(root: Path, layout: str) -> list[Path]:
    """The save directories (``tmp_step_N`` in NeMo-RL's layout) in ``root`` now: one listing,
    names and d_type only (no inode read per entry). OSError when the root cannot be listed."""
    parse = get_layout(layout).parse
    found: list[Path] = []
    with os.scandir(root) as entries:
        for entry in entries:
            parsed = parse(entry.name)
            if (
                parsed is not None
                and parsed.kind is Kind.TMP
                and entry.is_dir(follow_symlinks=False)
            ):
                found.append(root / entry.name)
    return found
