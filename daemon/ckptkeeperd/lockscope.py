"""How far ``.ckptkeeper/lock`` reaches: the filesystem's flock, read from the mount options.

The per-root flock serialises keepers, sweeps and trainers across hosts only where the
filesystem sends flock to its server. Several keepers on several nodes are safe only there, so
the keeper warns once per root (``lock_scope`` event, ``lock_scope=local``) where the lock is
node-local:

- Lustre: cluster-wide with the ``flock`` mount option; ``localflock`` is node-local and without
  either (``noflock``) flock fails or is local: both ``local``.
- NFS: ``local_lock=none`` (the default) sends flock to the server (NLM or NFSv4 locks);
  ``local_lock=flock`` or ``local_lock=all`` keep it on the client: ``local``.
- CephFS, GlusterFS, GPFS, CIFS (without ``nobrl``): the server arbitrates: ``cluster``.
- BeeGFS (global locks are a server tunable, off by default), 9p, FUSE: ``local``.
- Local disks (ext4, xfs, tmpfs, ...): only this node sees them: ``node`` (no warning).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from .fstype import _read_mountinfo, find_mount

__all__ = ["LockScope", "LockScopeWarner", "lock_scope", "mount_options"]

_MOUNTS_FRESH_S = 60.0
_CLUSTER_FS = frozenset({"ceph", "glusterfs", "gpfs"})
_LOCAL_NETWORK_FS = frozenset({"beegfs", "9p"})


@dataclass(frozen=True, slots=True)
class LockScope:
    scope: str  # "cluster" | "local" | "node" | "unknown"
    fstype: str
    reason: str


def mount_options(mount_id: int, mountinfo: str) -> set[str]:
    """The per-mount and the superblock options of the mount ``mount_id`` (last line wins)."""
    options: set[str] = set()
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if not fields or fields[0] != str(mount_id) or "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        per_mount = fields[5].split(",") if len(fields) > 5 else []
        superblock = fields[sep + 3].split(",") if sep + 3 < len(fields) else []
        options = set(per_mount) | set(superblock)
    return options


def lock_scope(path: str | os.PathLike[str], mountinfo: str | None = None) -> LockScope:
    """Where a flock on ``path`` is seen (module docstring); ``unknown`` if undeterminable."""
    try:
        text = _read_mountinfo() if mountinfo is None else mountinfo
        entry = find_mount(path, text)
    except (OSError, LookupError) as exc:
        return LockScope("unknown", "", f"cannot read the mount table: {exc}")
    fstype = entry.fstype.lower()
    opts = mount_options(entry.mount_id, text)
    return LockScope(*_judge(fstype, opts))


def _judge(fstype: str, opts: set[str]) -> tuple[str, str, str]:
    if fstype == "lustre":
        if "flock" in opts:
            return "cluster", fstype, "Lustre mounted with flock"
        why = "localflock" if "localflock" in opts else "without flock"
        return "local", fstype, f"Lustre mounted {why}: flock is node-local"
    if fstype in ("nfs", "nfs4"):
        local = next((o for o in opts if o in ("local_lock=flock", "local_lock=all")), None)
        if local is not None:
            return "local", fstype, f"NFS mounted with {local}: flock is node-local"
        return "cluster", fstype, "NFS sends flock to the server"
    if fstype in ("cifs", "smb3"):
        if "nobrl" in opts:
            return "local", fstype, "CIFS mounted with nobrl: locks are node-local"
        return "cluster", fstype, "CIFS sends locks to the server"
    if fstype in _CLUSTER_FS:
        return "cluster", fstype, f"{fstype} arbitrates flock cluster-wide"
    if fstype in _LOCAL_NETWORK_FS or fstype in ("fuse", "fuseblk") or fstype.startswith("fuse."):
        return "local", fstype, f"{fstype}: flock is node-local"
    return "node", fstype, f"{fstype}: a local filesystem, seen by this node only"


class LockScopeWarner:
    """Logs ``lock_scope`` once per root where the lock is node-local on a shared filesystem."""

    def __init__(self, mountinfo: str | None = None) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._fixed = mountinfo
        self._read: tuple[float, str] | None = None
        # The scope by st_dev: a superblock's fstype and the options judged (flock, local_lock,
        # nobrl) are the same on every mount of it. Dropped when the mount table is read again.
        self._by_dev: dict[int, LockScope] = {}

    def _mounts(self) -> str | None:
        """The mount table, read at most once a minute (a sweep over 1,000 roots reads it once)."""
        if self._fixed is not None:
            return self._fixed
        now = time.monotonic()
        if self._read is None or now - self._read[0] > _MOUNTS_FRESH_S:
            try:
                self._read = (now, _read_mountinfo())
            except OSError:
                return None  # lock_scope reads it again and says why it cannot
            with self._lock:
                self._by_dev.clear()
        return self._read[1]

    def _scope(self, root: str) -> LockScope:
        """`lock_scope` of ``root``, judged once per filesystem (st_dev) while the mount table
        is unchanged: a sweep over 1,000 roots on one filesystem parses it once, not 1,000 times."""
        mounts = self._mounts()
        if self._fixed is not None:  # a given table need not describe this host's devices
            return lock_scope(root, mounts)
        try:
            dev = os.stat(root).st_dev
        except OSError:
            return lock_scope(root, mounts)  # says "unknown" or finds the mount without it
        with self._lock:
            known = self._by_dev.get(dev)
        if known is None:
            known = lock_scope(root, mounts)
            if known.scope != "unknown":
                with self._lock:
                    self._by_dev[dev] = known
        return known

    def check(self, root: str | os.PathLike[str], log: Any) -> LockScope | None:
        key = os.fspath(root)
        with self._lock:
            if key in self._seen:
                return None
            self._seen.add(key)
        scope = self._scope(key)
        if scope.scope == "local":
            log.warning(
                "lock_scope",
                root=key,
                lock_scope="local",
                fstype=scope.fstype,
                reason=f"{scope.reason}: keepers on other nodes are not excluded by "
                ".ckptkeeper/lock; run one keeper (or one shard) per root",
            )
        return scope
