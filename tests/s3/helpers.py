"""Writing checkpoints to S3 the way a trainer's own writer does (objects, then the marker)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.helpers import CKPTKEEPER


def put_checkpoint(
    s3: Any,
    bucket: str,
    root: str,
    step: int,
    info: Mapping[str, Any] | None = None,
    *,
    files: int = 3,
    marker: bool = True,
    name: str | None = None,
) -> list[str]:
    """``<root>/step_<step>/``: ``files`` shards, training_info.json, then ``.complete``.
    Returns every key written (the checkpoint's manifest)."""
    base = f"{root}/{name or f'step_{step}'}/"
    keys = [f"{base}policy/shard_{i:05d}.bin" for i in range(files)]

    if len(keys) > 100:  # set-up only: straight into moto's in-process backend (fast)
        from moto.s3.models import s3_backends

        backend = s3_backends["123456789012"]["aws"]
        for key in keys:
            backend.put_object(bucket, key, key.encode())
    else:

        def put(key: str) -> None:
            s3.put_object(Bucket=bucket, Key=key, Body=f"{key}".encode())

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, keys))
    if info is not None:
        key = base + "training_info.json"
        s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(info).encode())
        keys.append(key)
    if marker:
        s3.put_object(Bucket=bucket, Key=base + ".complete", Body=b"{}")
        keys.append(base + ".complete")
    return keys


def keys_under(s3: Any, bucket: str, prefix: str) -> set[str]:
    out: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out |= {o["Key"] for o in page.get("Contents", ())}
    return out


def sweep(
    env: Mapping[str, str], *args: str, timeout: float = 120
) -> tuple[int, list[dict[str, Any]], str]:
    """``ckptkeeper sweep ARGS`` as a real process; (exit code, JSON log events, stderr)."""
    out = subprocess.run(
        [CKPTKEEPER, "sweep", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env),
    )
    events = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return out.returncode, events, out.stderr
