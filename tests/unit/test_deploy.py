"""The example manifests under deploy/ parse and set what the keeper relies on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ckptkeeperd.shard import parse_shard

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _docs(name: str) -> dict[str, dict[str, Any]]:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()))
    return {d["kind"]: d for d in docs if d}


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env", [])}


def test_statefulset_gives_each_keeper_its_shard_from_the_pod_ordinal() -> None:
    docs = _docs("keepers-statefulset.yaml")
    sts = docs["StatefulSet"]
    replicas = sts["spec"]["replicas"]
    [container] = sts["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[0] == "run"
    shard = args[args.index("--shard") + 1]
    env = _env(container)
    assert shard == "$(POD_INDEX)/$(SHARD_COUNT)"
    assert env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['apps.kubernetes.io/pod-index']"
    )
    assert int(env["SHARD_COUNT"]["value"]) == replicas
    for ordinal in range(replicas):  # what Kubernetes expands $(VAR) to is a valid shard
        parse_shard(shard.replace("$(POD_INDEX)", str(ordinal)).replace("$(SHARD_COUNT)", "4"))
    config_path = args[args.index("--config") + 1]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[str(Path(config_path).parent)] == "config"
    cm = docs["ConfigMap"]
    assert Path(config_path).name in cm["data"]
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 10


def test_config_in_the_configmap_is_valid(tmp_path: Path) -> None:
    from ckptkeeperd.config import load_config

    text = _docs("keepers-statefulset.yaml")["ConfigMap"]["data"]["ckptkeeper.toml"]
    (tmp_path / "ckptkeeper.toml").write_text(text)
    config = load_config(tmp_path / "ckptkeeper.toml")
    assert config.discovers and config.daemon.shard is None  # the shard comes from --shard


def test_cronjob_sweeps_without_overlap() -> None:
    job = _docs("sweep-cronjob.yaml")["CronJob"]
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(job["spec"]["schedule"].split()) == 5
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    [container] = pod["containers"]
    assert container["args"][0] == "sweep" and "--config" in container["args"]


def test_slurm_array_passes_its_task_as_the_shard() -> None:
    text = (DEPLOY / "slurm" / "ckptkeeper-sweep.sbatch").read_text()
    assert re.search(r"--shard \"\$\{SLURM_ARRAY_TASK_ID\}/\$\{SLURM_ARRAY_TASK_COUNT\}\"", text)
