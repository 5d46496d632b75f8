"""Several keepers over one set of roots: ``[daemon] shard = "i/n"`` / ``--shard i/n``.

A keeper with shard ``i/n`` handles only the roots whose stable hash mod ``n`` is ``i``. The hash
is SHA-256 of the root as spelled in the configuration (a path, or an ``s3://`` URL), so every
keeper given the same configuration agrees without talking to the others; a Kubernetes
StatefulSet ordinal or a Slurm array index picks ``i``. The per-root lock (flock) or lease still
guards every mutation: a wrong shard costs duplicated work, never data.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

__all__ = ["Shard", "parse_shard", "shard_index"]


@dataclass(frozen=True, slots=True)
class Shard:
    index: int
    count: int

    def owns(self, root: str | os.PathLike[str]) -> bool:
        return shard_index(root, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_index(root: str | os.PathLike[str], count: int) -> int:
    """The shard of ``root`` among ``count``: the same on every host and Python version."""
    digest = hashlib.sha256(os.fsencode(os.fspath(root))).digest()
    return int.from_bytes(digest[:8], "big") % count


def parse_shard(text: str) -> Shard:
    """``"i/n"`` with 0 <= i < n; raises ValueError saying what is wrong."""
    head, sep, tail = text.strip().partition("/")
    if not sep or not head.isdigit() or not tail.isdigit() or not (head + tail).isascii():
        raise ValueError(f'must be "i/n" (e.g. "0/4"), got {text!r}')
    index, count = int(head), int(tail)
    if count < 1:
        raise ValueError(f"n must be at least 1, got {text!r}")
    if index >= count:
        raise ValueError(f"i must be below n (0 <= i < n), got {text!r}")
    return Shard(index, count)
