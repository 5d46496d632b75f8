"""With the real tools: Debian's ``prometheus`` scrapes the live daemon and answers a query for
``ckptkeeper_checkpoints``; ``promtool`` checks and unit-tests deploy/alerts.yml; the Grafana
dashboard's queries are valid PromQL naming only metrics we export. ``.ci/run`` installs the
``prometheus`` package when missing; without it these tests skip, naming it."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from tests.helpers import Daemon, wait_until, write_checkpoint

from ckptkeeper import Policy
from ckptkeeperd.metrics import KeeperMetrics
from ckptkeeperd.reconcile import reconcile

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "deploy" / "alerts.yml"
ALERTS_TEST = Path(__file__).parent / "prometheus" / "alerts_test.yml"
DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"
NAME = re.compile(r"\bckptkeeper_[a-z_]+\b")
MISSING = "Debian's prometheus package is not installed (.ci/run installs it): no {}"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(MISSING.format(name))
    return path


def exported_names(tmp_path: Path) -> set[str]:
    """Every sample name a keeper exports after a real pass (histograms' series included)."""
    root = tmp_path / "names"
    write_checkpoint(root, 1, {"r": 1.0})
    metrics = KeeperMetrics()
    policy = Policy(keep_top_k=1)
    metrics.observe_pass(
        reconcile(root, policy, on_outcome=metrics.finalize_hook(root, ".complete"))
    )
    text = generate_latest(metrics.registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    queries += [v["definition"] for v in doc["templating"]["list"] if v.get("type") == "query"]
    return queries


def alert_queries() -> list[str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def test_dashboard_and_alerts_name_only_exported_metrics(tmp_path: Path) -> None:
    exported = exported_names(tmp_path)
    doc = json.loads(DASHBOARD.read_text())
    assert doc["panels"] and all(p.get("targets") for p in doc["panels"])
    for query in [*dashboard_queries(), *alert_queries()]:
        names = set(NAME.findall(query))
        assert names, f"names no ckptkeeper metric: {query}"
        assert names <= exported, f"{query}: {sorted(names - exported)} not exported"
    # And the other way round: every family we export has a place on the dashboard.
    on_dashboard = {n for q in dashboard_queries() for n in NAME.findall(q)}
    families = {re.sub(r"_(bucket|count|sum)$", "", n) for n in exported}
    shown = {re.sub(r"_(bucket|count|sum)$", "", n) for n in on_dashboard}
    assert families <= shown, f"not on the dashboard: {sorted(families - shown)}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": q.replace("$root", ".*")}
                    for i, q in enumerate(dashboard_queries())
                    if not q.startswith("label_values(")  # Grafana's own function
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    promtool = _tool("promtool")
    proc = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 5 rules found" in proc.stdout
    proc = subprocess.run(
        [promtool, "test", "rules", str(ALERTS_TEST)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (http://127.0.0.1)
        return json.loads(resp.read())


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(its config file, its base URL) for a Prometheus the test writes the config of."""
    binary = _tool("prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text("scrape_configs: []\n")
    base = f"127.0.0.1:{_free_port()}"
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={base}",
            "--web.enable-lifecycle",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield config, f"http://{base}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:  # noqa: S310
            return bool(resp.status == 200)
    except OSError:
        return False


def test_prometheus_scrapes_the_daemon_and_answers_a_query(
    tmp_path: Path, daemons: list[Daemon], prometheus: tuple[Path, str]
) -> None:
    config, url = prometheus
    root = tmp_path / "run"
    for step, r in ((1, 0.5), (2, 0.9), (3, 0.1)):
        write_checkpoint(root, step, {"r": r})
    d = Daemon([str(root), "--keep-top-k", "1", "--metric", "r", "--higher-is-better"])
    daemons.append(d)
    d.wait_ready()
    address = d.wait_for("metrics_serving")[0]["address"]
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [
                    {"job_name": "ckptkeeper", "static_configs": [{"targets": [address]}]}
                ],
            }
        )
    )
    wait_until(lambda: _ready(url), timeout=60, interval=0.2, what="prometheus ready")
    reload = urllib.request.Request(f"{url}/-/reload", method="POST")  # noqa: S310
    urllib.request.urlopen(reload, timeout=10).close()  # noqa: S310
    query = urllib.parse.quote(f'ckptkeeper_checkpoints{{state="kept",root="{root}"}}')

    def kept() -> list[Any]:
        doc = _get(f"{url}/api/v1/query?query={query}")
        return list(doc["data"]["result"]) if doc.get("status") == "success" else []

    result = wait_until(kept, timeout=60, interval=0.5, what="a scrape holding the series")
    assert len(result) == 1
    series = result[0]
    assert series["metric"]["job"] == "ckptkeeper" and series["metric"]["instance"] == address
    assert float(series["value"][1]) == 2  # the best (step 2) and the latest (step 3)
    up = _get(f"{url}/api/v1/query?query=up")["data"]["result"]
    assert [float(s["value"][1]) for s in up] == [1.0]
    assert d.stop() == 0
