"""The P2-scale and P9 benchmarks (``--only P2S,P9``) in quick mode: they run, exit 0 and report
every row; the call counts are per checkpoint of a pass that saw every checkpoint. No figure is
asserted (benchmarks report; they do not pass or fail)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import p3_pass, p9_cost, p9_keeper  # noqa: E402
from tests.unit.test_bench_quick import run_quick  # noqa: E402


def test_p2_scale_and_p7_quick_report_every_row(tmp_path: Path) -> None:
    proc, data = run_quick("P2S,P9", tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    modules = data.get("modules", [])
    assert [m["status"] for m in modules] == ["ok", "ok"], modules
    reported = [row["id"] for m in modules for row in m["rows"]]
    wanted = ["P2-scale-pause", "P2-scale-nopause", "P3-cold"]
    wanted += ["P3-ops"] if shutil.which("strace") else []
    assert sorted(wanted) == sorted(reported)


def test_the_keeper_at_scale_quick_reports_both_sizes(tmp_path: Path) -> None:
    proc, data = run_quick("P9K", tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    [module] = data.get("modules", [])
    assert module["status"] == "ok", module
    assert [row["id"] for row in module["rows"]] == ["P9K-100", "P9K-200"]


def test_a_keeper_bench_tree_is_built_once(tmp_path: Path) -> None:
    roots, _, built = p9_keeper.build_tree(3, 4, store=tmp_path)
    assert (
        built
        and [sorted(p.name for p in r.iterdir()) for r in roots]
        == [["step_1", "step_2", "step_3", "step_4"]] * 3
    )
    again, _, rebuilt = p9_keeper.build_tree(3, 4, store=tmp_path)
    assert again == roots and not rebuilt


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_call_counts_are_per_checkpoint_of_passes_that_saw_them(tmp_path: Path) -> None:
    roots = p3_pass.make_fleet(tmp_path / "fleet", 3, steps=5)
    counts = p9_cost.count_calls(roots)
    assert counts["steps"] == 15
    # Every checkpoint costs each side at least its training_info.json's open and read.
    assert float(counts["ours"]) >= 2 and float(counts["naive"]) >= 2  # type: ignore[arg-type]
