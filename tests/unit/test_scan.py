"""scan_root, training_info.json, InfoCache, writer locks and stale probing, on real dirs."""

from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ckptkeeper import inforead as info_mod  # the reading half of info (MAX_INFO_BYTES)
from ckptkeeper import scan as scan_mod
from ckptkeeper.effects import writer_lock
from ckptkeeper.scan import (
    InfoCache,
    newest_mtime,
    parse_trash_name,
    read_training_info,
    scan_root,
    trash_dir,
    writer_lock_held,
)


def make_dir(path: Path, info: object | None = None, *files: str) -> Path:
    path.mkdir(parents=True)
    if info is not None:
        (path / "training_info.json").write_text(json.dumps(info))
    for name in files:
        f = path / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(name)
    return path


def identity(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return (st.st_dev, st.st_ino)


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    out: dict[str, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def set_tree_mtime(top: Path, when: float) -> None:
    for dirpath, _dirnames, filenames in os.walk(top, topdown=False):
        for name in filenames:
            os.utime(Path(dirpath) / name, (when, when), follow_symlinks=False)
        os.utime(dirpath, (when, when))


def newest_ctime(top: Path) -> float:
    """The newest ctime in a tree (symlinks not followed)."""
    times = [os.lstat(top).st_ctime]
    for dirpath, dirnames, filenames in os.walk(top):
        times += [os.lstat(Path(dirpath) / n).st_ctime for n in dirnames + filenames]
    return max(times)


def test_scan_returns_records_for_every_kind_of_entry(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    make_dir(root / "step_1", {"step": 1, "val": 0.5}, "config.yaml", "policy/w.pt")
    make_dir(root / "step_10", None, "weights.pt")
    make_dir(root / "tmp_step_11", {"step": 11}, ".complete")
    make_dir(root / "tmp_step_12", None, "partial.pt")
    make_dir(root / "old_step_1", {"step": 1, "val": 0.1}, "KEEP")
    for ignored in ("step_1-hf", "notes", "step_x", ".hidden", "ckptkeeper.toml"):
        make_dir(root / ignored, {"step": 99})
    trash = trash_dir(root)
    make_dir(trash / "1700000000123456789-step_3", {"step": 3})
    make_dir(trash / "unnamed", None)

    scan = scan_root(root)

    assert scan.root == root
    assert [c.step for c in scan.steps] == [1, 10]
    s1, s10 = scan.steps
    assert (s1.path, s1.info, s1.info_error) == (root / "step_1", {"step": 1, "val": 0.5}, None)
    # config.yaml is not probed: nothing decides by it (the settings resolver reads it itself)
    assert (s1.pinned, s1.config_yaml, s1.identity) == (False, None, identity(root / "step_1"))
    assert (s10.path, s10.info, s10.info_error) == (root / "step_10", None, "no training_info.json")
    assert (s10.config_yaml, s10.identity) == (None, identity(root / "step_10"))

    assert [(t.step, t.complete) for t in scan.in_flight] == [(11, True), (12, False)]
    t11, t12 = scan.in_flight
    assert (t11.path, t11.info, t11.identity) == (
        root / "tmp_step_11",
        {"step": 11},
        identity(t11.path),
    )
    assert (t12.info, t12.info_error) == (None, "no training_info.json")
    # Not probed without stale_before.
    assert (t12.writer_locked, t12.newest_mtime) == (None, None)

    (o1,) = scan.leftovers
    assert (o1.step, o1.path, o1.pinned) == (1, root / "old_step_1", True)
    assert o1.info == {"step": 1, "val": 0.1}
    assert o1.identity == identity(o1.path)

    assert [t.path.name for t in scan.trash] == ["1700000000123456789-step_3", "unnamed"]
    assert scan.trash[0].trashed_at == pytest.approx(1700000000.123456789)
    assert scan.trash[1].trashed_at == pytest.approx(os.lstat(trash / "unnamed").st_ctime)

    assert scan.anomalies == ()
    assert scan.ambiguous_steps == frozenset()


def test_scan_only_reads(tmp_path: Path) -> None:
    root = tmp_path / "run"
    make_dir(root / "step_1", {"step": 1}, "a")
    make_dir(root / "tmp_step_2", None, "b")
    set_tree_mtime(root / "tmp_step_2", time.time() - 10**6)
    make_dir(root / "old_step_1", None)
    before = snapshot(root)
    scan_root(root, cache=InfoCache(), stale_before=time.time() - 60)
    assert snapshot(root) == before
    assert not (root / ".ckptkeeper").exists()


def test_scan_of_a_missing_root_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        scan_root(tmp_path / "nope")


def test_symlinks_and_files_with_checkpoint_names_are_anomalies_never_followed(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    outside = make_dir(tmp_path / "outside", {"step": 4, "val": 1.0}, ".complete", "KEEP")
    make_dir(root / "step_1", {"step": 1})
    (root / "step_4").symlink_to(outside)
    (root / "tmp_step_5").symlink_to(outside)
    (root / "old_step_6").symlink_to(outside)
    (root / "step_8").symlink_to(tmp_path / "dangling")
    (root / "step_3").write_text("not a directory")
    os.mkfifo(root / "tmp_step_9")
    cache = InfoCache()

    scan = scan_root(root, cache=cache, stale_before=time.time())

    assert [c.step for c in scan.steps] == [1]
    assert scan.in_flight == () and scan.leftovers == ()
    reasons = {a.path.name: (a.step, a.reason) for a in scan.anomalies}
    assert reasons == {
        "step_4": (4, "symlink: not followed"),
        "tmp_step_5": (5, "symlink: not followed"),
        "old_step_6": (6, "symlink: not followed"),
        "step_8": (8, "symlink: not followed"),
        "step_3": (3, "not a directory"),
        "tmp_step_9": (9, "not a directory"),
    }
    assert cache.parses == 1  # only step_1's info was read: the link target's never


def test_two_names_for_one_step_are_both_ambiguous(tmp_path: Path) -> None:
    root = tmp_path / "run"
    make_dir(root / "step_7", {"step": 7})
    make_dir(root / "step_07", {"step": 7})
    make_dir(root / "step_8", {"step": 8})
    make_dir(root / "tmp_step_9")
    make_dir(root / "tmp_step_009")

    scan = scan_root(root)

    assert [c.step for c in scan.steps] == [8]
    assert scan.in_flight == ()
    assert scan.ambiguous_steps == {7, 9}
    by_name = {a.path.name: a for a in scan.anomalies}
    assert set(by_name) == {"step_7", "step_07", "tmp_step_9", "tmp_step_009"}
    for name in ("step_7", "step_07"):
        assert by_name[name].step == 7
        assert by_name[name].reason.startswith("ambiguous")
        assert "step_07 and step_7" in by_name[name].reason


def test_non_canonical_name_alone_is_a_step(tmp_path: Path) -> None:
    root = tmp_path / "run"
    make_dir(root / "step_007", {"step": 7})
    scan = scan_root(root)
    assert [(c.step, c.path.name) for c in scan.steps] == [(7, "step_007")]
    assert scan.anomalies == ()


# -- training_info.json --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(b"{not json", "training_info.json is not valid JSON", id="corrupt"),
        pytest.param(b"", "training_info.json is not valid JSON", id="empty"),
        pytest.param(b'{"step": 1', "training_info.json is not valid JSON", id="truncated"),
        pytest.param(b"\xff\xfe\x00garbage", "training_info.json is not valid JSON", id="binary"),
        pytest.param(b"[" * 200_000, "training_info.json is not valid JSON", id="deeply_nested"),
        pytest.param(b"[1, 2]", "training_info.json is not a JSON object (list)", id="list"),
        pytest.param(b'"text"', "training_info.json is not a JSON object (str)", id="string"),
        pytest.param(b"3.5", "training_info.json is not a JSON object (float)", id="number"),
        pytest.param(b"null", "training_info.json is not a JSON object (NoneType)", id="null"),
        pytest.param(b"NaN", "training_info.json is not a JSON object (float)", id="bare_nan"),
    ],
)
def test_unusable_training_info_gives_none_and_a_reason(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    step = make_dir(tmp_path / "step_1")
    (step / "training_info.json").write_bytes(content)
    info, why = read_training_info(step)
    assert info is None
    assert why is not None and why.startswith(reason)
    (c,) = scan_root(tmp_path).steps
    assert (c.info, c.info_error) == (None, why)


def test_missing_training_info_reason(tmp_path: Path) -> None:
    assert read_training_info(make_dir(tmp_path / "step_1")) == (None, "no training_info.json")


@pytest.mark.parametrize("kind", ["directory", "symlink", "fifo"])
def test_training_info_that_is_not_a_regular_file_is_not_read(tmp_path: Path, kind: str) -> None:
    step = make_dir(tmp_path / "step_1")
    target = make_dir(tmp_path / "elsewhere", {"step": 1, "val": 1})
    path = step / "training_info.json"
    if kind == "directory":
        path.mkdir()
    elif kind == "symlink":
        path.symlink_to(target / "training_info.json")
    else:
        os.mkfifo(path)  # reading it would block forever
    assert read_training_info(step) == (None, "training_info.json is not a regular file")


def test_training_info_larger_than_the_limit_is_not_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(info_mod, "MAX_INFO_BYTES", 64)
    step = make_dir(tmp_path / "step_1")
    (step / "training_info.json").write_text(json.dumps({"step": 1, "pad": "x" * 100}))
    info, why = read_training_info(step)
    assert info is None
    assert why is not None and "too large" in why and "> 64" in why
    small = make_dir(tmp_path / "step_2", {"step": 2})
    assert read_training_info(small) == ({"step": 2}, None)


def test_training_info_that_grew_after_stat_is_not_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(info_mod, "MAX_INFO_BYTES", 64)
    step = make_dir(tmp_path / "step_1")
    (step / "training_info.json").write_text(json.dumps({"pad": "x" * 100}))
    # The size seen by lstat was small; the read finds more than the limit.
    info, why = info_mod._parse_info(step / "training_info.json", 10)
    assert info is None
    assert why is not None and "too large" in why


def test_nan_and_infinity_metrics_are_kept_as_floats_for_the_planner(tmp_path: Path) -> None:
    # DESIGN.md section 4: NaN/inf metrics take part and rank last (or are kept by keep_unranked),
    # so the JSON is usable; the metric is unranked by the policy, not the whole file.
    step = make_dir(tmp_path / "step_1")
    (step / "training_info.json").write_text(
        '{"step": 1, "val": NaN, "a": Infinity, "b": -Infinity}'
    )
    info, why = read_training_info(step)
    assert why is None and info is not None
    assert math.isnan(info["val"])
    assert (info["a"], info["b"]) == (math.inf, -math.inf)


def test_pinned_step_and_pinned_tmp(tmp_path: Path) -> None:
    root = tmp_path / "run"
    make_dir(root / "step_1", {"step": 1}, "KEEP")
    make_dir(root / "step_2", {"step": 2})
    make_dir(root / "tmp_step_3", None, "KEEP")
    make_dir(root / "step_4", {"step": 4})
    (root / "step_4" / "KEEP").mkdir()  # any entry named KEEP pins
    make_dir(root / "step_5", {"step": 5})
    (root / "step_5" / "KEEP").symlink_to(tmp_path / "nowhere")  # a dangling symlink pins too
    make_dir(root / "step_6", {"step": 6})
    (root / "step_6" / "keep").touch()  # the name is exact
    scan = scan_root(root)
    pins = {1: True, 2: False, 4: True, 5: True, 6: False}
    assert {c.step: c.pinned for c in scan.steps} == pins
    assert scan.in_flight[0].pinned is True


def test_custom_completion_marker(tmp_path: Path) -> None:
    root = tmp_path / "run"
    make_dir(root / "tmp_step_1", None, "DONE")
    make_dir(root / "tmp_step_2", None, ".complete")
    custom = scan_root(root, marker="DONE")
    assert [(t.step, t.complete) for t in custom.in_flight] == [(1, True), (2, False)]
    default = scan_root(root)
    assert [(t.step, t.complete) for t in default.in_flight] == [(1, False), (2, True)]


# -- writer lock and staleness ---------------------------------------------------------------------


def test_writer_lock_held_in_this_process_by_another_open(tmp_path: Path) -> None:
    root = tmp_path / "run"
    tmp_dir = make_dir(root / "tmp_step_5", None, "part.pt")
    old = time.time() - 10**6
    set_tree_mtime(tmp_dir, old)
    assert writer_lock_held(tmp_dir) is False  # no lock file at all
    with writer_lock(tmp_dir):
        assert writer_lock_held(tmp_dir) is True
        (t,) = scan_root(root, stale_before=time.time() - 60).in_flight
        assert (t.writer_locked, t.newest_mtime) == (True, None)
    assert writer_lock_held(tmp_dir) is False
    (t,) = scan_root(root, stale_before=time.time() - 60).in_flight
    assert t.writer_locked is False
    assert t.newest_mtime is not None


def test_writer_lock_held_by_another_process(tmp_path: Path) -> None:
    tmp_dir = make_dir(tmp_path / "tmp_step_5")
    code = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_dir / ".writer.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "locked\n"
        assert writer_lock_held(tmp_dir) is True
        (t,) = scan_root(tmp_path, stale_before=time.time()).in_flight
        assert t.writer_locked is True
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    assert writer_lock_held(tmp_dir) is False


def test_writer_lock_file_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    tmp_dir = make_dir(tmp_path / "tmp_step_5")
    target = tmp_path / "lockfile"
    target.touch()
    (tmp_dir / ".writer.lock").symlink_to(target)
    # Lock the target through another path; the probe must not follow the link.
    fd = os.open(target, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert writer_lock_held(tmp_dir) is False
    finally:
        os.close(fd)


def test_stale_probe_uses_the_newest_change_in_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "run"
    tmp_dir = make_dir(root / "tmp_step_5", None, "a.pt", "policy/shard/b.pt", "policy/c.pt")
    set_tree_mtime(tmp_dir, time.time() - 10 * 3600)
    changed = newest_ctime(tmp_dir)  # utime sets the ctime to now: the last change
    # Planned with a clock 10 h ahead, staleness 6 h: the probe walks the whole tree.
    stale_before = time.time() + 4 * 3600

    (t,) = scan_root(root, stale_before=stale_before).in_flight
    assert t.writer_locked is False
    assert t.newest_mtime == changed
    assert newest_mtime(tmp_dir) == changed

    deep = tmp_dir / "policy" / "shard" / "new.pt"
    deep.write_text("fresh")  # one file deep inside, written 5 h "later" (its mtime)
    later = time.time() + 5 * 3600
    os.utime(deep, (later, later))
    (t,) = scan_root(root, stale_before=stale_before).in_flight
    assert t.newest_mtime is not None and t.newest_mtime > stale_before
    assert newest_mtime(tmp_dir) == pytest.approx(later)


def test_stale_probe_sees_a_new_file_even_when_its_directory_mtime_is_old(tmp_path: Path) -> None:
    tmp_dir = make_dir(tmp_path / "tmp_step_5", None, "x/y/z/old.pt")
    (tmp_dir / "x" / "y" / "z" / "new.pt").write_text("fresh")
    set_tree_mtime(tmp_dir, time.time() - 10**5)
    now = time.time()
    os.utime(tmp_dir / "x" / "y" / "z" / "new.pt", (now, now))
    assert newest_mtime(tmp_dir) == pytest.approx(now)


def test_stale_probe_does_not_follow_symlinks(tmp_path: Path) -> None:
    outside = make_dir(tmp_path / "outside", None, "fresh.pt")
    tmp_dir = make_dir(tmp_path / "tmp_step_5", None, "a.pt")
    (tmp_dir / "link").symlink_to(outside)
    old = time.time() - 10**5
    set_tree_mtime(tmp_dir, old)
    os.utime(tmp_dir / "link", (old, old), follow_symlinks=False)
    later = time.time() + 10**5  # what is behind the link was written "later" than anything
    os.utime(outside / "fresh.pt", (later, later))
    os.utime(outside, (later, later))
    assert newest_mtime(tmp_dir) == newest_ctime(tmp_dir)


def test_a_save_copied_with_preserved_mtimes_is_recent(tmp_path: Path) -> None:
    """``cp -p`` / ``rsync -a`` / ``tar x`` set old mtimes; the ctime says when it was copied."""
    source = make_dir(tmp_path / "source", None, "a.pt", "policy/shard/b.pt")
    set_tree_mtime(source, time.time() - 3 * 86400)
    root = tmp_path / "run"
    root.mkdir()
    subprocess.run(["cp", "-a", str(source), str(root / "tmp_step_5")], check=True)
    copied = root / "tmp_step_5"
    assert os.lstat(copied / "policy" / "shard" / "b.pt").st_mtime < time.time() - 2 * 86400
    (t,) = scan_root(root, stale_before=time.time() - 3600).in_flight
    assert t.newest_mtime is not None and t.newest_mtime > time.time() - 3600
    assert newest_mtime(copied) == newest_ctime(copied)


def test_complete_tmp_is_not_probed(tmp_path: Path) -> None:
    make_dir(tmp_path / "tmp_step_5", None, ".complete")
    (t,) = scan_root(tmp_path, stale_before=time.time()).in_flight
    assert (t.complete, t.writer_locked, t.newest_mtime) == (True, None, None)


@pytest.mark.parametrize(
    ("name", "seconds"),
    [
        ("1700000000000000000-step_3", 1700000000.0),
        ("5-x-y", 5e-9),
        ("step_3", None),
        ("-step_3", None),
        ("12ab-step_3", None),
        ("\u0661\u0662-step_3", None),
    ],
)
def test_trash_names_carry_the_time_they_were_trashed(name: str, seconds: float | None) -> None:
    assert parse_trash_name(name) == (pytest.approx(seconds) if seconds is not None else None)


# -- InfoCache -------------------------------------------------------------------------------------


def test_info_cache_parses_each_unchanged_file_once(tmp_path: Path) -> None:
    root = tmp_path / "run"
    for s in range(1, 6):
        make_dir(root / f"step_{s}", {"step": s})
    make_dir(root / "step_6")  # no info: nothing to parse
    (make_dir(root / "step_7") / "training_info.json").write_text("{bad")
    make_dir(root / "tmp_step_8", {"step": 8}, ".complete")
    cache = InfoCache()

    first = scan_root(root, cache=cache)
    assert cache.parses == 7
    second = scan_root(root, cache=cache)
    assert cache.parses == 7  # nothing parsed again
    assert second == first

    # A changed file (different size) is parsed again, and only that one.
    (root / "step_3" / "training_info.json").write_text(json.dumps({"step": 3, "val": 0.25}))
    third = scan_root(root, cache=cache)
    assert cache.parses == 8
    assert {c.step: c.info for c in third.steps}[3] == {"step": 3, "val": 0.25}

    # Same size, new mtime: parsed again.
    info = root / "step_4" / "training_info.json"
    info.write_text(json.dumps({"step": 9}))
    st = os.stat(info)
    os.utime(info, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    fourth = scan_root(root, cache=cache)
    assert cache.parses == 9
    assert {c.step: c.info for c in fourth.steps}[4] == {"step": 9}


def test_info_cache_reparses_after_a_rename_and_forgets_vanished_steps(tmp_path: Path) -> None:
    root = tmp_path / "run"
    make_dir(root / "tmp_step_1", {"step": 1}, ".complete")
    make_dir(root / "step_2", {"step": 2})
    cache = InfoCache()
    scan_root(root, cache=cache)
    assert cache.parses == 2
    (root / "tmp_step_1").rename(root / "step_1")
    scan = scan_root(root, cache=cache)
    assert cache.parses == 3  # a new name is a new entry
    assert {c.step: c.info for c in scan.steps} == {1: {"step": 1}, 2: {"step": 2}}
    assert cache.get(root / "tmp_step_1" / "training_info.json", (0, 0, 0)) is None
    # held once, in the step memo (not also as parsed files); tmp_step_1's entry is gone
    assert set(cache.step_memo(str(root))) == {"step_1", "step_2"}
    assert not cache._roots[str(root)]
    cache.drop_root(root)
    assert str(root) not in cache._roots and not cache.step_memo(str(root))


def test_info_cache_keeps_roots_apart(tmp_path: Path) -> None:
    a = tmp_path / "a"
    b = tmp_path / "b"
    make_dir(a / "step_1", {"root": "a"})
    make_dir(b / "step_1", {"root": "b"})
    cache = InfoCache()
    assert scan_root(a, cache=cache).steps[0].info == {"root": "a"}
    assert scan_root(b, cache=cache).steps[0].info == {"root": "b"}
    assert scan_root(a, cache=cache).steps[0].info == {"root": "a"}
    assert cache.parses == 2


# -- the step-directory memo (scan_root(memo=True)) ------------------------------------------------
#
# A memo entry is trusted only if the scan that made it came MEMO_TRUST_S after the directory's
# last change. Directories made by a test are brand new, so most tests move the scan's clock
# ahead (`later`) to stand for "the next pass, a while after the checkpoint was written".


@pytest.fixture
def later() -> Callable[[], InfoCache]:
    ahead = int((scan_mod.MEMO_TRUST_S + 60) * 1e9)
    return lambda: InfoCache(clock_ns=lambda: time.time_ns() + ahead)


def memo_root(tmp_path: Path, steps: int = 3) -> Path:
    root = tmp_path / "run"
    for s in range(1, steps + 1):
        make_dir(root / f"step_{s}", {"step": s, "val": s / 10})
    return root


def test_an_unchanged_step_is_taken_from_the_memo(
    tmp_path: Path, later: Callable[[], InfoCache]
) -> None:
    root = memo_root(tmp_path)
    cache = later()
    first = scan_root(root, cache=cache, memo=True)
    assert cache.memo_hits == 0  # nothing to reuse yet
    second = scan_root(root, cache=cache, memo=True)
    assert cache.memo_hits == 3
    assert second == first  # the same records, made again from the memo (no JSON read)
    assert cache.parses == 3


def test_a_scan_without_memo_reads_every_step_in_full(
    tmp_path: Path, later: Callable[[], InfoCache]
) -> None:
    root = memo_root(tmp_path)
    cache = later()
    scan_root(root, cache=cache, memo=True)
    again = scan_root(root, cache=cache)
    assert cache.memo_hits == 0
    assert again == scan_root(root)  # the same as a scan with no cache at all


def test_a_keep_file_added_to_an_unchanged_step_is_seen_by_the_next_scan(
    tmp_path: Path, later: Callable[[], InfoCache]
) -> None:
    root = memo_root(tmp_path)
    cache = later()
    scan_root(root, cache=cache, memo=True)
    scan_root(root, cache=cache, memo=True)
    (root / "step_2" / "KEEP").touch()
    scan = scan_root(root, cache=cache, memo=True)
    assert {c.step: c.pinned for c in scan.steps} == {1: False, 2: True, 3: False}
    (root / "step_2" / "KEEP").unlink()
    scan = scan_root(root, cache=cache, memo=True)
    assert {c.step: c.pinned for c in scan.steps} == {1: False, 2: False, 3: False}


@pytest.mark.parametrize("memo", [True, False])
def test_a_metric_rewritten_in_place_with_its_size_and_mtime_kept_is_read_again(
    tmp_path: Path, later: Callable[[], InfoCache], memo: bool
) -> None:
    """Same inode, same size, the old mtime put back with utime: only the ctime (which utime
    cannot set back) moved. The cached metrics (and the step memo) must not be trusted over the
    file: the next scan reads the new value."""
    root = memo_root(tmp_path)
    cache = later()
    scan_root(root, cache=cache, memo=memo)
    info = root / "step_2" / "training_info.json"
    before = os.stat(info)
    old = info.read_bytes()
    new = old.replace(b'"val": 0.2', b'"val": 0.7')
    assert len(new) == len(old) and new != old
    time.sleep(0.01)  # a later ctime than the first write (clock ticks are ~4 ms)
    with open(info, "r+b") as f:
        f.write(new)
    os.utime(info, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(info)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    assert after.st_ctime_ns != before.st_ctime_ns
    scan = scan_root(root, cache=cache, memo=memo)
    assert {c.step: c.info for c in scan.steps}[2] == {"step": 2, "val": 0.7}


def test_training_info_rewritten_in_place_is_seen_by_the_next_scan(
    tmp_path: Path, later: Callable[[], InfoCache]
) -> None:
    root = memo_root(tmp_path)
    cache = later()
    scan_root(root, cache=cache, memo=True)
    step = root / "step_1"
    before = os.stat(step)
    info = step / "training_info.json"
    with open(info, "r+") as f:  # in place: the directory's times do not move
        f.write(json.dumps({"step": 1, "val": 9.9}))
    os.utime(info, ns=(before.st_atime_ns, os.stat(info).st_mtime_ns + 1_000_000_000))
    assert os.stat(step).st_mtime_ns == before.st_mtime_ns
    scan = scan_root(root, cache=cache, memo=True)
    assert {c.step: c.info for c in scan.steps}[1] == {"step": 1, "val": 9.9}
    assert cache.memo_hits == 2  # the two other steps

    info.write_text("{not json")  # and a rewrite that breaks it
    scan = scan_root(root, cache=cache, memo=True)
    s1 = scan.steps[0]
    assert s1.info is None and s1.info_error is not None and "not valid JSON" in s1.info_error


def test_training_info_removed_or_replaced_by_a_symlink_is_seen_by_the_next_scan(
    tmp_path: Path, later: Callable[[], InfoCache]
) -> None:
    root = memo_root(tmp_path)
    cache = later()
    scan_root(root, cache=cache, memo=True)
    (root / "step_1" / "training_info.json").unlink()
    (root / "step_2" / "training_info.json").unlink()
    os.symlink(tmp_path / "elsewhere.json", root / "step_2" / "training_info.json")
    scan = scan_root(root, cache=cache, memo=True)
    assert [c.info_error for c in scan.steps] == [
        "no training_info.json",
        "training_info.json is not a regular file",
        None,
    ]


def test_a_step_replaced_under_the_same_name_is_read_again(
    tmp_path: Path, later: Callable[[], InfoCache]
) -> None:
    root = memo_root(tmp_path)
    cache = later()
    scan_root(root, cache=cache, memo=True)
    (root / "step_2").rename(tmp_path / "parked")  # keeps the old inode alive
    make_dir(root / "step_2", {"step": 2, "val": 0.77}, "KEEP")
    scan = scan_root(root, cache=cache, memo=True)
    s2 = scan.steps[1]
    assert (s2.info, s2.pinned, s2.identity) == (
        {"step": 2, "val": 0.77},
        True,
        identity(root / "step_2"),
    )


def test_steps_that_appear_and_vanish_are_seen_by_the_next_scan(
    tmp_path: Path, later: Callable[[], InfoCache]
) -> None:
    root = memo_root(tmp_path)
    cache = later()
    scan_root(root, cache=cache, memo=True)
    (root / "step_1").rename(tmp_path / "gone")
    make_dir(root / "step_4", {"step": 4})
    make_dir(root / "step_04", {"step": 4})
    scan = scan_root(root, cache=cache, memo=True)
    assert [c.step for c in scan.steps] == [2, 3]
    assert scan.ambiguous_steps == frozenset({4})
    assert set(cache.step_memo(str(root))) == {"step_2", "step_3"}


def test_a_step_changed_just_now_is_not_taken_from_the_memo(tmp_path: Path) -> None:
    # The real clock: the directories were made within MEMO_TRUST_S, so a change to them could
    # fall in the same timestamp tick and leave their times equal. Never trusted.
    root = memo_root(tmp_path)
    cache = InfoCache()
    for _ in range(3):
        scan_root(root, cache=cache, memo=True)
    assert cache.memo_hits == 0


def test_a_change_within_the_same_timestamp_tick_is_not_missed(tmp_path: Path) -> None:
    # A filesystem with coarse timestamps: KEEP is created within the tick of the directory's
    # last change, so its times do not move. Simulated by writing the new times into the memo.
    root = memo_root(tmp_path, steps=1)
    cache = InfoCache()
    scan_root(root, cache=cache, memo=True)  # made at once after the directory changed
    (root / "step_1" / "KEEP").touch()
    entry = cache.step_memo(str(root))["step_1"]
    st = os.stat(root / "step_1")
    entry.mtime_ns, entry.ctime_ns = st.st_mtime_ns, st.st_ctime_ns
    assert not entry.trusted
    assert scan_root(root, cache=cache, memo=True).steps[0].pinned


def test_a_memo_entry_is_trusted_once_the_step_is_older_than_the_trust_window(
    tmp_path: Path,
) -> None:
    root = memo_root(tmp_path, steps=1)
    changed = os.stat(root / "step_1").st_ctime_ns
    window = int(scan_mod.MEMO_TRUST_S * 1e9)
    clock = [changed + window - 1]
    cache = InfoCache(clock_ns=lambda: clock[0])
    scan_root(root, cache=cache, memo=True)
    assert not cache.step_memo(str(root))["step_1"].trusted
    clock[0] = changed + window
    scan_root(root, cache=cache, memo=True)
    assert cache.step_memo(str(root))["step_1"].trusted
    assert cache.memo_hits == 0
    scan_root(root, cache=cache, memo=True)
    assert cache.memo_hits == 1


def test_in_flight_saves_leftovers_and_trash_are_never_memoized(
    tmp_path: Path, later: Callable[[], InfoCache]
) -> None:
    root = memo_root(tmp_path, steps=1)
    make_dir(root / "tmp_step_2", {"step": 2}, "w.pt")
    make_dir(root / "old_step_1", {"step": 1})
    trash_dir(root).mkdir(parents=True)
    cache = later()
    scan_root(root, cache=cache, memo=True)
    scan_root(root, cache=cache, memo=True)
    assert set(cache.step_memo(str(root))) == {"step_1"}
    (root / "tmp_step_2" / ".complete").touch()
    (root / "old_step_1" / "KEEP").touch()
    (trash_dir(root) / "1700000000000000000-step_9").mkdir()
    scan = scan_root(root, cache=cache, memo=True)
    assert [(t.step, t.complete) for t in scan.in_flight] == [(2, True)]
    assert [o.pinned for o in scan.leftovers] == [True]
    assert [t.path.name for t in scan.trash] == ["1700000000000000000-step_9"]


def test_the_memo_is_kept_per_root_and_dropped_with_it(
    tmp_path: Path, later: Callable[[], InfoCache]
) -> None:
    a, b = memo_root(tmp_path / "a"), memo_root(tmp_path / "b")
    (b / "step_1" / "KEEP").touch()
    cache = later()
    for _ in range(2):
        assert [c.pinned for c in scan_root(a, cache=cache, memo=True).steps] == [False] * 3
        assert [c.pinned for c in scan_root(b, cache=cache, memo=True).steps] == [True] + [
            False
        ] * 2
    assert cache.memo_hits == 6
    cache.drop_root(a)
    assert str(a) not in cache._steps and str(b) in cache._steps


def test_a_symlinked_root_is_scanned_through_and_its_trash_refused(tmp_path: Path) -> None:
    real = memo_root(tmp_path, steps=2)
    trash_dir(real).mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real)
    scan = scan_root(link, cache=InfoCache(), memo=True)
    assert [c.path for c in scan.steps] == [link / "step_1", link / "step_2"]
    assert [a.reason for a in scan.anomalies] == [
        "not a directory or behind a symlink: ckptkeeper's trash is not used"
    ]
