"""Which filesystem a path lives on, read from ``/proc/self/mountinfo``.

The daemon uses this to choose an observer (`resolve_observer`): inotify sees nothing that another
host does on a network filesystem (NFS, Lustre, GPFS, CIFS, FUSE-based ones, ...), so those get
polling.

Format of a mountinfo line (proc(5)); the optional fields end at a lone ``-``::

    36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    (1)(2) (3)   (4)   (5)      (6)      (7)   (8) (9)    (10)         (11)

Mount points are escaped by the kernel: space, tab, newline and backslash appear as the octal
escapes ``\\040``, ``\\011``, ``\\012`` and ``\\134``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "NETWORK_FS_TYPES",
    "OBSERVER_SETTINGS",
    "MountEntry",
    "ObserverChooser",
    "filesystem_type",
    "find_mount",
    "is_network_fs",
    "parse_mountinfo",
    "resolve_observer",
]

MOUNTINFO_PATH = "/proc/self/mountinfo"
OBSERVER_SETTINGS = ("auto", "inotify", "polling")

NETWORK_FS_TYPES: frozenset[str] = frozenset(
    {
        "nfs",
        "nfs4",
        "lustre",
        "gpfs",
        "cifs",
        "smb3",
        "smbfs",
        "beegfs",
        "ceph",
        "glusterfs",
        "9p",
    }
)

_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    """One parsed line of mountinfo (only the fields this module needs)."""

    mount_id: int
    mount_point: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """Undo the kernel's octal escapes (``\\040`` -> space) without assuming UTF-8."""
    raw = os.fsencode(field)
    decoded = _OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), raw)
    return os.fsdecode(decoded)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse mountinfo text into entries, in file order; malformed lines are skipped."""
    entries: list[MountEntry] = []
    for line in text.splitlines():
        fields = line.split(" ")
        # Fields 1-6 are fixed; the separator comes after zero or more optional fields.
        try:
            separator = fields.index("-", 6)
        except ValueError:
            continue
        if separator + 1 >= len(fields):
            continue
        try:
            mount_id = int(fields[0])
        except ValueError:
            continue
        source = fields[separator + 2] if separator + 2 < len(fields) else ""
        entries.append(
            MountEntry(
                mount_id=mount_id,
                mount_point=_unescape(fields[4]),
                fstype=_unescape(fields[separator + 1]),
                source=_unescape(source),
            )
        )
    return entries


def _contains(mount_point: str, path: str) -> bool:
    """True if ``path`` is ``mount_point`` or below it, comparing whole path components."""
    if mount_point == "/":
        return path.startswith("/")
    mount_point = mount_point.rstrip("/")
    return path == mount_point or path.startswith(mount_point + "/")


def _read_mountinfo() -> str:
    with open(MOUNTINFO_PATH, encoding=sys.getfilesystemencoding(), errors="surrogateescape") as f:
        return f.read()


def find_mount(path: str | os.PathLike[str], mountinfo: str | None = None) -> MountEntry:
    """The mount that holds ``path``: the longest mount point containing its realpath.

    When several mounts share that mount point (one mounted over another) the last one listed
    is the visible one. Raises ``LookupError`` if no mount contains the path, and ``OSError``
    if mountinfo cannot be read.
    """
    text = _read_mountinfo() if mountinfo is None else mountinfo
    target = os.path.realpath(os.fspath(path))
    best: MountEntry | None = None
    for entry in parse_mountinfo(text):
        if not _contains(entry.mount_point, target):
            continue
        if best is None or len(entry.mount_point.rstrip("/")) >= len(best.mount_point.rstrip("/")):
            best = entry
    if best is None:
        raise LookupError(f"no mount in mountinfo contains {target!r}")
    return best


def filesystem_type(path: str | os.PathLike[str], mountinfo: str | None = None) -> str:
    """Filesystem type of the mount holding ``path``, e.g. ``ext4``, ``nfs4``, ``fuse.sshfs``.

    ``mountinfo`` replaces the contents of ``/proc/self/mountinfo`` (for tests).
    """
    return find_mount(path, mountinfo).fstype


def is_network_fs(fstype: str) -> bool:
    """True for filesystems whose changes inotify may miss: network, cluster and FUSE ones."""
    name = fstype.strip().lower()
    if name in NETWORK_FS_TYPES:
        return True
    return name in ("fuse", "fuseblk") or name.startswith("fuse.")


class ObserverChooser:
    """Chooses each root's observer (`resolve_observer`), reading mountinfo once per
    (root, st_dev): a mount on a root changes its st_dev. Owned by its user (the Keeper);
    ``lookup`` finds a path's filesystem type."""

    def __init__(self, lookup: Callable[[Path], str] = filesystem_type, bound: int = 4096) -> None:
        self.lookup, self.bound = lookup, bound
        self._types: dict[tuple[Path, int], str] = {}  # bounded by clearing: roots come and go

    def __call__(self, root: Path, setting: str) -> str:
        return resolve_observer(root, setting, self.filesystem_type)

    def filesystem_type(self, root: Path) -> str:
        try:
            key = (root, os.stat(root).st_dev)
        except OSError:
            return self.lookup(root)  # no directory to key on yet: not cached
        if key not in self._types:
            if len(self._types) >= self.bound:
                self._types.clear()
            self._types[key] = self.lookup(root)
        return self._types[key]


def resolve_observer(
    root: Path, setting: str, lookup: Callable[[Path], str] = filesystem_type
) -> str:
    """``auto``/``inotify``/``polling`` -> ``inotify`` or ``polling`` for ``root``.

    ``auto`` polls roots on network, cluster and FUSE filesystems (inotify does not see what other
    hosts do there), and also when the filesystem cannot be determined. Cheap to call again for a
    known root with an `ObserverChooser`'s lookup: one ``stat``.
    """
    if setting not in OBSERVER_SETTINGS:
        raise ValueError(f"observer must be one of {', '.join(OBSERVER_SETTINGS)}, not {setting!r}")
    if setting == "polling":
        return "polling"
    if setting == "inotify":
        return "inotify"
    try:
        fstype = lookup(root)
    except (OSError, LookupError):
        return "polling"
    return "polling" if is_network_fs(fstype) else "inotify"
