"""A cron ``sweep`` and ``status`` load none of the daemon's machinery (issue 9, item 3): the
NeMo-RL manager and PyYAML (no config.yaml needed), prometheus_client (no --metrics-file),
watchdog, apscheduler, the keeper itself. Checked in a fresh interpreter that runs the command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers import write_metric_run

HEAVY = (
    "apscheduler",
    "ckptkeeper.manager",
    "ckptkeeperd.service",
    "ckptkeeperd.watch",
    "prometheus_client",
    "watchdog",
    "yaml",
)

CHILD = """
import json, sys
from ckptkeeperd.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "loaded": sorted(m for m in HEAVY if m in sys.modules)}))
""".replace("HEAVY", repr(HEAVY))


@pytest.mark.parametrize("command", [["sweep"], ["sweep", "--json"], ["status", "--json"]])
def test_sweep_and_status_load_none_of_the_daemons_machinery(
    command: list[str], tmp_path: Path
) -> None:
    root = tmp_path / "run"
    write_metric_run(root)
    flags = ["--keep-top-k", "1", "--metric", "loss", "--lower-is-better", str(root)]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *command, *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    last = proc.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    assert result == {"code": 0, "loaded": []}, proc.stdout + proc.stderr
    if command[0] == "sweep":
        assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == [
            "step_1",
            "step_3",
        ]


LOGGING = ("asyncio", "rich", "structlog")


def test_a_sweep_imports_structlog_only_when_it_logs(tmp_path: Path) -> None:
    """Nothing to report: structlog (with rich and asyncio) is never imported. Something to
    report: it is, configured as asked, and the events are logged as JSON lines."""
    root = tmp_path / "run"
    for n in (1, 2, 3):
        (root / f"step_{n}").mkdir(parents=True)
        (root / f"step_{n}" / "training_info.json").write_text(json.dumps({"loss": n}))
    child = CHILD.replace(repr(HEAVY), repr(LOGGING))
    results = []
    for keep in ("3", "1"):  # keep all (nothing to do), then delete step_2
        flags = ["--keep-top-k", keep, "--metric", "loss", "--lower-is-better", str(root)]
        proc = subprocess.run(
            [sys.executable, "-c", child, "sweep", *flags],
            capture_output=True,
            text=True,
            timeout=60,
        )
        lines = proc.stdout.strip().splitlines()
        results.append((json.loads(lines[-1]), [json.loads(line) for line in lines[:-1]]))
    (quiet, quiet_logs), (acted, acted_logs) = results
    assert quiet == {"code": 0, "loaded": []} and quiet_logs == []
    assert acted == {"code": 0, "loaded": list(LOGGING)}
    assert [(e["event"], e["step"], e["level"]) for e in acted_logs] == [("deleted", 2, "info")]
