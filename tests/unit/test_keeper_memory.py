"""What a keeper keeps per checkpoint between passes (bench P9K): bounded, and never trusted over
the files it describes (a pin added or a metric rewritten in place reaches the next pass, on the
memoized paths too)."""

from __future__ import annotations

import gc
import json
import os
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers import write_metric_run

from ckptkeeper import InfoCache, scan_root
from ckptkeeper.info import MEMO_TRUST_S
from ckptkeeperd.config import config_from_flags, with_metrics_address
from ckptkeeperd.service import Keeper

STEPS = 50
BIG_BLOCK = 64 * 1024  # one table resized once (e.g. interned names), not per checkpoint


def make_fleet(base: Path, roots: int, steps: int = STEPS) -> list[Path]:
    out = []
    for r in range(roots):
        root = base / f"run-{r:04d}"
        for n in range(1, steps + 1):
            d = root / f"step_{n}"
            d.mkdir(parents=True)
            (d / "training_info.json").write_text(json.dumps({"step": n, "val": n / 7}))
        out.append(root)
    return out


def later_cache() -> InfoCache:
    """Passes that judge the memo as if the steps had been written a minute ago."""
    ahead = int((MEMO_TRUST_S + 60) * 1e9)
    return InfoCache(clock_ns=lambda: time.time_ns() + ahead)


def make_keeper(roots: list[Path], **flags: object) -> Keeper:
    config = config_from_flags([str(r) for r in roots], {"observer": "inotify", **flags})
    keeper = Keeper(with_metrics_address(config, "127.0.0.1:0"))
    keeper.cache = later_cache()
    keeper.refresh_roots()
    return keeper


@pytest.fixture
def keepers() -> Iterator[list[Keeper]]:
    made: list[Keeper] = []
    yield made
    for keeper in made:
        keeper.shutdown()


def retained(roots: list[Path], keepers: list[Keeper]) -> int:
    """Bytes a keeper holds after two passes over ``roots`` (the second from the memo)."""
    gc.collect()
    before = tracemalloc.take_snapshot()
    keeper = make_keeper(roots)
    keepers.append(keeper)
    for _ in range(2):
        for root in roots:
            assert keeper.run_once(root).status == "ok"
    gc.collect()
    after = tracemalloc.take_snapshot()
    grown = after.compare_to(before, "traceback")  # by the line that allocated
    return sum(s.size_diff for s in grown if abs(s.size_diff) < BIG_BLOCK or s.count_diff > 1)


def test_a_keeper_holds_a_bounded_number_of_bytes_per_checkpoint(
    tmp_path: Path, keepers: list[Keeper]
) -> None:
    small = make_fleet(tmp_path / "small", 4)  # 200 checkpoints
    large = make_fleet(tmp_path / "large", 16)  # 800
    tracemalloc.start(1)
    try:
        retained(small[:1], keepers)  # imports, interned names, first-use tables
        a = retained(small, keepers)
        b = retained(large, keepers)
    finally:
        tracemalloc.stop()
    per_checkpoint = (b - a) / (len(large) - len(small)) / STEPS
    # About 250 bytes now (a memo entry: one bytes object and its name); it was about 1,700
    # (parsed metrics dicts twice, path objects, records and the last plan's decisions).
    assert per_checkpoint < 600, f"{per_checkpoint:.0f} bytes per checkpoint"


def test_memoized_records_are_the_records_a_full_scan_makes(tmp_path: Path) -> None:
    root = tmp_path / "run"
    infos = [
        {"step": 1, "val": 0.25, "big": 2**63 - 1, "neg": -(2**63)},  # packed
        {"step": 2, "val": float("inf"), "x": 1e-300},  # packed
        {"step": 3, "flag": True, "name": "a", "n": None},  # kept as parsed
        {"step": 4, "nested": {"a": [1, 2]}, "huge": 2**64},  # kept as parsed
        {},
    ]
    for n, info in enumerate(infos, start=1):
        (root / f"step_{n}").mkdir(parents=True)
        (root / f"step_{n}" / "training_info.json").write_text(json.dumps(info))
    (root / "step_6").mkdir()  # no metrics file
    (root / "step_6" / "KEEP").touch()
    cache = later_cache()
    full = scan_root(root, cache=cache)
    again = scan_root(root, cache=cache, memo=True)
    assert cache.memo_hits == 5 and cache.parses == 5  # step_6 (no metrics) is looked at again
    assert again == full == scan_root(root)
    for mine, theirs in zip(again.steps, full.steps, strict=True):
        assert mine.info is None or [type(v) for v in mine.info.values()] == [
            type(v)
            for v in theirs.info.values()  # type: ignore[union-attr]
        ]
    assert [c.pinned for c in again.steps] == [False] * 5 + [True]
    assert again.steps[5].info_error == full.steps[5].info_error == "no training_info.json"


def _rewrite_in_place(path: Path, info: dict[str, object]) -> None:
    """The same inode and size, a later mtime (a trainer rewriting its metrics)."""
    old = path.stat()
    data = json.dumps(info).encode()
    assert len(data) == old.st_size
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 5_000_000_000))
    assert path.stat().st_ino == old.st_ino


def test_a_metric_rewritten_in_place_reaches_the_keepers_next_pass(
    tmp_path: Path, keepers: list[Keeper]
) -> None:
    root = tmp_path / "run"
    for n, val in ((1, 0.3), (2, 0.2), (3, 0.1)):  # top-2: 1 and 2; latest: 3
        (root / f"step_{n}").mkdir(parents=True)
        (root / f"step_{n}" / "training_info.json").write_text(json.dumps({"val": val}))
    keeper = make_keeper([root], keep_top_k=2, metric_name="val", higher_is_better=True)
    keepers.append(keeper)
    for _ in range(2):  # the second pass is the memoized look, with nothing to do
        report = keeper.run_once(root)
        assert report.outcomes == [] and report.plan is not None and not report.plan.mutates
    hits = keeper.cache.memo_hits
    assert hits >= 3
    _rewrite_in_place(root / "step_2" / "training_info.json", {"val": 0.0})
    report = keeper.run_once(root)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == [
        "step_1",
        "step_3",
    ]
    assert [o.decision.step for o in report.outcomes] == [2]


def test_a_pin_added_reaches_the_keepers_next_memoized_look(
    tmp_path: Path, keepers: list[Keeper]
) -> None:
    root = tmp_path / "run"
    for n in (1, 2):
        (root / f"step_{n}").mkdir(parents=True)
        (root / f"step_{n}" / "training_info.json").write_text(json.dumps({"val": n}))
    keeper = make_keeper([root])  # keeps everything: every pass is the unlocked look only
    keepers.append(keeper)
    for _ in range(2):
        keeper.run_once(root)
    (root / "step_1" / "KEEP").touch()
    hits = keeper.cache.memo_hits
    report = keeper.run_once(root)
    assert keeper.cache.memo_hits == hits + 1  # step_2 from the memo; step_1 changed
    assert report.plan is not None
    reasons = {d.step: d.reasons for d in report.plan.decisions}
    assert any("pinned" in why for why in reasons[1])
    assert not any("pinned" in why for why in reasons[2])


def test_watching_a_root_walks_no_config_yaml_and_its_pass_does(
    tmp_path: Path, keepers: list[Keeper]
) -> None:
    # At 1 M checkpoints the walk over every root's newest steps for a config.yaml, made to
    # watch and schedule the roots before any pass, was most of a keeper's start (bench P9K).
    root = tmp_path / "run"
    write_metric_run(root)
    keeper = make_keeper([root])  # refresh_roots: the root is watched and scheduled
    keepers.append(keeper)
    assert keeper.settings.reads["config.yaml"] == 0
    report = keeper.run_once(root)
    assert keeper.settings.reads["config.yaml"] == 1  # the newest step's, by the pass
    assert report.plan is not None and report.plan.policy.metric_name == "loss"
