"""The P3 (full pass) and P4 (delete) benchmarks in quick mode: the rows come back, the passes
see every checkpoint and delete nothing, and every contender really removes its tree.

No timing is asserted: these only check that the benchmarks measure what they say they measure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bench import p3_pass, p4_delete
from bench.common import Row


def _count_files(path: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def _check_rows(rows: list[Row], ids: list[str]) -> None:
    assert [r.id for r in rows] == ids
    for row in rows:
        assert isinstance(row, Row)
        assert row.what and row.ours and row.baseline and row.ratio and row.goal
        assert row.met in (True, False, None)
        assert all(isinstance(note, str) for note in row.notes)


# -- P3 -------------------------------------------------------------------------------------


def test_p3_layout_and_both_passes_are_no_ops(tmp_path: Path) -> None:
    roots = p3_pass.make_fleet(tmp_path / "fleet", 3, steps=5)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("step_*"))
    assert len(before) == 15
    for step_dir in (tmp_path / "fleet").glob("*/step_*"):
        names = {p.name for p in step_dir.iterdir()}
        assert {"training_info.json", "config.yaml", ".complete"} <= names

    ours = p3_pass.OursPass(roots)
    assert ours() == 15  # cold: every checkpoint seen, each training_info.json parsed once
    assert ours.cache.parses == 15
    assert ours() == 15  # warm: nothing parsed again
    assert ours.cache.parses == 15
    assert p3_pass.naive_pass(roots) == 15

    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("step_*"))
    assert after == before  # keep_top_k=20 over 5 steps: nothing deleted, nothing renamed
    assert not list(tmp_path.rglob("trash/*"))


def test_p3_quick_rows(tmp_path: Path) -> None:
    rows = p3_pass.run(quick=True, base_dir=str(tmp_path))
    _check_rows(rows, ["P3", "P3-cold", "P3-linear", "P3-rss"])
    assert rows[0].met is not None and rows[2].met is not None
    assert list(tmp_path.iterdir()) == []  # the fleet was cleaned up


# -- P4 -------------------------------------------------------------------------------------


def test_p4_tree_shape(tmp_path: Path) -> None:
    shape = p4_delete.Shape(files=103, dirs=10)
    p4_delete.make_tree(tmp_path / "t", shape)
    assert _count_files(tmp_path / "t") == 103
    assert len(list((tmp_path / "t").iterdir())) == 10


@pytest.mark.parametrize("name", ["rm -rf", "shutil.rmtree", "remove_tree w=1", "remove_tree w=4"])
def test_p4_contender_removes_the_whole_tree(tmp_path: Path, name: str) -> None:
    shape = p4_delete.Shape(files=120, dirs=6)
    tree = tmp_path / "tree"
    p4_delete.make_tree(tree, shape)
    beside = tmp_path / "beside"
    beside.write_text("not part of the tree")
    p4_delete.contenders((1, 4), shape)[name](tree)
    assert not os.path.lexists(tree)
    assert beside.read_text() == "not part of the tree"


def test_p4_quick_rows_and_trees_removed(tmp_path: Path) -> None:
    rows = p4_delete.run(quick=True, base_dir=str(tmp_path))
    _check_rows(rows, ["P4", "P4-w1", "P4b"])
    assert rows[0].met is not None
    fuse_row = rows[2]
    if fuse_row.ours == "skipped":
        assert fuse_row.met is None and "FUSE unavailable" in fuse_row.notes[0]
    else:
        assert fuse_row.met is not None
    assert list(tmp_path.iterdir()) == []  # every tree deleted, work directories cleaned up
