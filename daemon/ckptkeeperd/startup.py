"""The keeper's first pass over every root, several roots at a time.

On a cold disk a pass mostly waits for inode and directory/file block reads, which release the
GIL: more passes in flight give the disk requests to overlap (bench P9K). ``run_all`` runs
``work(item)`` for every item on up to ``workers`` threads of its own that end with the last
item; a thread that cannot be started (``RLIMIT_NPROC``) only means fewer in flight.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

__all__ = ["run_all"]

T = TypeVar("T")


def run_all(
    items: Iterable[T],
    work: Callable[[T], None],
    workers: int,
    *,
    name: str,
    log: Any,
) -> list[T]:
    """Start ``work`` over ``items`` on up to ``workers`` threads (returns at once); the items no
    thread could be started for (all of them when not even one started), for the caller."""
    queue: deque[T] = deque(items)
    lock = threading.Lock()

    def drain() -> None:
        while True:
            with lock:
                if not queue:
                    return
                item = queue.popleft()
            try:
                work(item)
            except Exception as exc:  # ``work`` logs its own failures; the others still run
                log.exception("start_pass_crashed", error=repr(exc))

    started = 0
    for i in range(max(1, min(workers, len(queue)))):
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
        left = list(queue)
        queue.clear()
    return left
