"""The S3 storage, lease and pass in-process against moto on 127.0.0.1 (real HTTP)."""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import wait_until
from tests.s3.helpers import keys_under, put_checkpoint, sweep
from tests.s3server import S3Endpoint

from ckptkeeper import Action, Policy
from ckptkeeper.lease import S3Lease
from ckptkeeper.passes import locked_pass
from ckptkeeper.s3 import S3Storage, commit
from ckptkeeper.stores import parse_root, root_path, root_url


def _store(endpoint: S3Endpoint) -> S3Storage:
    return S3Storage(endpoint.client())


def test_urls_flow_as_roots_and_the_factory_picks_the_storage(tmp_path: Path) -> None:
    url = parse_root("s3://bkt/runs/a")
    root = url.path
    assert (
        root_url(root) == "s3://bkt/runs/a"
        and root_url(root / "step_1") == "s3://bkt/runs/a/step_1"
        and url.url == "s3://bkt/runs/a"
    )
    assert root_path("rel", tmp_path) == tmp_path / "rel"
    assert type(parse_root(str(tmp_path)).storage).__name__ == "PosixStorage"
    assert type(url.storage).__name__ == "S3Storage" and url.local_dir is None
    # only "s3://" as written is a URL: "s3:/x" is the directory x under a directory "s3:"
    local = parse_root("s3:/bkt/runs/a", tmp_path)
    assert local.path == tmp_path / "s3:" / "bkt" / "runs" / "a" == local.local_dir
    assert type(local.storage).__name__ == "PosixStorage"
    with pytest.raises(ValueError, match="bucket"):
        root_path("s3://")


def test_unchanged_root_costs_one_listing_and_no_reads(
    endpoint: S3Endpoint, bucket: str, s3: Any
) -> None:
    for step in range(1, 6):
        put_checkpoint(s3, bucket, "r", step, {"loss": 1.0 / step})
    store, root = _store(endpoint), root_path(f"s3://{bucket}/r")
    first = store.scan(root, marker=".complete")
    assert [c.step for c in first.steps] == [1, 2, 3, 4, 5]
    assert first.steps[0].info == {"loss": 1.0}
    endpoint.proxy.counts.clear()
    again = store.scan(root, marker=".complete")
    assert again.steps == first.steps
    assert dict(endpoint.proxy.counts) == {"ListObjects": 1}  # 1 listing, 0 reads
    s3.put_object(Bucket=bucket, Key="r/step_3/training_info.json", Body=b'{"loss": 7}')
    endpoint.proxy.counts.clear()
    changed = store.scan(root, marker=".complete")
    assert changed.steps[2].info == {"loss": 7}
    assert dict(endpoint.proxy.counts) == {"ListObjects": 1, "GetObject": 1}


def test_lease_excludes_expires_and_is_taken_over_with_a_new_generation(
    endpoint: S3Endpoint, bucket: str
) -> None:
    client = endpoint.client()
    now = [1000.0]
    a = S3Lease(client, bucket, "r/", "s3://x", timeout=0, ttl=60, clock=lambda: now[0])
    b = S3Lease(client, bucket, "r/", "s3://x", timeout=0, ttl=60, clock=lambda: now[0])
    assert a.acquire() and a.generation == 1
    assert not b.acquire()  # held and not expired
    a.renew()
    now[0] += 61  # a's holder stalled past its expiry
    assert b.acquire() and b.generation == 2
    with pytest.raises(OSError) as lost:
        a.renew()  # a finds out before it could tombstone anything
    assert lost.value.errno == errno.EAGAIN
    b.release()
    assert a.acquire() and a.generation == 3  # a released lease is taken with a new generation


def test_store_ignoring_conditional_writes_refuses_to_delete(
    endpoint: S3Endpoint, s3env: dict[str, str], bucket: str, s3: Any
) -> None:
    keys = [put_checkpoint(s3, bucket, "r", step, {"loss": 1.0}) for step in (1, 2, 3)]
    endpoint.proxy.strip_conditions = True  # the stub store drops If-None-Match / If-Match
    code, events, err = sweep(s3env, f"s3://{bucket}/r", "--keep-latest-n", "1")
    assert code == 1
    problems = [e for e in events if "ignores conditional writes" in str(e.get("reason", ""))]
    assert problems, events
    assert set().union(*map(set, keys)) <= keys_under(s3, bucket, "r/")  # nothing deleted
    endpoint.proxy.strip_conditions = False
    code, events, err = sweep(s3env, f"s3://{bucket}/r", "--keep-latest-n", "1")
    assert code == 0, err
    assert sorted(e["step"] for e in events if e["event"] == "deleted") == [1, 2]


def test_throttling_is_retried_request_and_per_key(
    endpoint: S3Endpoint, s3env: dict[str, str], bucket: str, s3: Any
) -> None:
    put_checkpoint(s3, bucket, "r", 1, {"loss": 1.0}, files=1500)
    put_checkpoint(s3, bucket, "r", 2, {"loss": 1.0})
    endpoint.proxy.slowdown["DeleteObjects"] = 2  # 503 SlowDown for the next two requests
    endpoint.proxy.key_slowdown = 1  # then one answer that reports every key as SlowDown
    code, _events, err = sweep(s3env, f"s3://{bucket}/r", "--keep-latest-n", "1")
    assert code == 0, err
    assert keys_under(s3, bucket, "r/step_1/") == set()
    # every injected fault was answered (the per-key one was not forwarded): all were retried
    assert endpoint.proxy.slowdown["DeleteObjects"] == 0 and endpoint.proxy.key_slowdown == 0
    assert not keys_under(s3, bucket, "r/.ckptkeeper/tombstones/")


def test_stale_unmarked_save_is_collected_and_fresh_one_kept(
    endpoint: S3Endpoint, bucket: str, s3: Any
) -> None:
    put_checkpoint(s3, bucket, "r", 1, {"loss": 1.0})
    put_checkpoint(s3, bucket, "r", 2, {"loss": 1.0}, marker=False)  # abandoned save
    store, root = _store(endpoint), root_path(f"s3://{bucket}/r")
    written = max(
        o["LastModified"].timestamp() for o in s3.list_objects_v2(Bucket=bucket)["Contents"]
    )
    policy = Policy.from_mapping({"stale_after": "1s"})
    fresh = locked_pass(root, policy, storage=store, clock=lambda: written + 0.5)
    assert [d.action for d in fresh.plan.decisions if d.step == 2] == [Action.WAIT]
    wait_until(lambda: time.time() > written + 2, what="the save to be 1 s old")
    stale = locked_pass(root, policy, storage=store)
    assert [o.decision.action for o in stale.outcomes] == [Action.COLLECT]
    assert keys_under(s3, bucket, "r/step_2/") == set() and keys_under(s3, bucket, "r/step_1/")


def test_commit_writes_the_marker_last_and_refuses_an_empty_prefix(
    endpoint: S3Endpoint, bucket: str, s3: Any
) -> None:
    client = endpoint.client()
    with pytest.raises(OSError, match="nothing saved"):
        commit(f"s3://{bucket}/r/step_9", client=client)
    put_checkpoint(s3, bucket, "r", 9, {"loss": 0.5}, marker=False)
    store, root = _store(endpoint), root_path(f"s3://{bucket}/r")
    assert not store.scan(root).steps
    assert commit(f"s3://{bucket}/r/step_9", client=client) == f"s3://{bucket}/r/step_9/.complete"
    assert [c.step for c in store.scan(root).steps] == [9]


def test_hostile_keys_are_untouched(
    endpoint: S3Endpoint, s3env: dict[str, str], bucket: str, s3: Any
) -> None:
    for step in (1, 2, 3, 4):
        put_checkpoint(s3, bucket, "r", step, {"loss": 1.0})
    hostile = {
        "r/step_1/../x",  # a '..' segment: step_1 becomes an anomaly, kept whole
        "r/step_2\n/x",  # a name with a newline: outside the grammar
        "r/stepx_3/.complete",  # outside the grammar
        "r/step_5",  # an object, not a prefix
        "r/notes/step_6/.complete",
    }
    for key in hostile:
        if "\n" in key:  # moto's HTTP front end refuses it (S3 takes it): into its backend
            from moto.s3.models import s3_backends

            s3_backends["123456789012"]["aws"].put_object(bucket, key, b"x")
        else:
            s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    s3.put_object(Bucket=bucket, Key="r/step_7/.complete", Body=b"{}")  # a marker without data
    before = keys_under(s3, bucket, "r/")
    code, _events, err = sweep(s3env, f"s3://{bucket}/r", "--keep-latest-n", "1")
    assert code == 0, err
    after = keys_under(s3, bucket, "r/")
    assert hostile <= after
    assert {k for k in before if k.startswith("r/step_1/")} <= after  # the anomaly is kept
    assert "r/step_7/.complete" in after  # latest: kept (and it has no training_info.json)
    gone = {k for k in before - after}
    assert gone and all(k.startswith(("r/step_2/", "r/step_3/", "r/step_4/")) for k in gone)


@pytest.mark.parametrize(
    ("marker", "writer"),
    [(".metadata", "DCP FsspecWriter (torchtitan)"), ("commit_success.txt", "Orbax")],
)
def test_other_writers_commit_signal_on_s3(
    endpoint: S3Endpoint, bucket: str, s3: Any, marker: str, writer: str
) -> None:
    """A writer whose last object is its own commit file: that file is the marker."""
    for step in (1, 2, 3):
        keys = put_checkpoint(s3, bucket, "r", step, {"loss": 1.0}, marker=False)
        if step != 3:  # step 3: its writer died before the commit file
            s3.put_object(Bucket=bucket, Key=f"r/step_{step}/{marker}", Body=b"{}")
        assert keys
    store, root = _store(endpoint), root_path(f"s3://{bucket}/r")
    policy = Policy.from_mapping({"complete_marker": marker, "keep_latest_n": 1})
    result = locked_pass(root, policy, storage=store)
    assert [(o.decision.action, o.decision.step) for o in result.outcomes] == [(Action.DELETE, 1)]
    assert not keys_under(s3, bucket, "r/step_1/")
    assert keys_under(s3, bucket, "r/step_2/") and keys_under(s3, bucket, "r/step_3/"), writer


def test_purge_deletes_the_keys_its_pass_listed_without_listing_them_again(
    endpoint: S3Endpoint, bucket: str, s3: Any
) -> None:
    """The pass's own listing names every key of the deleted checkpoint: the purge deletes
    those first, so its closing listing (for anything written since) finds nothing and costs one
    request, not another listing of the checkpoint's 2,500 keys (3 pages)."""
    put_checkpoint(s3, bucket, "r", 1, {"loss": 1.0}, files=2_500)
    put_checkpoint(s3, bucket, "r", 2, {"loss": 0.5})
    store, root = _store(endpoint), root_path(f"s3://{bucket}/r")
    endpoint.proxy.counts.clear()
    result = locked_pass(root, Policy.from_mapping({"keep_latest_n": 1}), storage=store)
    assert [r.files for _, r in result.removed] == [2_501]  # shards and info (marker: first)
    assert not keys_under(s3, bucket, "r/step_1/")
    # 3 pages for the pass's listing, 3 one-key looks (is step_1, its pin file there?), and
    # 1 closing listing of step_1/ (empty by then); listing the checkpoint again cost 2 more
    assert endpoint.proxy.counts["ListObjects"] == 7
    assert endpoint.proxy.counts["DeleteObjects"] == 3  # 2,501 keys in batches of <= 1,000


def test_fast_timestamp_parser_agrees_with_botocores() -> None:
    from botocore.utils import parse_timestamp

    from ckptkeeper.s3client import timestamp

    for text in (
        "2026-11-30T13:04:01.000Z",  # ListObjectsV2 LastModified
        "2026-11-30T13:04:01.123456Z",
        "2026-11-30T13:04:01+02:00",
        "Mon, 30 Nov 2026 13:04:01 GMT",  # a HeadObject Last-Modified header
    ):
        assert timestamp(text) == parse_timestamp(text), text
        assert timestamp(text).tzinfo is not None
