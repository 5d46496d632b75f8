"""Where a root lives: decided once, from the root as the user spelled it.

`parse_root` reads a root given on the command line, in ``[[root]]`` or found by ``[[discover]]``
and returns a `Root`: its `Storage` and the `Path` the planner and the executor join names to.
Only a spelling with a registered scheme and ``://`` (``s3://bucket/prefix``) is an object
store; anything else is a path, made absolute, even one whose first directory is named ``s3:``
(``s3:/x``, ``./s3:/x``). From then on nothing looks at a root's spelling again: whoever needs
to know whether there is a local directory to watch, a mount whose flock scope to check or a
filesystem to measure asks the root's storage (`Storage.local_dir`, `Storage.check_root`).

An object store's root `Path` is that storage's own coordinate (``s3:/bucket/prefix``, what
pathlib makes of the URL): only its storage interprets it, and `Root.url` gives the URL back.

GCS or Azure would each be one module: a `Storage` implementing the same commit-marker,
tombstone and lease rules over their API (both have conditional writes, through generation
numbers or ETags), answering ``local_dir`` with None, and its scheme's line in `SCHEMES`.
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .storage import POSIX, Storage

__all__ = [
    "SCHEMES",
    "Root",
    "is_url",
    "parse_root",
    "root_base",
    "root_path",
    "root_url",
    "split_url",
]

#: scheme -> "module:class" of its `Storage` (one instance per process, made on first use).
SCHEMES = {"s3": "ckptkeeper.s3:S3Storage"}
_STORES: dict[str, Storage] = {}
_STORES_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class Root:
    """A root: the storage it lives on and the path the planner joins names to."""

    path: Path
    storage: Storage

    @property
    def local_dir(self) -> Path | None:
        """The local directory behind the root (watches, flock scope, free space), if any."""
        return self.storage.local_dir(self.path)

    @property
    def url(self) -> str:
        """The root as it is shown: a path, or ``s3://bucket/prefix``."""
        return self.storage.url(self.path)


def scheme_of(text: str) -> str | None:
    """The registered scheme of ``text`` spelled ``<scheme>://...``; None for a path."""
    head, sep, _ = text.partition("://")
    return head if sep and head in SCHEMES else None


def is_url(text: str) -> bool:
    """``text`` (as the user wrote it) names an object-store location: ``s3://...``."""
    return scheme_of(text) is not None


def parse_root(text: str, base: Path | None = None) -> Root:
    """A root as given on the command line or in a config file: a URL keeps its scheme (and is
    never made absolute); a path is absolute (relative to ``base``, else the working dir).
    Raises ValueError for a URL without a bucket, ModuleNotFoundError never (the storage's
    client library is imported on its first request)."""
    scheme = scheme_of(text)
    if scheme is None:
        return Root((base / text) if base is not None else Path(text).absolute(), POSIX)
    split_url(Path(text))  # ValueError for a URL without a bucket
    return Root(Path(text), _storage(scheme))


def root_path(text: str, base: Path | None = None) -> Path:
    """The `Root.path` of `parse_root`."""
    return parse_root(text, base).path


def _storage(scheme: str) -> Storage:
    with _STORES_LOCK:  # one client (and one cache of ETags and leases) per process
        if scheme not in _STORES:
            module, _, name = SCHEMES[scheme].partition(":")
            _STORES[scheme] = getattr(importlib.import_module(module), name)()
        return _STORES[scheme]


def split_url(root: str | os.PathLike[str]) -> tuple[str, str]:
    """(bucket, key prefix without a trailing slash) of an S3 root's path (``s3:/b/p``)."""
    parts = PurePosixPath(os.fspath(root)).parts
    if len(parts) < 2 or parts[0] != "s3:" or not parts[1]:
        raise ValueError(f"not an s3://bucket[/prefix] URL: {os.fspath(root)!r}")
    return parts[1], "/".join(parts[2:])


def root_base(root: str | os.PathLike[str]) -> tuple[str, str]:
    """(bucket, key prefix of the objects below the root: ``""`` or ending in ``/``)."""
    bucket, prefix = split_url(root)
    return bucket, (prefix + "/" if prefix else "")


def root_url(root: str | os.PathLike[str]) -> str:
    """``s3://bucket/prefix`` of an S3 root's path (or of a path below it)."""
    bucket, prefix = split_url(root)
    return f"s3://{bucket}/{prefix}".rstrip("/")
