"""A root's lease on an object store: ``<root>/.ckptkeeper/lease``, taken with conditional writes.

An object store has no flock. The lease object holds the holder, its expiry (epoch seconds, by
the holder's clock: keep ``ttl`` far above the clock skew between keepers) and a generation that
grows with every takeover. It is created with ``If-None-Match: *`` (only one creator wins), and
renewed, released or taken over (once expired) with ``If-Match: <etag>`` (only the writer that saw
the current version wins). Every tombstone is written right after a renewal, so a keeper whose
lease was taken over stops before it deletes anything.

Before its first lease on a root, a keeper checks that the store honours conditional writes (a
second ``If-None-Match: *`` put of a probe object must fail, and so must an ``If-Match`` with an
ETag that cannot match). A store that ignores them (some S3-compatible stores and old gateways)
would let two keepers both "hold" the lease: the keeper refuses to delete there and says so
(`ConditionalWritesIgnored`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from .s3client import condition_failed, os_error

__all__ = ["ConditionalWritesIgnored", "S3Lease", "check_conditional_writes"]

LEASE_KEY = ".ckptkeeper/lease"
PROBE_KEY = ".ckptkeeper/conditional-write-probe"
DEFAULT_TTL = 300.0
_NEVER_ETAG = '"00000000000000000000000000000000"'


class ConditionalWritesIgnored(OSError):
    def __init__(self, where: str, what: str) -> None:
        super().__init__(
            errno.ENOTSUP,
            f"the store ignores conditional writes ({what}): no lease can be held, "
            "so nothing is deleted here",
            where,
        )


def _put(client: Any, bucket: str, key: str, body: bytes, **cond: str) -> str:
    return str(client.put_object(Bucket=bucket, Key=key, Body=body, **cond)["ETag"])


def check_conditional_writes(client: Any, bucket: str, base: str, where: str) -> None:
    """Raises `ConditionalWritesIgnored` unless the store rejects both a second create with
    ``If-None-Match: *`` and a put with a non-matching ``If-Match``; OSError if it fails."""
    key = base + PROBE_KEY
    tries = (
        ({"IfNoneMatch": "*"}, None),  # creates the probe, or it exists already
        ({"IfNoneMatch": "*"}, "If-None-Match: *"),  # it exists now: must be refused
        ({"IfMatch": _NEVER_ETAG}, "If-Match"),  # no object has this ETag: must be refused
    )
    for cond, what in tries:
        try:
            _put(client, bucket, key, b"probe", **cond)
        except Exception as exc:
            if condition_failed(exc):
                continue
            raise os_error(exc, where) from None
        if what is not None:  # accepted a write whose condition could not hold
            raise ConditionalWritesIgnored(where, what)


class S3Lease:
    """The `storage.Lock` of one S3 root: ``acquire`` then ``release``; ``renew`` while held."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        base: str,
        where: str,
        *,
        timeout: float | None,
        ttl: float = DEFAULT_TTL,
        verify: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client, self.bucket, self.key, self.where = client, bucket, base + LEASE_KEY, where
        self.timeout, self.ttl, self.verify, self.clock = timeout, ttl, verify, clock
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.etag: str | None = None
        self.generation = 0

    def _body(self, expires: float) -> bytes:
        doc = {"holder": self.holder, "expires": expires, "generation": self.generation}
        return json.dumps(doc).encode()

    def acquire(self) -> bool:
        if self.verify is not None:
            self.verify()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        pause = 0.05
        while not self._try():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            left = 1.0 if deadline is None else deadline - time.monotonic()
            time.sleep(max(0.0, min(pause, left)))  # another keeper holds it: poll, backing off
            pause = min(pause * 2, 1.0)
        return True

    def _try(self) -> bool:
        self.generation = 1
        try:
            self.etag = _put(
                self.client, self.bucket, self.key, self._body(self._expiry()), IfNoneMatch="*"
            )
            return True
        except Exception as exc:
            if not condition_failed(exc):
                raise os_error(exc, self.where) from None
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
            etag, raw = str(got["ETag"]), got["Body"].read(64 * 1024)
        except Exception as exc:
            if getattr(exc, "response", {}).get("Error", {}).get("Code") == "NoSuchKey":
                return False  # released in between: the next try creates it
            raise os_error(exc, self.where) from None
        expires, generation = _parse(raw)
        if expires > self.clock():
            return False  # held by someone else
        self.generation = generation + 1  # a takeover (or a released lease): a new generation
        return self._replace(etag, self._expiry())

    def _expiry(self) -> float:
        return self.clock() + self.ttl

    def _replace(self, etag: str, expires: float) -> bool:
        try:
            self.etag = _put(self.client, self.bucket, self.key, self._body(expires), IfMatch=etag)
            return True
        except Exception as exc:
            if condition_failed(exc):
                return False
            raise os_error(exc, self.where) from None

    def renew(self) -> None:
        """Prove the lease is still ours (and extend it); OSError (EAGAIN) if it was lost."""
        if self.etag is None or not self._replace(self.etag, self._expiry()):
            self.etag = None
            raise OSError(errno.EAGAIN, "lease lost to another keeper: not deleting", self.where)

    def release(self) -> None:
        """Mark it expired (a conditional put, portable where conditional deletes are not)."""
        if self.etag is not None:
            with contextlib.suppress(OSError):  # else it expires by itself
                self._replace(self.etag, 0.0)
            self.etag = None


def _parse(raw: bytes) -> tuple[float, int]:
    """(expires, generation) of a lease object; an unreadable one counts as expired."""
    try:
        doc = json.loads(raw)
        return float(doc["expires"]), int(doc["generation"])
    except (ValueError, KeyError, TypeError):
        return 0.0, 0
