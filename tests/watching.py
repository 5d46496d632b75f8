"""Shared helpers of the watcher and inotify tests: a recorder of a watcher's callbacks, a maker
of `RootWatcher`s that stops each one, and the inotify watches this process holds."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ckptkeeperd.watch import RootWatcher

TIMEOUT = 10.0


class Recorder:
    """Collects on_change / on_problem calls; lets a test wait for a given one."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.changes: list[Path] = []
        self.problems: list[tuple[Path, str]] = []

    def on_change(self, root: Path) -> None:
        with self.cond:
            self.changes.append(root)
            self.cond.notify_all()

    def on_problem(self, root: Path, reason: str) -> None:
        with self.cond:
            self.problems.append((root, reason))
            self.cond.notify_all()

    def clear(self) -> None:
        with self.cond:
            self.changes.clear()

    def wait_change(self, root: Path, timeout: float = TIMEOUT) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: root in self.changes, timeout)

    def changes_of(self, root: Path) -> int:
        with self.cond:
            return self.changes.count(root)


@contextlib.contextmanager
def watchers(**defaults: Any) -> Iterator[Callable[..., RootWatcher]]:
    """``make(on_change, **kwargs)`` gives a `RootWatcher` (``kwargs`` over ``defaults``);
    every watcher made is stopped on exit."""
    made: list[RootWatcher] = []

    def make(on_change: Callable[[Path], None], **kwargs: Any) -> RootWatcher:
        w = RootWatcher(on_change, **{**defaults, **kwargs})
        made.append(w)
        return w

    try:
        yield make
    finally:
        for w in made:
            w.stop()


def inotify_wd_count() -> int:
    """inotify watches held by this process (all its inotify fds), from /proc/self/fdinfo
    ('inotify wd:' lines)."""
    count = 0
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                count += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            continue  # fd closed meanwhile
    return count
