"""A run's own settings files on an ``s3://`` root: ``ckptkeeper.toml`` at the root prefix and
the ``config.yaml`` metric walk, read through the storage from the pass's one listing, fetched
only when their ETag changed: a pass over an unchanged root costs one listing and no reads."""

from __future__ import annotations

import json
from typing import Any

from tests.s3server import S3Endpoint

from ckptkeeper import Policy
from ckptkeeper.info import InfoCache
from ckptkeeper.s3 import S3Storage
from ckptkeeper.stores import Root, parse_root, root_path
from ckptkeeperd.config import config_from_flags
from ckptkeeperd.reconcile import reconcile
from ckptkeeperd.resolver import SettingsResolver

CONFIG_YAML = b"checkpointing:\n  metric_name: reward\n  higher_is_better: true\n"


def _put(s3: Any, bucket: str, key: str, body: bytes) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=body)


def _run(s3: Any, bucket: str) -> None:
    for step, reward in ((1, 0.9), (2, 0.1), (3, 0.5), (4, 0.2)):
        base = f"r/step_{step}/"
        _put(s3, bucket, base + "weights.bin", b"w")
        _put(s3, bucket, base + "training_info.json", json.dumps({"reward": reward}).encode())
        if step in (1, 3):  # the newest (4) has none: the walk goes down to step_3
            _put(s3, bucket, base + "config.yaml", CONFIG_YAML)
        _put(s3, bucket, base + ".complete", b"{}")
    _put(s3, bucket, "r/ckptkeeper.toml", b"keep_top_k = 1\n")


def test_run_file_and_config_yaml_from_s3_and_an_unchanged_root_costs_one_listing(
    endpoint: S3Endpoint, bucket: str, s3: Any
) -> None:
    _run(s3, bucket)
    where = parse_root(f"s3://{bucket}/r")
    root = where.path
    config = config_from_flags([root], {})  # neither the metric nor a bound: the run's files
    resolver, cache = SettingsResolver(), InfoCache()
    seen: list[Policy] = []

    def policy() -> Policy:
        resolved = resolver.resolve(config, where, {})
        assert not resolved.problems, resolved.problems
        seen.append(resolved.settings.policy)
        return seen[-1]

    report = reconcile(root, policy, cache=cache, storage=where.storage)
    assert seen[-1].keep_top_k == 1 and seen[-1].metric_name == "reward"
    assert seen[-1].higher_is_better is True
    assert {o.decision.step for o in report.outcomes if o.status == "done"} == {2, 3}
    # step_3 gone: the walk reads step_1's config.yaml
    reconcile(root, policy, cache=cache, storage=where.storage)
    assert seen[-1].metric_name == "reward"
    endpoint.proxy.counts.clear()
    report = reconcile(root, policy, cache=cache, storage=where.storage)
    assert report.status == "ok" and not report.outcomes
    assert dict(endpoint.proxy.counts) == {"ListObjects": 1}  # settings included: 0 reads

    _put(s3, bucket, "r/ckptkeeper.toml", b"keep_top_k = 5\n")  # a new ETag: read once
    endpoint.proxy.counts.clear()
    reconcile(root, policy, cache=cache, storage=where.storage)
    assert seen[-1].keep_top_k == 5
    assert dict(endpoint.proxy.counts) == {"ListObjects": 1, "GetObject": 1}


def test_an_invalid_run_file_on_s3_pauses_deletions_and_says_where(
    endpoint: S3Endpoint, bucket: str, s3: Any
) -> None:
    _run(s3, bucket)
    _put(s3, bucket, "r/ckptkeeper.toml", b"keep_top_k = [\n")
    where = parse_root(f"s3://{bucket}/r")
    config = config_from_flags([where.path], {"keep_latest_n": 1})
    resolved = SettingsResolver().resolve(config, where, {})
    assert resolved.settings.policy.keep_latest_n is None  # paused
    [problem] = resolved.problems
    assert "ckptkeeper.toml: invalid TOML" in problem and "paused" in problem


def test_a_roots_files_are_read_through_the_storage_it_was_parsed_with(
    endpoint: S3Endpoint, bucket: str, s3: Any
) -> None:
    """The run's files are read through the root's own storage (`stores.Root.storage`), never
    through one found again from its path: here a storage with its own client straight to the
    store, so the process's ``s3://`` storage (through the counting proxy) is never asked."""
    _run(s3, bucket)
    where = Root(root_path(f"s3://{bucket}/r"), S3Storage(endpoint.client(direct=True)))
    config = config_from_flags([where.path], {})
    resolver = SettingsResolver()
    policy = resolver.resolve(config, where, {}).settings.policy
    assert (policy.keep_top_k, policy.metric_name, policy.higher_is_better) == (1, "reward", True)
    assert resolver.resolve_unranked(config, where, {}).settings.policy.keep_top_k == 1
    assert resolver.recovery_policy(config, where, {}).keep_top_k == 1
    assert dict(endpoint.proxy.counts) == {}
