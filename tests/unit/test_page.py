"""The status page as a pure function (`ckptkeeperd.page.render_page`) and the daemon's entry point
(`page_for`). The browser checks (a real headless Chromium) are in tests/integration."""

from __future__ import annotations

import html.parser
import re
from pathlib import Path

from ckptkeeper import FreeSpace, Policy, plan
from ckptkeeper.records import Anomaly, Checkpoint, InFlight, RootScan
from ckptkeeperd.chart import COLOURS, points_of, topk_threshold
from ckptkeeperd.config import config_from_flags
from ckptkeeperd.page import page_for, render_page, write_page
from ckptkeeperd.reconcile import Report
from ckptkeeperd.service import Keeper

HOSTILE = 'val<script>alert(1)</script>"&]]>'
ROOT = Path('/ckpt/run&<b>"x"</b>')
NOW = 1_700_000_000.0


class Elements(html.parser.HTMLParser):
    """Every start tag with its attributes, and all text, as a browser's parser sees them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> Elements:
    p = Elements()
    p.feed(page)
    p.close()
    return p


def ck(step: int, value: object, *, pinned: bool = False) -> Checkpoint:
    info = {"step": step} if value is None else {"step": step, HOSTILE: value}
    return Checkpoint(step, ROOT / f"step_{step}", info, None, pinned, (1, step))


def report_for(scan: RootScan, policy: Policy, free: FreeSpace | None = None) -> Report:
    return Report(scan.root, plan=plan(scan, policy, NOW, free), scan=scan)


def sample() -> tuple[Report, Policy]:
    steps = [ck(s, s / 10) for s in range(1, 9)] + [ck(9, None), ck(10, 0.05, pinned=True)]
    saving = InFlight(11, ROOT / "tmp_step_11", False, newest_mtime=NOW - 5)
    odd = Anomaly(ROOT / "step_<img src=x onerror=alert(1)>", "not a checkpoint name <i>")
    scan = RootScan(ROOT, tuple(steps), (saving,), anomalies=(odd,))
    policy = Policy(keep_top_k=3, metric_name=HOSTILE, higher_is_better=True, min_free="10%")
    return report_for(scan, policy, FreeSpace(50, 100)), policy


def test_every_name_is_escaped_and_nothing_runs() -> None:
    report, policy = sample()
    page = render_page([(report, policy)], generated_at=NOW)
    parsed = parse(page)
    tags = {t for t, _ in parsed.tags}
    assert "script" not in tags and "img" not in tags and "b" not in tags and "i" not in tags
    assert not any(k.startswith("on") for _, attrs in parsed.tags for k in attrs)
    links = [v or "" for _, a in parsed.tags for k, v in a.items() if k in ("src", "href")]
    assert all(v.startswith("#") for v in links)  # no external asset, only in-page anchors
    text = "".join(parsed.text)
    assert HOSTILE in text  # shown as text, exactly
    assert str(ROOT) in text
    assert "step_<img src=x onerror=alert(1)>" in text
    assert "top-3 by " + HOSTILE + "=0.8" in text  # a reason naming the metric
    assert "<script>" not in page and "]]>" not in page


def test_rows_and_markers_match_the_plan() -> None:
    report, policy = sample()
    assert report.plan is not None
    page = render_page([(report, policy)], generated_at=NOW)
    rows = re.findall(r'<tr class="a-(\w+)', page)
    assert len(rows) == len(report.plan.decisions)
    assert rows.count("delete") == len(report.plan.deleted_steps) == 6  # 1-5; 9 (unranked)
    states = {p.step: p.state for p in points_of(report.plan)}
    assert states[10] == "pinned" and states[11] == "in-flight"
    assert states[8] == "kept" and states[1] == "deleted"
    values = {p.step: p.value for p in points_of(report.plan)}
    assert values[9] is None and values[11] is None  # drawn on the "no metric" strip
    assert topk_threshold(report.plan, policy) == 0.6  # 0.8, 0.7, 0.6: the 3rd best
    assert f'stroke="{COLOURS["threshold"]}"' in page
    for state in ("kept", "deleted", "pinned", "in-flight"):
        assert COLOURS[state] in page


def test_a_thousand_checkpoints() -> None:
    steps = [ck(s, (s * 7919 % 1000) / 1000) for s in range(1, 1001)]
    policy = Policy(keep_top_k=5, metric_name=HOSTILE, keep_every_n_steps=250)
    report = report_for(RootScan(ROOT, tuple(steps)), policy)
    page = render_page([(report, policy)])
    assert len(re.findall(r'<tr class="a-', page)) == 1000
    svg = page[page.index("<svg") : page.index("</svg>")]
    assert svg.count("<title>") == 1000 + 4  # one per checkpoint, plus the legend's four
    kept = len(re.findall(r'<tr class="a-keep', page))
    assert kept == len(report.plan.kept_steps) >= 5  # type: ignore[union-attr]


def test_a_root_that_cannot_be_read_is_shown_with_its_problem() -> None:
    report = Report(Path("/gone<x>"), status="error", problems=["root does not exist <x>"])
    parsed = parse(render_page([(report, Policy())]))
    assert "root does not exist <x>" in "".join(parsed.text)
    assert "x" not in {t for t, _ in parsed.tags}


def test_write_page_replaces_the_file_whole(tmp_path: Path) -> None:
    report, policy = sample()
    out = tmp_path / "status.html"
    out.write_text("old")
    write_page(out, [(report, policy)])
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["status.html"]


def test_page_for_a_keeper_previews_every_root_without_acting(tmp_path: Path) -> None:
    roots = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for root in roots:
        for step in (1, 2, 3, 4):
            d = root / f"step_{step}"
            d.mkdir(parents=True)
            (d / "training_info.json").write_text(f'{{"loss": {step}}}')
    (roots[1] / "ckptkeeper.toml").write_text("keep_top_k = 2\n")  # its own policy
    (roots[2] / "ckptkeeper.toml").write_text("keep_topk = 2\n")  # a typo: deletions paused
    config = config_from_flags([str(r) for r in roots], {"keep_top_k": 1, "metric_name": "loss"})
    keeper = Keeper(config)
    try:
        keeper.start()  # the first pass acts: a keeps 1 (best) and 4 (latest), b keeps 1, 2, 4
        assert keeper.wait_idle(30.0)  # READY does not wait for the first pass
        (roots[1] / "ckptkeeper.toml").write_text("keep_top_k = 1\n")  # edited since
        before = sorted(str(p) for r in roots for p in r.rglob("*"))
        page = page_for(keeper).decode("utf-8")
        assert sorted(str(p) for r in roots for p in r.rglob("*")) == before  # read only
    finally:
        keeper.shutdown()
    sections = page.split('<section class="root"')[1:]
    assert [re.search(r"<h2>(.*?)</h2>", s)[1] for s in sections] == [str(r) for r in roots]  # type: ignore[index]
    # b as its edited file says now: step 2 would go; c keeps everything and says why
    assert [len(re.findall(r'<tr class="a-keep', s)) for s in sections] == [2, 2, 4]
    assert "outside top-1 by loss=2" in sections[1]
    assert "keep_topk: unknown key" in sections[2] and "paused" in sections[2]
