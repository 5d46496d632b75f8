"""filesystem_type() / is_network_fs(): mountinfo parsing and the observer decision it feeds."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ckptkeeperd.fstype import (
    filesystem_type,
    find_mount,
    is_network_fs,
    parse_mountinfo,
)

SAMPLE = "\n".join(
    [
        "22 27 0:21 / /proc rw,relatime - proc proc rw",
        "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard",
        "40 27 0:40 / /data rw,relatime shared:7 master:2 - nfs4 srv:/export rw,vers=4.2",
        "41 40 0:41 / /data/scratch rw,relatime - lustre 10.0.0.1@tcp:/fs rw",
        "42 27 0:42 / /mnt/my\\040runs rw,nosuid - fuse.sshfs user@host:/runs rw,user_id=0",
        "43 27 0:43 / /mnt/tab\\011and\\134slash rw - xfs /dev/sdb1 rw",
        "44 27 0:44 / /dat rw - tmpfs tmpfs rw",
        "45 27 0:45 / /over rw - ext4 /dev/sdc rw",
        "46 27 0:46 / /over rw - cifs //nas/share rw",
        "47 27 0:47 / /empty\\040src rw - tmpfs  rw",
    ]
)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", "ext4"),
        ("/home/user/ckpt", "ext4"),
        ("/proc/self", "proc"),
        ("/data", "nfs4"),
        ("/data/run1/step_100", "nfs4"),
        ("/data/scratch/run2", "lustre"),
        ("/data/scratchy", "nfs4"),  # a prefix on a component boundary only
        ("/dat/x", "tmpfs"),
        ("/database", "ext4"),
        ("/mnt/my runs/exp", "fuse.sshfs"),  # \040 is a space
        ("/mnt/my", "ext4"),
        ("/mnt/tab\tand\\slash/f", "xfs"),
        ("/over/x", "cifs"),  # mounted over /over: the later line is the visible one
    ],
)
def test_filesystem_type_picks_longest_containing_mount(path: str, expected: str) -> None:
    assert filesystem_type(path, SAMPLE) == expected


def test_parse_mountinfo_reads_fields_after_optional_separator() -> None:
    entries = {e.mount_id: e for e in parse_mountinfo(SAMPLE)}
    assert entries[40].fstype == "nfs4"
    assert entries[40].source == "srv:/export"
    assert entries[42].mount_point == "/mnt/my runs"
    assert entries[43].mount_point == "/mnt/tab\tand\\slash"


def test_empty_mount_source_does_not_shift_the_type_field() -> None:
    entry = find_mount("/empty src/x", SAMPLE)
    assert (entry.mount_point, entry.fstype, entry.source) == ("/empty src", "tmpfs", "")


def test_parse_mountinfo_skips_malformed_lines() -> None:
    text = "garbage\n\n12 1 0:1 / /x rw no-separator-here\n27 1 254:0 / / rw - ext4 /dev/vda rw\n"
    assert [e.mount_id for e in parse_mountinfo(text)] == [27]


def test_filesystem_type_resolves_symlinks_before_matching(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to("/data/scratch")
    mountinfo = SAMPLE + f"\n50 27 0:50 / {tmp_path} rw - ext4 /dev/vdb rw"
    # The link itself lives on /dev/vdb, but it points into the Lustre mount.
    assert filesystem_type(link, mountinfo) == "lustre"


def test_filesystem_type_without_containing_mount_raises_lookup_error() -> None:
    with pytest.raises(LookupError):
        filesystem_type("/anything", "40 27 0:40 / /data rw - nfs4 srv:/e rw")


def test_filesystem_type_of_real_tmp_dir_matches_findmnt(tmp_path: Path) -> None:
    fstype = filesystem_type(tmp_path)
    assert fstype
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        assert fstype in {e.fstype for e in parse_mountinfo(f.read())}
    findmnt = shutil.which("findmnt")
    if findmnt is None:
        pytest.skip("findmnt (util-linux) not installed")
    out = subprocess.run(
        [findmnt, "-n", "-o", "FSTYPE", "--target", os.fspath(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert fstype == out.stdout.strip()


@pytest.mark.parametrize(
    ("fstype", "expected"),
    [
        ("nfs", True),
        ("nfs4", True),
        ("lustre", True),
        ("gpfs", True),
        ("cifs", True),
        ("smb3", True),
        ("smbfs", True),
        ("beegfs", True),
        ("ceph", True),
        ("glusterfs", True),
        ("9p", True),
        ("fuse", True),
        ("fuseblk", True),
        ("fuse.sshfs", True),
        ("fuse.mfusepy", True),
        ("NFS4", True),
        ("ext4", False),
        ("xfs", False),
        ("btrfs", False),
        ("tmpfs", False),
        ("overlay", False),
        ("fusectl", False),  # the FUSE control fs is not a FUSE mount
        ("nfsd", False),
        ("", False),
    ],
)
def test_is_network_fs_classifies_types(fstype: str, expected: bool) -> None:
    assert is_network_fs(fstype) is expected
