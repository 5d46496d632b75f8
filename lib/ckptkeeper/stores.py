"""Which `Storage` a root lives on: the one place that tells object-store roots from paths.

A root is a `pathlib.Path` throughout ckptkeeper. An ``s3://bucket/prefix`` root is carried as
the `Path` pathlib makes of the URL, ``s3:/bucket/prefix`` (first component ``s3:``): the
planner and the executor only join names to a root and compare paths, which works unchanged,
and POSIX roots stay exactly what they were. `storage_for` picks the storage from that first
component; `root_url` gives the URL back for messages. Nothing else looks at the scheme.

GCS or Azure would plug in here: a scheme (``gs:``, ``az:``), a `Storage` implementing the same
commit-marker, tombstone and lease rules over their API (both have conditional writes through
generation numbers or ETags), and a line in `storage_for`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path, PurePosixPath

from .effects import OS_FS, Fs
from .storage import PosixStorage, Storage

__all__ = ["SCHEMES", "is_url", "root_path", "root_url", "split_url", "storage_for"]

SCHEMES = ("s3",)
_S3: dict[str, Storage] = {}
_S3_LOCK = threading.Lock()


def is_url(root: str | os.PathLike[str]) -> bool:
    """``s3://...`` as written, or a root `Path` made from one (``s3:/...``)."""
    text = os.fspath(root)
    return any(text.startswith((f"{s}://", f"{s}:/")) for s in SCHEMES)


def root_path(text: str, base: Path | None = None) -> Path:
    """A root as given on the command line or in a config file: a URL keeps its scheme (and is
    never made absolute); a path is absolute (relative to ``base``, else the working dir)."""
    if is_url(text):
        split_url(text)  # ValueError for a URL without a bucket
        return Path(text)
    return (base / text) if base is not None else Path(text).absolute()


def split_url(root: str | os.PathLike[str]) -> tuple[str, str]:
    """(bucket, key prefix without a trailing slash) of an ``s3://`` root."""
    parts = PurePosixPath(os.fspath(root)).parts
    if len(parts) < 2 or parts[0] != "s3:" or not parts[1]:
        raise ValueError(f"not an s3://bucket[/prefix] URL: {os.fspath(root)!r}")
    return parts[1], "/".join(parts[2:])


def root_url(root: str | os.PathLike[str]) -> str:
    """``s3://bucket/prefix`` for an S3 root, the path itself otherwise."""
    if not is_url(root):
        return os.fspath(root)
    bucket, prefix = split_url(root)
    return f"s3://{bucket}/{prefix}".rstrip("/")


def storage_for(root: str | os.PathLike[str], fs: Fs = OS_FS) -> Storage:
    """The storage ``root`` lives on. S3 needs the ``ckptkeeper[s3]`` extra (boto3)."""
    if not is_url(root):
        return PosixStorage(fs)
    with _S3_LOCK:  # one client (and one cache of ETags and leases) per process
        if "s3" not in _S3:
            from .s3 import S3Storage

            _S3["s3"] = S3Storage()
        return _S3["s3"]
