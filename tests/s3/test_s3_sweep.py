"""`ckptkeeper sweep s3://...` as a real process against moto on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.s3.helpers import keys_under, put_checkpoint, sweep
from tests.s3server import S3Endpoint


def test_sweep_prunes_an_s3_root_by_policy(
    endpoint: S3Endpoint, s3env: dict[str, str], bucket: str, s3: Any
) -> None:
    manifests = {
        step: put_checkpoint(s3, bucket, "runs/a", step, {"val_reward": r})
        for step, r in [(1, 0.9), (2, 0.1), (3, 0.5), (4, 0.2)]
    }
    code, events, err = sweep(
        s3env, f"s3://{bucket}/runs/a", "--keep-top-k", "1", "--metric", "val_reward",
        "--higher-is-better",
    )  # fmt: skip
    assert code == 0, err
    left = keys_under(s3, bucket, "runs/a/")
    # top-1 by val_reward (step 1) and the latest (step 4) are kept, whole
    assert set(manifests[1]) | set(manifests[4]) <= left
    assert not (set(manifests[2]) | set(manifests[3])) & left
    assert not {k for k in left if "/.ckptkeeper/tombstones/" in k}  # finished
    deleted = sorted(e["step"] for e in events if e["event"] == "deleted")
    assert deleted == [2, 3]
    assert all(e["bytes"] > 0 for e in events if e["event"] == "deleted")


def test_config_roots_and_discover_glob_over_prefixes(
    endpoint: S3Endpoint, s3env: dict[str, str], bucket: str, s3: Any, tmp_path: Path
) -> None:
    for run in ("runs/a", "runs/b", "runs/a/step_1/nested", "other/c", "runs/empty-x"):
        for step in (1, 2):
            put_checkpoint(s3, bucket, run, step, {"loss": 1.0}) if "empty" not in run else None
    s3.put_object(Bucket=bucket, Key="runs/empty-x/readme.txt", Body=b"no checkpoints")
    config = tmp_path / "ckptkeeper.toml"
    config.write_text(
        f'[defaults]\nkeep_latest_n = 1\n[[root]]\npath = "s3://{bucket}/other/c"\n'
        f'[[discover]]\nglob = "s3://{bucket}/runs/*"\n'
    )
    code, events, err = sweep(s3env, "--config", str(config))
    assert code == 0, err
    roots = sorted({e["root"] for e in events if e["event"] == "deleted"})
    assert roots == [f"s3:/{bucket}/other/c", f"s3:/{bucket}/runs/a", f"s3:/{bucket}/runs/b"]
    assert "runs/empty-x/readme.txt" in keys_under(s3, bucket, "runs/empty-x/")
