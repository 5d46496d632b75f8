"""Measuring free space and checkpoint sizes for the planner's disk-pressure input (`FreeSpace`).

Free space is one ``statvfs`` of the root per pass: ``f_bavail`` (what the trainer, an
unprivileged writer, can still use) and ``f_blocks`` (the filesystem's size).

Sizes are what deleting a tree gives back: the sum of ``st_blocks`` of every entry below it, each
inode once (like ``du``), walked without following symlinks. A walk costs about what the scan of a
full checkpoint would (one ``lstat`` per file), so it is done only where a size is needed, and
cached per root by the directory's (st_dev, st_ino, st_ctime_ns): a finalized checkpoint is not
written again, so each is walked once in its life, and a reused inode number has another ctime.
Only with ``min_free`` set: the newest checkpoint on every pass (``next_save_may_not_fit``); every
checkpoint, leftover and stale-looking save, and the trash (never cached: it shrinks while it is
removed) while the free space is below ``min_free``. An entry that cannot be read inside a tree
counts as nothing (the size is a lower bound); a tree that vanished has no size.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from .info import InfoCache
from .policy import Policy
from .pressure import FreeSpace
from .records import RootScan

__all__ = ["disk_facts", "filesystem_space", "tree_bytes"]

_Key = tuple[int, int, int]  # (st_dev, st_ino, st_ctime_ns) of a tree's top directory


def filesystem_space(path: Path) -> tuple[int, int]:
    """(free bytes for unprivileged writers, total bytes) of the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def tree_bytes(path: Path) -> int | None:
    """Bytes on disk below ``path`` (itself included), each inode once; None if it is gone."""
    try:
        top = os.lstat(path)
    except OSError:
        return None
    total = top.st_blocks * 512
    if not stat.S_ISDIR(top.st_mode):
        return total
    seen: set[tuple[int, int]] = set()
    for _, dirs, files, dir_fd in os.fwalk(path, follow_symlinks=False, onerror=lambda _e: None):
        for name in (*dirs, *files):
            try:
                st = os.lstat(name, dir_fd=dir_fd)
            except OSError:
                continue  # vanished or unreadable: a lower bound
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def _measure(path: Path, identity: tuple[int, int], known: dict[_Key, int]) -> _Key | None:
    """The cache key of the tree at ``path`` (walked into ``known`` if new); None when ``path``
    is gone or is no longer the directory the scan saw (its size would be another's)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if (st.st_dev, st.st_ino) != identity:
        return None
    key = (st.st_dev, st.st_ino, st.st_ctime_ns)
    if key not in known:
        size = tree_bytes(path)
        if size is None:
            return None
        known[key] = size
    return key


Tree = tuple[int, Path, tuple[int, int]]  # (step, path, identity)


def _trees(scan: RootScan, policy: Policy, now: float) -> list[Tree]:
    """Everything whose deletion the planner may count under pressure."""
    out = [(c.step, c.path, c.identity) for c in scan.steps]
    out += [(o.step, o.path, o.identity) for o in scan.leftovers]
    for t in scan.in_flight:
        stale = t.newest_mtime is not None and now - t.newest_mtime >= policy.stale_after
        if t.complete or stale:
            out.append((t.step, t.path, t.identity))
    return out


def _newest(scan: RootScan) -> list[Tree]:
    """The newest checkpoint: finalized, or complete and about to be (both during a replace)."""
    trees = [(c.step, c.path, c.identity) for c in scan.steps]
    trees += [(t.step, t.path, t.identity) for t in scan.in_flight if t.complete]
    top = max((step for step, _, _ in trees), default=None)
    return [t for t in trees if t[0] == top]


def disk_facts(
    scan: RootScan, policy: Policy, now: float, cache: InfoCache | None = None
) -> FreeSpace | None:
    """What the planner needs to know about the root's filesystem; None if ``statvfs`` fails or
    reports a filesystem of no size (no pressure can be judged there)."""
    try:
        free, total = filesystem_space(scan.root)
    except OSError:
        return None
    if total <= 0:  # a filesystem that reports no size (some FUSE servers): free space unknown
        return None
    threshold = policy.pressure_threshold
    if threshold is None:
        return FreeSpace(free, total)
    under = free < threshold.bytes_for(total)
    everything = _trees(scan, policy, now)
    present = {identity for _, _, identity in everything}
    before = cache.tree_sizes(scan.root) if cache is not None else {}
    known = {k: v for k, v in before.items() if k[:2] in present}
    sizes: dict[tuple[int, int], int] = {}
    for _, path, identity in everything if under else _newest(scan):
        if (key := _measure(path, identity, known)) is not None:
            sizes[identity] = known[key]
    if cache is not None:  # sizes of trees no longer present are forgotten
        cache.keep_tree_sizes(scan.root, known)
    trash = _sum(tree_bytes(e.path) for e in scan.trash) if under else 0
    return FreeSpace(free, total, sizes, trash)


def _sum(values: Iterable[int | None]) -> int:
    return sum(v for v in values if v is not None)
