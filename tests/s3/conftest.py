"""Fixtures of the S3 tests: moto's server and the fault proxy on 127.0.0.1, torn down after."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("moto")
pytest.importorskip("boto3")

from tests.s3server import S3Endpoint, s3_endpoint

_BUCKETS = itertools.count()


@pytest.fixture(scope="module")
def endpoint() -> Iterator[S3Endpoint]:
    with s3_endpoint() as ep:
        yield ep


@pytest.fixture
def s3env(endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process and its children talk to the loopback endpoint (and nothing else)."""
    env = endpoint.env()
    for key in [k for k in os.environ if k.lower().endswith("_proxy")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    endpoint.proxy.counts.clear()
    endpoint.proxy.strip_conditions = False
    endpoint.proxy.hold_deletes_after = None
    return env


@pytest.fixture
def bucket(endpoint: S3Endpoint, s3env: dict[str, str]) -> str:
    name = f"ckpt-{os.getpid()}-{next(_BUCKETS)}"
    endpoint.client(direct=True).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3(endpoint: S3Endpoint) -> Any:
    """A boto3 client straight to moto (test set-up and checks are not counted)."""
    return endpoint.client(direct=True)
