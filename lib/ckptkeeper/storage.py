"""Storage: where a root's effects happen. The executor and the pass see only this protocol.

A `Storage` lists a root into records (through a `Layout`), looks at one entry, renames within
the root and makes that durable, pins, moves an entry to trash (on an object store this would
be a tombstone), removes trash and locks the root (flock here; a lease on an object store).
`PosixStorage` is the descriptor-relative, ``O_NOFOLLOW`` code; its `Fs` is the fault-injection
hook, so tests wrap `Fs` exactly as before.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Collection
from pathlib import Path
from typing import Protocol

from .classify import look_again
from .effects import OS_FS, Fs, RootLock, fsync_dir, move_to_trash, open_area
from .errors import errno_name, errno_text
from .layouts import NEMO_RL, Layout, Look
from .records import RootScan
from .removal import Removal, remove_tree
from .scan import (
    CKPTKEEPER_DIR,
    InfoCache,
    LockProbe,
    newest_mtime,
    probe_writer_lock,
    scan_root,
    trash_dir,
)

__all__ = ["POSIX", "Lock", "PosixStorage", "RootFiles", "Storage", "purge_trash"]


class Lock(Protocol):
    """A root's mutual exclusion: flock of ``.ckptkeeper/lock``, or a lease."""

    def acquire(self) -> bool: ...

    def release(self) -> None: ...


class RootFiles(Protocol):
    """A root's own small files (a run's ``ckptkeeper.toml``, each step's ``config.yaml``) on a
    storage that is not a POSIX directory, from one listing; ``rel`` is a key below the root."""

    def key(self, rel: str) -> tuple[object, ...] | None:
        """What changes when ``rel`` changes (its ETag): () when absent, None when unknown."""
        ...

    def names_key(self) -> tuple[object, ...] | None:
        """What changes when a name appears in or leaves the root (None: unknown)."""
        ...

    def read(self, rel: str, limit: int) -> bytes | str | None:
        """The content of ``rel``; None when absent; why it is unusable (too large...)."""
        ...

    def dirs(self) -> list[str]:
        """The names of the prefixes right below the root (no checkpoint being deleted)."""
        ...


class Storage(Protocol):
    def scan(
        self,
        root: Path,
        *,
        layout: Layout,
        marker: str,
        cache: InfoCache | None = None,
        stale_before: float | None = None,
        memo: bool = False,
        steps: Collection[int] | None = None,
    ) -> RootScan:
        """List ``root`` once and read what the layout needs into records. ``steps``: only the
        entries of these steps (every spelling of them), no trash (`scan.scan_root`). Raises
        OSError only when the root itself cannot be listed."""
        ...

    def lstat(self, path: Path) -> os.stat_result | None:
        """The entry itself (never followed), or None when it does not exist."""
        ...

    def writer_lock(self, directory: Path, lock_file: str) -> LockProbe:
        """Is a writer holding ``directory/lock_file`` (or may it be)?"""
        ...

    def root_files(self, root: Path) -> RootFiles | None:
        """The root's own files (None: a POSIX directory, read with the usual system calls)."""
        ...

    def look(self, layout: Layout, path: Path, now: float) -> Look | None:
        """A layout that looks inside (`layouts.Classifier`): its verdict on ``path`` as it is
        now (the executor's re-check before collecting); None for other layouts, or when
        ``path`` is gone."""
        ...

    def last_change(self, directory: Path, stop_above: float) -> float:
        """The newest change (mtime or ctime) in the tree; may stop once past ``stop_above``."""
        ...

    def rename(self, src: Path, dst: Path) -> None:
        """Rename within the root at once (atomic)."""
        ...

    def sync(self, directory: Path) -> None:
        """Make the renames in ``directory`` durable."""
        ...

    def pin(self, directory: Path, pin_file: str) -> None:
        """Pin the checkpoint ``directory`` (create its pin file)."""
        ...

    def trash(self, root: Path, path: Path) -> Path | None:
        """Take ``path`` out of the root's namespace at once; None when it is already gone."""
        ...

    def remove_trash(
        self, root: Path, paths: list[Path], *, workers: int, cancel: threading.Event | None
    ) -> list[tuple[Path, Removal]]:
        """Remove trashed entries for good (outside the lock); what is left says why."""
        ...

    def lock(self, root: Path, timeout: float | None) -> Lock:
        """The root's lock, not yet taken: ``timeout`` None waits, 0 tries once."""
        ...

    # What callers ask of a root instead of looking at its spelling (`stores.Root`):

    def local_dir(self, root: Path) -> Path | None:
        """The local directory behind ``root``, where a filesystem is: inotify watches, the
        flock scope of its mount, free space. None on an object store (polled, a lease, no
        free-space figure)."""
        ...

    def check_root(self, root: Path) -> str | None:
        """Why ``root`` cannot be passed over (missing, a symlink...), None when it can."""
        ...

    def url(self, path: Path) -> str:
        """``path`` (the root or a path below it) as shown to people."""
        ...


class PosixStorage:
    """Local and network filesystems: rename is atomic, flock serialises (where it reaches)."""

    def __init__(self, fs: Fs = OS_FS) -> None:
        self.fs = fs

    def scan(
        self,
        root: Path,
        *,
        layout: Layout = NEMO_RL,
        marker: str = "",
        cache: InfoCache | None = None,
        stale_before: float | None = None,
        memo: bool = False,
        steps: Collection[int] | None = None,
    ) -> RootScan:
        return scan_root(
            root,
            marker=marker,
            cache=cache,
            stale_before=stale_before,
            memo=memo,
            layout=layout,
            steps=steps,
        )

    def lstat(self, path: Path) -> os.stat_result | None:
        try:
            return os.lstat(path)
        except FileNotFoundError:
            return None

    def writer_lock(self, directory: Path, lock_file: str) -> LockProbe:
        return probe_writer_lock(directory, lock_file)

    def look(self, layout: Layout, path: Path, now: float) -> Look | None:
        return look_again(layout, path, now)

    def root_files(self, root: Path) -> RootFiles | None:
        return None

    def last_change(self, directory: Path, stop_above: float) -> float:
        return newest_mtime(directory, stop_above=stop_above)

    def rename(self, src: Path, dst: Path) -> None:
        self.fs.rename(src, dst)

    def sync(self, directory: Path) -> None:
        fsync_dir(directory, self.fs)

    def pin(self, directory: Path, pin_file: str) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        os.close(self.fs.open(directory / pin_file, flags, 0o666))  # less the umask

    def trash(self, root: Path, path: Path) -> Path | None:
        return move_to_trash(root, path, self.fs)

    def remove_trash(
        self, root: Path, paths: list[Path], *, workers: int, cancel: threading.Event | None
    ) -> list[tuple[Path, Removal]]:
        return purge_trash(root, paths, workers=workers, fs=self.fs, cancel=cancel)

    def lock(self, root: Path, timeout: float | None) -> Lock:
        return RootLock(root, timeout=timeout, fs=self.fs)

    def local_dir(self, root: Path) -> Path | None:
        return root

    def check_root(self, root: Path) -> str | None:
        try:
            st = os.lstat(root)
        except FileNotFoundError:
            return "root does not exist"
        except OSError as exc:
            return f"cannot stat root: {errno_name(exc)}"
        if stat.S_ISLNK(st.st_mode):
            return "root is a symlink: not followed"
        if not stat.S_ISDIR(st.st_mode):
            return "root is not a directory"
        return None

    def url(self, path: Path) -> str:
        return os.fspath(path)


POSIX = PosixStorage()


def purge_trash(
    root: Path,
    entries: list[Path],
    *,
    workers: int = 8,
    fs: Fs = OS_FS,
    cancel: threading.Event | None = None,
) -> list[tuple[Path, Removal]]:
    """Remove trash entries. No root lock needed: trash is ckptkeeper's own, removal idempotent.

    The trash directory is reached through descriptors opened without following symlinks, so a
    ``.ckptkeeper`` or ``trash`` swapped for a symlink makes the removal refuse, never reach
    outside the root.
    """
    trash = trash_dir(root)
    try:
        trash_fd = open_area(root, CKPTKEEPER_DIR, trash.name)
    except FileNotFoundError:
        return [(e, Removal()) for e in entries]  # no trash: nothing to remove
    except OSError as exc:
        return [(e, _refused(trash, exc)) for e in entries]
    try:
        out: list[tuple[Path, Removal]] = []
        for e in entries:
            if Path(e).parent != trash:
                refused = Removal()
                refused.leave(str(e), "not an entry of this root's trash: not removed")
                out.append((e, refused))
                continue
            removal = remove_tree(e, workers=workers, fs=fs, cancel=cancel, parent_fd=trash_fd)
            out.append((e, removal))
        return out
    finally:
        os.close(trash_fd)


def _refused(trash: Path, exc: OSError) -> Removal:
    refused = Removal()
    refused.leave(str(trash), errno_text(exc))
    return refused
