"""P8: S3 roots on a loopback endpoint (moto's server on 127.0.0.1, as in the tests).

P8a: delete one checkpoint of ``OBJECTS`` objects. ckptkeeper: one locked pass over a root with
that checkpoint and a newer one under ``keep_latest_n = 1`` (listing, lease, tombstone, marker,
``DeleteObjects`` in batches of 1,000 on ``delete_workers`` threads, tombstone), against a naive
boto3 loop of ``delete_object`` per key (after listing them) and against ``s3fs``'s recursive
``rm``. Objects are put straight into moto's in-process backend (set-up is not timed). Goal:
>= 20x the naive loop and >= 1.0x s3fs.

P8b: a pass over ``ROOTS`` roots where nothing changed (the daemon's `reconcile`, second pass
with a warm ETag cache), requests counted by a proxy in front of moto. Goal: 1 listing and 0
reads per root.

Client and server share this process and its 2 cores; the endpoint has no network latency, which
favours the request-per-key loop (on a real store each of its requests costs a round trip).
`ServerClock` times moto's own handling of each request (the union of their spans, by operation)
inside each timed region: ours cannot take less than moto's time for its requests (the listing of
every key, the ``DeleteObjects`` batches), which bounds the ratio whatever the client does.

``python -m bench.p8_s3 [--quick]`` runs it alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from bench.common import Row  # noqa: E402

OBJECTS, OBJECTS_QUICK = 20_000, 500
ROOTS, ROOTS_QUICK = 1_000, 20


class ServerClock:
    """WSGI wrapper around moto's app: each request's (operation, start, end); `take` gives the
    time moto was busy per operation (overlapping requests counted once) and starts afresh."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app, self.lock = app, threading.Lock()
        self.spans: list[tuple[str, float, float]] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        from tests.s3server import operation

        query = environ.get("QUERY_STRING", "")
        op = operation(environ["REQUEST_METHOD"], environ["PATH_INFO"] + "?" * bool(query) + query)
        started = time.perf_counter()
        try:
            return self.app(environ, start_response)  # moto builds the whole body here
        finally:
            with self.lock:
                self.spans.append((op, started, time.perf_counter()))

    @classmethod
    def install(cls, endpoint: Any) -> ServerClock | None:
        server = getattr(endpoint.moto, "_server", None)  # moto's werkzeug server (a bench probe)
        if server is None or not hasattr(server, "app"):
            return None
        server.app = cls(server.app)
        return server.app  # type: ignore[no-any-return]

    def take(self) -> dict[str, float]:
        with self.lock:
            spans, self.spans = self.spans, []
        busy: dict[str, float] = {}
        for op in {o for o, _, _ in spans}:
            busy[op] = _union((a, b) for o, a, b in spans if o == op)
        busy["all"] = _union((a, b) for _, a, b in spans)
        return busy


def _union(spans: Iterable[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


Timed = tuple[float, dict[str, float]]  # seconds, moto's busy seconds by operation


def _busy(clock: ServerClock | None) -> dict[str, float]:
    return clock.take() if clock is not None else {}


def _fill(bucket: str, prefix: str, count: int) -> None:
    from moto.s3.models import s3_backends

    backend = s3_backends["123456789012"]["aws"]
    for i in range(count):
        backend.put_object(bucket, f"{prefix}/policy/shard_{i:06d}.bin", b"x" * 64)


def _checkpoint(bucket: str, root: str, step: int, count: int) -> None:
    from moto.s3.models import s3_backends

    _fill(bucket, f"{root}/step_{step}", count)
    backend = s3_backends["123456789012"]["aws"]
    backend.put_object(bucket, f"{root}/step_{step}/training_info.json", b'{"loss": 1.0}')
    backend.put_object(bucket, f"{root}/step_{step}/.complete", b"{}")


def _ours(endpoint: Any, bucket: str, count: int, clock: ServerClock | None) -> Timed:
    from ckptkeeper import Policy
    from ckptkeeper.passes import locked_pass
    from ckptkeeper.s3 import S3Storage
    from ckptkeeper.stores import root_path

    _checkpoint(bucket, "ours", 1, count)
    _checkpoint(bucket, "ours", 2, 1)
    # the client ckptkeeper makes (s3client.make_client), straight to moto as the baselines' are
    env = {**endpoint.env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{endpoint.moto_port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # The environment stays set through the pass: the storage's client follows
    # AWS_ENDPOINT_URL (a changed endpoint makes a new client).
    try:
        store = S3Storage()
        store.client  # noqa: B018 - made before the clock starts, as a keeper's is
        root = root_path(f"s3://{bucket}/ours")
        _busy(clock)
        started = time.perf_counter()
        result = locked_pass(root, Policy.from_mapping({"keep_latest_n": 1}), storage=store)
        took = time.perf_counter() - started
        busy = _busy(clock)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert [r.files for _, r in result.removed] == [count + 1], result.removed
    return took, busy


def _naive(endpoint: Any, bucket: str, count: int, clock: ServerClock | None) -> Timed:
    _fill(bucket, "naive/step_1", count)
    client = endpoint.client(direct=True)
    _busy(clock)
    started = time.perf_counter()
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix="naive/step_1/"
        )
        for o in page.get("Contents", ())
    ]
    for key in keys:
        client.delete_object(Bucket=bucket, Key=key)
    took = time.perf_counter() - started
    busy = _busy(clock)
    assert len(keys) == count
    return took, busy


def _s3fs(endpoint: Any, bucket: str, count: int, clock: ServerClock | None) -> Timed | None:
    try:
        import s3fs
    except ImportError:
        return None
    _fill(bucket, "s3fs/step_1", count)
    fs = s3fs.S3FileSystem(
        key="testing",
        secret="testing",  # noqa: S106
        client_kwargs={"endpoint_url": f"http://127.0.0.1:{endpoint.moto_port}"},
    )
    _busy(clock)
    started = time.perf_counter()
    fs.rm(f"{bucket}/s3fs/step_1", recursive=True)
    took = time.perf_counter() - started
    busy = _busy(clock)
    client = endpoint.client(direct=True)
    assert not client.list_objects_v2(Bucket=bucket, Prefix="s3fs/step_1/").get("KeyCount")
    return took, busy


def _idle_pass(endpoint: Any, bucket: str, roots: int) -> tuple[float, dict[str, int]]:
    from ckptkeeper import InfoCache, Policy
    from ckptkeeper.stores import parse_root
    from ckptkeeperd.reconcile import reconcile

    for i in range(roots):
        for step in (1, 2):
            _checkpoint(bucket, f"idle/run-{i:04d}", step, 1)
    os.environ.update(endpoint.env())
    policy, cache = Policy.from_mapping({"keep_latest_n": 5}), InfoCache()
    urls = [parse_root(f"s3://{bucket}/idle/run-{i:04d}") for i in range(roots)]
    for root in urls:  # the first pass reads every training_info.json once
        reconcile(root.path, policy, cache=cache, storage=root.storage)
    endpoint.proxy.counts.clear()
    started = time.perf_counter()
    for root in urls:
        report = reconcile(root.path, policy, cache=cache, storage=root.storage)
        assert report.status in ("ok", "done") and not report.outcomes, (
            report.status,
            report.problems,
        )
    return time.perf_counter() - started, dict(endpoint.proxy.counts)


def _server_notes(ours: Timed, naive: Timed, other: Timed | None) -> list[str]:
    """Where each method's time went on moto's side, and the ratio ours would reach if its
    client side cost nothing (moto's time for the same requests; while batches overlap, a span
    also holds waits for the GIL our client threads have, so that part is approximate)."""
    (t_ours, b_ours), (t_naive, b_naive) = ours, naive
    if not b_ours or not b_naive:
        return []

    def split(busy: dict[str, float]) -> str:
        parts = ", ".join(f"{op} {sec:.2f}" for op, sec in sorted(busy.items()) if op != "all")
        return f"{busy['all']:.2f} s ({parts})"

    listing, batches = b_ours.get("ListObjects", 0.0), b_ours.get("DeleteObjects", 0.0)
    notes = [
        f"moto busy in the timed region: ours {split(b_ours)}; naive {split(b_naive)}"
        + (f"; s3fs {split(other[1])}" if other is not None and other[1] else ""),
        f"client side (time beyond moto's): ours {t_ours - b_ours['all']:.2f} s, naive "
        f"{t_naive - b_naive['all']:.2f} s",
    ]
    if listing:
        notes.append(
            f"ceiling: were our client free, ours would still wait {b_ours['all']:.2f} s for moto "
            f"(its listing {listing:.2f} s, batches {batches:.2f} s): naive / that = "
            f"{t_naive / b_ours['all']:.1f}x; with free deletes too, naive / listing = "
            f"{t_naive / listing:.1f}x"
        )
    return notes


def run(quick: bool) -> list[Row]:
    from tests.s3server import s3_endpoint

    count = OBJECTS_QUICK if quick else OBJECTS
    roots = ROOTS_QUICK if quick else ROOTS
    with s3_endpoint() as endpoint:
        bucket = "bench-p7"
        endpoint.client(direct=True).create_bucket(Bucket=bucket)
        clock = ServerClock.install(endpoint)
        ours = _ours(endpoint, bucket, count, clock)
        naive = _naive(endpoint, bucket, count, clock)
        other = _s3fs(endpoint, bucket, count, clock)
        idle_s, counts = _idle_pass(endpoint, bucket, roots)
    vs_naive = naive[0] / ours[0]
    vs_s3fs = other[0] / ours[0] if other is not None else None
    rows = [
        Row(
            "P8a",
            f"delete one S3 checkpoint of {count:,} objects (loopback)",
            f"{ours[0]:.2f} s",
            f"naive loop {naive[0]:.2f} s; s3fs rm "
            + (f"{other[0]:.2f} s" if other is not None else "not installed"),
            f"{vs_naive:.0f}x naive, " + (f"{vs_s3fs:.2f}x s3fs" if vs_s3fs else "—"),
            ">= 20x naive, >= 1.0x s3fs",
            vs_naive >= 20 and (vs_s3fs is None or vs_s3fs >= 1.0),
            notes=[
                "ours: the whole pass (listing, lease, tombstone, marker, DeleteObjects batches "
                "of 1,000 on 8 threads, tombstone); baselines: listing + deletes only",
                *_server_notes(ours, naive, other),
            ],
        )
    ]
    per_root = {op: n / roots for op, n in sorted(counts.items())}
    listings, reads = per_root.get("ListObjects", 0.0), per_root.get("GetObject", 0.0)
    rows.append(
        Row(
            "P8b",
            f"pass over {roots:,} S3 roots with nothing to do",
            f"{listings:g} listing + {reads:g} reads per root",
            "—",
            "—",
            "1 listing + 0 reads per root",
            listings == 1 and reads == 0 and set(per_root) == {"ListObjects"},
            notes=[f"{idle_s * 1000 / roots:.2f} ms per root; requests per root: {per_root}"],
        )
    )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    for row in run(args.quick):
        print(row)


if __name__ == "__main__":
    main()
