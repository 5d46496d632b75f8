"""A real trainer writer on S3: torch DCP's `FsspecWriter` (through s3fs, as torchtitan saves to
object storage) writes to the loopback S3 server; a real ``ckptkeeper sweep --layout torchtitan``
keeps the newest committed steps by recency, leaves an interrupted save (no ``.metadata``) until
it is stale, and DCP's `FsspecReader` loads the latest back."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from tests.s3.helpers import keys_under, sweep

REPO = Path(__file__).resolve().parents[2]


def _writer(env: Mapping[str, str], what: str, url: str, *args: Any) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.frameworks.writers", what, url, *map(json.dumps, args)],
        cwd=REPO,
        env={**env, "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"{what}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def _steps(s3: Any, bucket: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for key in keys_under(s3, bucket, "run/"):
        name, _, rest = key[len("run/") :].partition("/")
        if name != ".ckptkeeper":
            out.setdefault(name, set()).add(rest)
    return out


def test_dcp_fsspec_writer_on_s3_recency_interrupted_save_kept_until_stale_latest_loads(
    s3env: dict[str, str], bucket: str, s3: Any
) -> None:
    for module in ("torch", "s3fs"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[test,frameworks]')")
    url = f"s3://{bucket}/run"
    _writer(s3env, "dcp_save_s3", url, [10, 20, 30, 40], 50)
    written = _steps(s3, bucket)
    assert set(written) == {"step-10", "step-20", "step-30", "step-40", "step-50"}
    assert all(".metadata" in written[f"step-{n}"] for n in (10, 20, 30, 40))
    assert ".metadata" not in written["step-50"] and written["step-50"]  # data, no commit

    code, events, err = sweep(s3env, url, "--layout", "torchtitan", "--keep-latest-n", "2")
    assert code == 0, err
    assert set(_steps(s3, bucket)) == {"step-30", "step-40", "step-50"}  # 50: not stale yet
    deleted = sorted(e["step"] for e in events if e.get("event") == "deleted")
    assert deleted == [10, 20], events

    args = ("--layout", "torchtitan", "--keep-latest-n", "2", "--stale-after", "0s")
    code, events, err = sweep(s3env, url, *args)
    assert code == 0, err
    assert set(_steps(s3, bucket)) == {"step-30", "step-40"}
    assert _writer(s3env, "dcp_load_s3", url, 40)["w"] == [40.0] * 4
