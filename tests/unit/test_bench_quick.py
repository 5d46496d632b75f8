"""`python -m bench --quick` keeps working: it runs, exits 0 and reports every row.

No figure is asserted (benchmarks report; they do not pass or fail). To cover another benchmark
module, add its ids and the row ids it must report to ``QUICK_RUNS``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.__main__ import ModuleResult, write_markdown  # noqa: E402
from bench.common import Row  # noqa: E402

#: ids passed to ``--only`` -> row ids the run must report.
QUICK_RUNS: dict[str, tuple[str, ...]] = {
    "P1,P2,P5": (
        "P1",
        "P2-inotify",
        "P2-polling",
        "P5-cpu",
        "P5-rss",
        "P5-watches",
        "P5-metrics",
    ),
    "P6": ("P6-render", "P6-browser", "P6-size"),
    "P7": tuple(
        f"P7-{layout}"
        for layout in (
            "nemo-rl",
            "hf-trainer",
            "torchtitan",
            "orbax",
            "megatron",
            "deepspeed",
            "lightning",
        )
    ),
    "P8": ("P8a", "P8b"),
}


def run_quick(only: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Any]:
    """``python -m bench --quick --only ONLY`` in a subprocess, files under ``tmp_path``."""
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    cmd = [sys.executable, "-m", "bench", "--quick", "--only", only]
    cmd += ["--workdir", str(tmp_path / "work"), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    data = json.loads(out.read_text()) if out.exists() else {}
    return proc, data


@pytest.mark.parametrize("only", sorted(QUICK_RUNS))
def test_bench_quick_runs_and_reports_every_row(only: str, tmp_path: Path) -> None:
    proc, data = run_quick(only, tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    modules = data.get("modules", [])
    assert [m["status"] for m in modules] == ["ok"] * len(only.split(",")), modules
    reported = [row["id"] for m in modules for row in m["rows"]]
    for row_id in QUICK_RUNS[only]:
        assert row_id in reported
        assert row_id in proc.stdout
    for m in modules:  # every row is filled in (the figures themselves are not judged)
        for row in m["rows"]:
            assert all(row[k] for k in ("what", "ours", "goal")), row
    assert not any((tmp_path / "work").iterdir())  # nothing left behind


def _result(mid: str, ours: str, command: str) -> ModuleResult:
    row = Row(mid, "what", ours, "base", "2x", "goal", False, ["a note | with a pipe"])
    return ModuleResult(mid, "ok", [row], command=command, date="d", machine="m", load="0")


def test_write_keeps_other_modules_and_the_analysis(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    write_markdown([_result("P1", "1 ms", "cmd-a"), _result("P5", "5 MB", "cmd-a")], md)
    text = md.read_text().replace("(Hand-written", "Our analysis -- kept. (Hand-written")
    md.write_text(text)
    write_markdown([_result("P1", "2 ms", "cmd-b")], md)
    text = md.read_text()
    assert "| P1 | what | 2 ms |" in text and "1 ms" not in text.split("<!-- bench-data")[0]
    assert "| P5 | what | 5 MB |" in text
    assert "`cmd-a`" in text and "`cmd-b`" in text
    assert "Our analysis -- kept." in text
    assert "a note \\| with a pipe" not in text  # notes are list items, not table cells
    assert "- a note | with a pipe" in text
