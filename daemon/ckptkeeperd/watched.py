"""The records `ckptkeeperd.watch.RootWatcher` keeps of its watches."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ckptkeeperd.inotify import Watch
from ckptkeeperd.journal import RootJournal
from ckptkeeperd.poller import Polled

__all__ = ["Watched", "WatchedRoot", "probe"]


def probe(path: Path) -> tuple[tuple[int, int] | None, str]:
    """(st_dev, st_ino) of a real directory (never through a symlink), or None and why not."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, "missing (not watched until it appears)"
    except OSError as exc:
        return None, f"cannot stat: {exc.strerror or exc}"
    if stat.S_ISDIR(st.st_mode):
        return (st.st_dev, st.st_ino), ""
    if stat.S_ISLNK(st.st_mode):
        return None, "is a symlink (never followed; not watched)"
    return None, "not a directory (not watched)"


@dataclass
class Watched:
    """One watch of a root or a tmp dir: its handle and the directory it was set on."""

    handle: Watch | Polled
    identity: tuple[int, int]
    counted: bool = False  # one of the max_tmp_watches inotify watches of tmp dirs
    journal: RootJournal | None = None  # a root's inotify watch: the names created in it

    @property
    def kind(self) -> str:
        return "inotify" if isinstance(self.handle, Watch) else "polling"

    def current(self, identity: tuple[int, int] | None) -> bool:
        """Still watching the directory that has this identity now (and not a dead watch of a
        directory deleted and recreated with the same (st_dev, st_ino))?"""
        return self.handle.alive and identity == self.identity


@dataclass
class WatchedRoot:
    """A root's watch (as ``requested``: inotify or polling) and its tmp dirs' watches."""

    requested: str
    main: Watched
    tmp: dict[Path, Watched] = field(default_factory=dict)
