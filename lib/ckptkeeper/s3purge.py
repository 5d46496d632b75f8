"""The data part of an ``s3://`` delete (DESIGN section 10): `Purge` finishes one tombstoned
checkpoint. `s3.S3Storage.trash` has already renewed the lease, written the tombstone and
removed the commit marker; the purge removes the marker again (a delete interrupted before it),
then every object under the prefix with ``DeleteObjects`` in batches of at most `BATCH` keys on
``workers`` threads (each key's error checked, throttled keys retried with backoff), then lists
the prefix for anything written since the pass's listing, and last removes the tombstone: only
when nothing was left, so a purge that failed or was cancelled is finished by the next pass.
"""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .removal import Removal
from .s3client import RETRYABLE, os_error
from .s3scan import TOMBSTONES
from .stores import root_base, root_url

__all__ = ["BATCH", "Purge"]

BATCH = 1000  # DeleteObjects takes at most 1,000 keys
_KEY_ATTEMPTS = 8


class Purge:
    """Finish one tombstoned delete: marker, every object in batches, then the tombstone."""

    def __init__(
        self,
        client: Any,
        root: Path,
        name: str,
        markers: tuple[str, ...],
        removal: Removal,
        workers: int,
        cancel: threading.Event | None,
    ) -> None:
        self.client, self.name, self.markers, self.removal = client, name, markers, removal
        self.bucket, self.base = root_base(root)
        self.where, self.workers, self.cancel = root_url(root / name), max(1, workers), cancel

    def run(self, known: list[tuple[str, int]]) -> None:
        """``known``: the keys the pass's scan listed under the prefix, deleted first; then a
        listing deletes whatever else is there (written since), so nothing is left behind."""
        tomb = f"{self.base}{TOMBSTONES}{self.name}"
        prefix = f"{self.base}{self.name}/"
        try:
            self.client.head_object(Bucket=self.bucket, Key=tomb)
        except Exception as exc:
            if os_error(exc, tomb).errno == errno.ENOENT:
                return  # finished by another keeper
            self.removal.leave(self.where, os_error(exc, tomb).strerror or "")
            return
        try:
            for marker in self.markers:  # first
                self.client.delete_object(Bucket=self.bucket, Key=prefix + marker)
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            with ThreadPoolExecutor(self.workers) as pool:
                done = {prefix + m for m in self.markers}
                known = [(k, n) for k, n in known if k.startswith(prefix) and k not in done]
                for i in range(0, len(known), BATCH):
                    pool.submit(self.batch, known[i : i + BATCH])
            with ThreadPoolExecutor(self.workers) as pool:
                for page in pages:
                    if self.cancel is not None and self.cancel.is_set():
                        self.removal.leave(self.where, "cancelled: the next pass finishes it")
                        break
                    objs = [
                        (str(o["Key"]), int(o.get("Size", 0))) for o in page.get("Contents", ())
                    ]
                    for i in range(0, len(objs), BATCH):
                        pool.submit(self.batch, objs[i : i + BATCH])
        except Exception as exc:
            self.removal.leave(self.where, os_error(exc, self.where).strerror or "")
        if not self.removal.left:
            with contextlib.suppress(Exception):
                self.client.delete_object(Bucket=self.bucket, Key=tomb)

    def batch(self, objs: list[tuple[str, int]]) -> None:
        sizes = dict(objs)
        todo, pause = list(sizes), 0.05
        for attempt in range(_KEY_ATTEMPTS):
            try:
                resp = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in todo], "Quiet": True},
                )
            except Exception as exc:  # botocore already retried throttling with backoff
                for key in todo:
                    self.removal.leave(
                        f"s3://{self.bucket}/{key}", os_error(exc, key).strerror or ""
                    )
                return
            errors = resp.get("Errors", [])
            failed = {str(e.get("Key")) for e in errors}
            self.removal.add(files=len(todo) - len(failed), size=sum(
                sizes.get(k, 0) for k in todo if k not in failed
            ))  # fmt: skip
            retry = [str(e["Key"]) for e in errors if e.get("Code") in RETRYABLE]
            for e in errors:
                if e.get("Code") not in RETRYABLE:
                    where = f"s3://{self.bucket}/{e.get('Key')}"
                    self.removal.leave(where, f"{e.get('Code')}: {e.get('Message', '')}")
            if not retry:
                return
            todo = retry
            if attempt + 1 < _KEY_ATTEMPTS:
                time.sleep(pause)  # throttled keys: back off, then only those again
                pause = min(pause * 2, 2.0)
        for key in todo:
            self.removal.leave(f"s3://{self.bucket}/{key}", "SlowDown: still throttled, retried")
