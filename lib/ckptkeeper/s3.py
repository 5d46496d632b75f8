"""``s3://bucket/prefix`` roots (DESIGN section 10): the `Storage` of an object store.

No rename and no flock there, so:

- **Commit**: ``step_N/`` is a checkpoint once its commit marker (``.complete``, or the layout's)
  exists; the writer puts it last (`commit`). Nothing is finalized by a keeper.
- **Delete** (`S3Storage.trash`, then `S3Storage.remove_trash`): renew the lease, write the
  tombstone ``<root>/.ckptkeeper/tombstones/<name>`` (holding the lease generation), remove the
  marker (from then on no resume loads the checkpoint), then ``DeleteObjects`` in batches of at
  most 1,000 keys (`s3purge.Purge`), each key's error checked and throttling retried with backoff,
  and last the tombstone. A pass purges every tombstone it finds, so a delete interrupted at any
  point (``kill -9``) is finished by the next pass.
- **Lock**: the lease of `ckptkeeper.lease`.

Writers (a trainer's own S3 writer) follow the protocol by writing every object of ``step_N/``
first and the marker last: `commit` does that last step.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .layouts import NEMO_RL, Classifier, Layout, Look, commit_files
from .lease import S3Lease, check_conditional_writes
from .records import RootScan
from .removal import Removal
from .s3client import make_client, os_error, s3_stat
from .s3look import S3Reads
from .s3purge import BATCH, Purge
from .s3scan import (
    TOMBSTONES,
    EtagCache,
    Listing,
    S3RootFiles,
    list_root,
    look_at,
    records_of,
)
from .scan import InfoCache, LockProbe
from .stores import root_base, root_url, split_url

__all__ = ["BATCH", "S3Storage", "commit"]

_PENDING_S = 5.0  # how long the settings' listing of a root may serve the pass's look


class S3Storage:
    """The `storage.Storage` of ``s3://`` roots (one per process: it keeps the ETag cache, the
    verified-conditional-writes set and the lease held on each root)."""

    def __init__(self, client: Any = None, *, lease_ttl: float = 300.0) -> None:
        self._client = client
        self._made, self._endpoint = False, os.environ.get("AWS_ENDPOINT_URL")
        self._guard = threading.Lock()
        self.etags = EtagCache()
        self.lease_ttl = lease_ttl
        self.requests = 0  # listing pages, for the bench and the request-count tests
        self._verified: set[str] = set()
        self._leases: dict[str, S3Lease] = {}
        # root -> (layout, commit files: removed first by a delete) of its last scan
        self._last: dict[str, tuple[Layout, tuple[str, ...]]] = {}
        self._listed: dict[str, dict[str, list[tuple[str, int]]]] = {}  # root -> name -> keys
        self._pending: dict[str, tuple[Listing, float]] = {}  # root -> (listing, monotonic)

    @property
    def client(self) -> Any:
        with self._guard:
            # A client made here follows the environment's endpoint (one storage per process).
            endpoint = os.environ.get("AWS_ENDPOINT_URL")
            if self._client is None or (self._made and endpoint != self._endpoint):
                self._client, self._made, self._endpoint = make_client(), True, endpoint
            return self._client

    # -- reading ------------------------------------------------------------------------------

    def scan(
        self,
        root: Path,
        *,
        layout: Layout = NEMO_RL,
        marker: str = "",
        cache: InfoCache | None = None,
        stale_before: float | None = None,
        memo: bool = False,
        steps: Collection[int] | None = None,  # a full listing all the same: callers select
    ) -> RootScan:
        bucket, base = root_base(root)
        marker = marker or layout.default_marker
        listing = self._recent(root) if memo else None  # (an acted-on scan lists afresh)
        if listing is None:
            listing = self._list(root)
        reads = S3Reads(self.client, bucket, base, self.etags)
        scan = records_of(listing, root, layout, marker, reads, stale_before, time.time())
        with self._guard:
            self._pending.pop(str(root), None)
            self._last[str(root)] = (scan.layout, _markers(scan.layout, marker))
            if not memo:  # the scan a pass acts on: its keys spare the purge a second listing
                self._listed[str(root)] = {
                    name: [(f"{base}{name}/{rest}", o.size) for rest, o in files.items()]
                    for name, files in listing.groups.items()
                }
        return scan

    def _list(self, root: Path) -> Listing:
        bucket, base = root_base(root)
        listing = list_root(self.client, bucket, base, NEMO_RL, root_url(root))
        with self._guard:
            self.requests += listing.requests
        return listing

    def _recent(self, root: Path) -> Listing | None:
        """The listing `root_files` just made of ``root`` (for the settings of this pass), if
        younger than `_PENDING_S`: the pass's unlocked look reuses it, so a pass over a root
        where nothing changed costs one listing, settings included."""
        with self._guard:
            pending = self._pending.get(str(root))
        if pending is None or time.monotonic() - pending[1] > _PENDING_S:
            return None
        return pending[0]

    def root_files(self, root: Path) -> S3RootFiles:
        """The root's own files (``ckptkeeper.toml``, each step's ``config.yaml``) from a
        listing made now, or within `_PENDING_S` (a resolve reads several files)."""
        bucket, base = root_base(root)
        reads = S3Reads(self.client, bucket, base, self.etags)
        listing = self._recent(root)
        if listing is None:
            try:
                listing = self._list(root)
            except OSError as exc:  # the pass reports the root's own problem
                return S3RootFiles(None, reads, exc.strerror or str(exc))
            with self._guard:
                self._pending[str(root)] = (listing, time.monotonic())
        return S3RootFiles(listing, reads)

    def lstat(self, path: Path) -> os.stat_result | None:
        bucket, key = split_url(path)
        where = root_url(path)
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
            mtime = head["LastModified"].timestamp()
            return s3_stat(int(head.get("ContentLength", 0)), mtime, directory=False)
        except Exception as exc:
            if os_error(exc, where).errno != errno.ENOENT:
                raise os_error(exc, where) from None
        try:
            page = self.client.list_objects_v2(Bucket=bucket, Prefix=key + "/", MaxKeys=1)
        except Exception as exc:
            raise os_error(exc, where) from None
        return s3_stat(0, 0.0, directory=True) if page.get("KeyCount", 0) else None

    def writer_lock(self, directory: Path, lock_file: str) -> LockProbe:
        return LockProbe(False)  # no writer locks on an object store: stale_after decides

    def look(self, layout: Layout, path: Path, now: float) -> Look | None:
        """The layout's verdict on ``path`` from a fresh listing of its root (the executor's
        re-check before it collects a save: rare, so one listing is fine)."""
        if not isinstance(layout, Classifier) or (parsed := layout.parse(path.name)) is None:
            return None
        root = path.parent
        bucket, base = root_base(root)
        listing = self._list(root)
        files = listing.groups.get(path.name)
        if not files or path.name in listing.tombstones:
            return None
        reads = S3Reads(self.client, bucket, base, self.etags)
        return look_at(listing, root, layout, parsed, reads, now)

    def last_change(self, directory: Path, stop_above: float) -> float:
        bucket, key = split_url(directory)
        newest, found = 0.0, False
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=key + "/"
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    found = True
                    newest = max(newest, float(obj["LastModified"].timestamp()))
                    if newest > stop_above:
                        return newest
        except Exception as exc:
            raise os_error(exc, root_url(directory)) from None
        if not found:
            raise FileNotFoundError(errno.ENOENT, "no objects", root_url(directory))
        return newest

    # -- effects ------------------------------------------------------------------------------

    def rename(self, src: Path, dst: Path) -> None:
        raise OSError(errno.ENOTSUP, "object stores have no rename", root_url(src))

    def sync(self, directory: Path) -> None:
        """Every S3 write is durable once acknowledged."""

    def pin(self, directory: Path, pin_file: str) -> None:
        bucket, key = split_url(directory / pin_file)
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=b"")
        except Exception as exc:
            raise os_error(exc, root_url(directory / pin_file)) from None

    def trash(self, root: Path, path: Path) -> Path | None:
        """Tombstone, then remove the marker: ``path`` stops being a checkpoint at once."""
        markers = self._last.get(str(root), (NEMO_RL, (NEMO_RL.default_marker,)))[1]
        lease = self._leases.get(str(root))
        if lease is None:
            raise OSError(errno.ENOLCK, "no lease held on the root: not deleting", root_url(root))
        if self.lstat(path) is None:
            return None  # already gone
        lease.renew()  # still ours, right now: a keeper that lost it stops here
        bucket, base = root_base(root)
        tomb = {"generation": lease.generation, "holder": lease.holder, "time": time.time()}
        try:
            self.client.put_object(
                Bucket=bucket, Key=f"{base}{TOMBSTONES}{path.name}", Body=json.dumps(tomb).encode()
            )
            for marker in markers:
                self.client.delete_object(Bucket=bucket, Key=f"{base}{path.name}/{marker}")
        except Exception as exc:
            raise os_error(exc, root_url(path)) from None
        return root / ".ckptkeeper" / "tombstones" / path.name

    def remove_trash(
        self, root: Path, paths: list[Path], *, workers: int, cancel: threading.Event | None
    ) -> list[tuple[Path, Removal]]:
        layout, markers = self._last.get(str(root), (NEMO_RL, (NEMO_RL.default_marker,)))
        out: list[tuple[Path, Removal]] = []
        for path in paths:
            removal = Removal()
            if (
                path.parent != root / ".ckptkeeper" / "tombstones"
                or layout.parse(path.name) is None
            ):
                removal.leave(root_url(path), "not a tombstone of this root: not removed")
            else:
                known = self._listed.get(str(root), {}).get(path.name, [])
                purge = Purge(self.client, root, path.name, markers, removal, workers, cancel)
                purge.run(known)
            out.append((path, removal))
        with self._guard:
            self._listed.pop(str(root), None)  # used once: a later purge lists afresh
        return out

    def lock(self, root: Path, timeout: float | None) -> _HeldLease:
        bucket, base = root_base(root)
        where = root_url(root)

        def verify() -> None:
            if where not in self._verified:
                check_conditional_writes(self.client, bucket, base, where)
                self._verified.add(where)

        lease = S3Lease(
            self.client, bucket, base, where, timeout=timeout, ttl=self.lease_ttl, verify=verify
        )
        return _HeldLease(self, str(root), lease)

    def local_dir(self, root: Path) -> Path | None:
        return None  # polled; a lease, not flock; no free-space figure

    def check_root(self, root: Path) -> str | None:
        return None  # a root is its prefix: the listing says whether anything is there

    def url(self, path: Path) -> str:
        return root_url(path)


class _HeldLease:
    """A lease that the storage knows about while it is held (`S3Storage.trash` renews it)."""

    def __init__(self, store: S3Storage, root: str, lease: S3Lease) -> None:
        self.store, self.root, self.lease = store, root, lease

    def acquire(self) -> bool:
        if not self.lease.acquire():
            return False
        self.store._leases[self.root] = self.lease
        return True

    def release(self) -> None:
        self.store._leases.pop(self.root, None)
        self.lease.release()


def _markers(layout: Layout, marker: str) -> tuple[str, ...]:
    """What a delete removes first so that the checkpoint stops being one: the policy's marker
    (name-only layouts), or the layout's own commit files (one that looks inside)."""
    return commit_files(layout) if isinstance(layout, Classifier) else (marker,)


def commit(url: str, *, marker: str = ".complete", client: Any = None) -> str:
    """Write the commit marker of the checkpoint at ``url`` (``s3://bucket/root/step_N``) after
    every other object of it is written: the last step of a save by the trainer's own S3 writer.
    Refuses an empty prefix (nothing was saved). Returns the marker's URL."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3://bucket/prefix URL: {url!r}")
    path = Path(url)
    bucket, key = split_url(path)
    s3 = client if client is not None else make_client()
    try:
        if not s3.list_objects_v2(Bucket=bucket, Prefix=key + "/", MaxKeys=1).get("KeyCount"):
            raise OSError(errno.ENOENT, "nothing saved under the prefix: not committed", url)
        body: dict[str, Any] = {"time": datetime.now(UTC).isoformat(), "pid": os.getpid()}
        body["host"] = socket.gethostname()
        s3.put_object(Bucket=bucket, Key=f"{key}/{marker}", Body=json.dumps(body).encode())
    except OSError:
        raise
    except Exception as exc:
        raise os_error(exc, url) from None
    return f"{root_url(path)}/{marker}"
