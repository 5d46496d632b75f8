"""The status page in a real headless Chromium: ``ckptkeeper status --html FILE`` on a real root,
loaded by Debian's ``chromium`` (installed by .ci/run when missing; skipped, naming the reason,
where it is not there or cannot start). The DOM the browser built is checked for the rows and
markers and for the absence of anything executable; a screenshot is checked for the chart's and
the rows' colours.

How long rendering takes is a benchmark figure (``python -m bench --only P6``), not asserted here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from tests.chromium import find_chromium, run_chromium
from tests.helpers import CKPTKEEPER

from ckptkeeperd.chart import COLOURS
from ckptkeeperd.page import ROW_COLOURS

Image = pytest.importorskip(
    "PIL.Image", reason="Pillow is in the test extra: pip install -e .[test]"
)

HOSTILE_METRIC = 'val<script>alert(1)</script>"&]]>'


def browse(page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    proc = run_chromium(exe, page, *args)
    if proc.returncode != 0:
        empty = page.with_name("empty.html")
        empty.write_text("<!DOCTYPE html><html><body></body></html>")
        probe = run_chromium(exe, empty, "--dump-dom")
        if probe.returncode != 0:  # the browser itself cannot start here: not the page's fault
            pytest.skip(f"chromium cannot run here ({probe.returncode}): {probe.stderr[-300:]}")
        raise AssertionError(f"chromium failed on the page: {proc.returncode} {proc.stderr[-500:]}")
    return proc


def write_root(root: Path, steps: int, *, hostile: bool = True) -> None:
    """Finalized steps with a metric (and a hostile metric name), a pinned one, one in flight."""
    metric = HOSTILE_METRIC if hostile else "val_reward"
    for step in range(1, steps + 1):
        d = root / f"step_{step}"
        d.mkdir(parents=True)
        value = round(0.3 + 0.5 * step / steps + (0.15 if step % 3 == 0 else 0.0), 4)
        (d / "training_info.json").write_text(json.dumps({"step": step, metric: value}))
    (root / "step_2" / "KEEP").touch()
    (root / "step_5" / "training_info.json").write_text('{"step": 5}')  # unranked
    tmp = root / f"tmp_step_{steps + 1}"  # no marker yet: in flight
    tmp.mkdir()
    (tmp / "weights.bin").write_bytes(b"\0" * 100)


def status_html(root: Path, out: Path, metric: str) -> None:
    proc = subprocess.run(
        [
            *(CKPTKEEPER, "status", str(root), "--keep-top-k", "3", "--metric", metric),
            *("--higher-is-better", "--html", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # the page goes to the file, not the terminal


def hex_rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def colour_counts(png: Path) -> Counter[tuple[int, int, int]]:
    with Image.open(png) as img:
        raw = img.convert("RGB").tobytes()
    return Counter(zip(raw[0::3], raw[1::3], raw[2::3], strict=True))


def test_the_page_in_chromium_shows_the_chart_and_the_rows(tmp_path: Path) -> None:
    root = tmp_path / 'run&<b>"x"'
    write_root(root, 24)
    page = tmp_path / "status.html"
    status_html(root, page, HOSTILE_METRIC)

    dom = browse(page, "--dump-dom").stdout
    assert "<script" not in dom  # the hostile name stayed text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    rows = re.findall(r'<tr class="a-(\w+)', dom)
    assert len(rows) == 25  # 24 steps and the save in flight
    assert Counter(rows) == {"keep": 4, "delete": 20, "wait": 1}  # 24 (latest), 21, 18; 2 pinned
    assert dom.count("<title>") >= 25  # a tooltip per marker (and the legend's)

    shot = tmp_path / "shot.png"
    browse(page, f"--screenshot={shot}", "--window-size=1200,2000")
    seen = colour_counts(shot)
    for what in ("kept", "deleted", "pinned", "in-flight", "threshold"):
        assert seen[hex_rgb(COLOURS[what])] >= 4, f"no {what} marker in the screenshot"
    for action in ("keep", "delete", "wait"):  # the rows' backgrounds, each over many pixels
        colour = ROW_COLOURS[next(a for a in ROW_COLOURS if a.value == action)]
        assert seen[hex_rgb(colour)] >= 2000, f"no {action} row in the screenshot"


def test_a_thousand_checkpoints_in_chromium(tmp_path: Path) -> None:
    root = tmp_path / "big"
    write_root(root, 1000, hostile=False)
    page = tmp_path / "status.html"
    status_html(root, page, "val_reward")
    assert os.path.getsize(page) < 2_000_000
    dom = browse(page, "--dump-dom").stdout
    assert len(re.findall(r'<tr class="a-', dom)) == 1001
    svg = dom[dom.index("<svg") : dom.index("</svg>")]
    assert svg.count("<title>") == 1001 + 4  # every checkpoint and the save, plus the legend
