"""``ckptkeeper check`` on ``s3://`` roots, as a real process against the loopback S3 server: the
states that exist on an object store (a stale save not collected, a tombstoned delete not
finished) and a root that is not there (no bucket: CRITICAL; nothing under the prefix: WARNING)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.helpers import CKPTKEEPER
from tests.s3.helpers import put_checkpoint

HOUR = 3600.0


def _check(env: Mapping[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run(
        [CKPTKEEPER, "check", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(env),
    )
    assert proc.stdout.strip(), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def _backdate(bucket: str, prefix: str, hours: float) -> None:
    """Objects under ``prefix`` as if written ``hours`` ago (set-up: moto's own backend, which
    serves the endpoint from this process; S3 itself never lets a client set LastModified)."""
    from moto.s3.models import s3_backends

    backend = s3_backends["123456789012"]["aws"]
    when = datetime.now(UTC) - timedelta(hours=hours)
    for key in backend.buckets[bucket].keys.values():
        if key.name.startswith(prefix):
            key.last_modified = when


def _messages(doc: dict[str, Any]) -> list[str]:
    return [f["message"] for r in doc["roots"] for f in r["findings"]]


def test_check_ok_then_stale_save_and_unfinished_delete(
    s3env: dict[str, str], bucket: str, s3: Any
) -> None:
    for step in (1, 2, 3):
        put_checkpoint(s3, bucket, "r", step, {"loss": 1.0})
    url = f"s3://{bucket}/r"
    code, doc = _check(s3env, url, "--keep-latest-n", "3")
    assert (code, doc["status"]) == (0, "OK"), doc
    assert doc["roots"][0]["checkpoints"] == 3

    put_checkpoint(s3, bucket, "r", 4, {"loss": 1.0}, marker=False)  # a save that died
    _backdate(bucket, "r/step_4/", 8)
    s3.put_object(Bucket=bucket, Key="r/.ckptkeeper/tombstones/step_1", Body=b"{}")
    s3.delete_object(Bucket=bucket, Key="r/step_1/.complete")  # a delete killed mid-way
    _backdate(bucket, "r/.ckptkeeper/tombstones/", 2)
    code, doc = _check(s3env, url, "--keep-latest-n", "3", "--stale-after", "6h")
    assert (code, doc["status"]) == (1, "WARNING"), doc
    found = _messages(doc)
    assert any("stale save step_4 not collected" in m for m in found), found
    assert any("trash step_1 not removed" in m for m in found), found
    assert doc["roots"][0]["checkpoints"] == 2  # step_1 is no checkpoint any more


def test_check_missing_bucket_and_empty_prefix(s3env: dict[str, str], bucket: str, s3: Any) -> None:
    put_checkpoint(s3, bucket, "r", 1, {"loss": 1.0})
    code, doc = _check(s3env, f"s3://{bucket}/r", f"s3://{bucket}/nothing-here")
    assert (code, doc["status"]) == (1, "WARNING"), doc
    [empty] = [r for r in doc["roots"] if r["root"].endswith("nothing-here")]
    assert empty["status"] == "WARNING" and "nothing under" in empty["findings"][0]["message"]
    code, doc = _check(s3env, f"s3://{bucket}-missing/r")
    assert (code, doc["status"]) == (2, "CRITICAL"), doc
    assert "NoSuchBucket" in doc["summary"] or "bucket" in doc["summary"].lower(), doc
