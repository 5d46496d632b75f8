"""``ckptkeeper sweep --cache-dir DIR`` (issue 9, item 3): parsed metrics kept across cron
sweeps for the unlocked look only, never trusted over the files they describe
(`ckptkeeper.coldcache`). Whole sweep processes; reads counted with strace."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from tests.helpers import CKPTKEEPER, wait_until

from ckptkeeper.coldcache import MEMO_TRUST_S, STALE_DAYS, prune

TOP2 = ["--keep-top-k", "2", "--metric", "loss", "--lower-is-better"]
TOP1 = ["--keep-top-k", "1", "--metric", "loss", "--lower-is-better"]


def _run(root: Path, losses: dict[int, float]) -> None:
    """``step_N`` with training_info.json ``{"loss": ...}``, old enough to be cached."""
    for step, loss in losses.items():
        (root / f"step_{step}").mkdir(parents=True)
        (root / f"step_{step}" / "training_info.json").write_text(json.dumps({"loss": loss}))
    changed = max(os.lstat(p).st_ctime for p in root.rglob("*"))
    wait_until(lambda: time.time() > changed + MEMO_TRUST_S + 0.1, timeout=10, what="trust window")


def _sweep(cache: Path | None, root: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    extra = [] if cache is None else ["--cache-dir", str(cache)]
    return subprocess.run(
        [CKPTKEEPER, "sweep", *extra, *flags, str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _cache_file(cache: Path) -> Path:
    files = [p for p in cache.iterdir() if p.suffix == ".json"]
    assert len(files) == 1, files
    return files[0]


def _steps(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("step_*"))


def _traced(tmp_path: Path, cache: Path, root: Path, *flags: str) -> list[str]:
    """The opens and access probes of a sweep (strace -f), one line each."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install -y strace)")
    log = tmp_path / "trace.log"
    calls = "trace=openat,access,faccessat,faccessat2"
    cmd = [strace, "-f", "-qq", "-e", calls, "-o", str(log), CKPTKEEPER, "sweep"]
    done = subprocess.run(
        [*cmd, "--cache-dir", str(cache), *flags, str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0 and "PTRACE" in done.stderr.upper():
        pytest.skip(f"strace cannot trace here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    return log.read_text().splitlines()


def _metric_reads(tmp_path: Path, cache: Path, root: Path, *flags: str) -> int:
    """How many times a sweep opened a training_info.json."""
    return sum("training_info.json" in line for line in _traced(tmp_path, cache, root, *flags))


def test_an_unchanged_root_is_looked_at_from_the_cache_alone(tmp_path: Path) -> None:
    root, cache = tmp_path / "run", tmp_path / "cache"
    _run(root, {1: 1.0, 2: 2.0, 3: 3.0})
    names = sorted(p.name for p in root.iterdir())
    assert _metric_reads(tmp_path, cache, root, *TOP2) == 3  # first sweep: read and kept
    assert _metric_reads(tmp_path, cache, root, *TOP2) == 0  # then: lstat only
    assert sorted(p.name for p in root.iterdir()) == names, "nothing written into the root"
    assert os.lstat(cache).st_mode & 0o777 == 0o700
    assert os.lstat(_cache_file(cache)).st_mode & 0o077 == 0


def test_an_unchanged_step_directory_is_not_probed_for_its_pin_again(tmp_path: Path) -> None:
    """The KEEP probe is kept with the directory's times; a KEEP created since changes them,
    and the look sees it: step 2 is kept by its pin with no locked pass (no file read)."""
    root, cache = tmp_path / "run", tmp_path / "cache"
    _run(root, {1: 1.0, 2: 2.0, 3: 3.0})
    first = _traced(tmp_path, cache, root, *TOP2)
    assert sum("KEEP" in line for line in first) == 3
    again = _traced(tmp_path, cache, root, *TOP2)
    assert [line for line in again if "KEEP" in line or "training_info" in line] == []
    (root / "step_2" / "KEEP").touch()
    pinned = _traced(tmp_path, cache, root, *TOP1)  # step 2 is outside the top 1: kept by KEEP
    assert [line for line in pinned if "training_info" in line] == [], "no locked pass"
    assert [line for line in pinned if "KEEP" in line] == [
        line for line in pinned if "step_2/KEEP" in line
    ]
    assert _steps(root) == ["step_1", "step_2", "step_3"]


def test_a_metric_rewritten_in_place_with_its_mtime_restored_is_seen(tmp_path: Path) -> None:
    """The same inode, size and mtime (utime), only the ctime differs: the cache entry is
    not used, the new metric is, and the step it now ranks out is deleted."""
    root, cache = tmp_path / "run", tmp_path / "cache"
    _run(root, {1: 1.0, 2: 2.0, 3: 3.0})
    assert _sweep(cache, root, *TOP2).returncode == 0
    assert _steps(root) == ["step_1", "step_2", "step_3"]
    assert "step_2" in json.loads(_cache_file(cache).read_text())["entries"]
    info = root / "step_2" / "training_info.json"
    before = os.lstat(info)
    with open(info, "r+b") as f:  # in place: same inode, same size
        f.write(json.dumps({"loss": 9.0}).encode())
    os.utime(info, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.lstat(info)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    done = _sweep(cache, root, *TOP2)
    assert done.returncode == 0, done.stderr
    assert _steps(root) == ["step_1", "step_3"], done.stdout


def test_a_forged_cache_causes_no_delete_the_files_do_not_call_for(tmp_path: Path) -> None:
    """The cache says step 1 is the worst (keys intact): the unlocked look wants to delete it,
    the locked pass reads the files and keeps it."""
    root, cache = tmp_path / "run", tmp_path / "cache"
    _run(root, {1: 1.0, 2: 2.0, 3: 3.0})
    assert _sweep(cache, root, *TOP2).returncode == 0
    path = _cache_file(cache)
    doc = json.loads(path.read_text())
    doc["entries"]["step_1"][4] = {"loss": 100.0}
    path.write_text(json.dumps(doc))
    done = _sweep(cache, root, *TOP2)
    assert done.returncode == 0, done.stderr
    assert _steps(root) == ["step_1", "step_2", "step_3"]
    assert "deleted" not in done.stdout


@pytest.mark.parametrize("spoil", ["garbage", "foreign", "group_writable", "symlink", "other_root"])
def test_a_cache_file_not_ours_alone_is_ignored(tmp_path: Path, spoil: str) -> None:
    """A forged file that would put off a delete (step 2 as good as step 1) is not trusted
    when it is corrupt, another user's, writable by others, a symlink, or another root's: the
    metrics are read (3 opens) and step 2 goes."""
    root, cache = tmp_path / "run", tmp_path / "cache"
    _run(root, {1: 1.0, 2: 2.0, 3: 3.0})
    assert _sweep(cache, root, "--dry-run", *TOP1).returncode == 0
    assert not cache.exists(), "a dry run writes no cache"
    assert _metric_reads(tmp_path, cache, root, *TOP2) == 3  # keeps all three, cache written
    path = _cache_file(cache)
    doc = json.loads(path.read_text())
    doc["entries"]["step_2"][4] = {"loss": 0.5}
    path.write_text(json.dumps(doc))
    if spoil == "garbage":
        path.write_bytes(b"\x00{not json")
    elif spoil == "foreign":
        os.chown(path, 4242, 4242)
    elif spoil == "group_writable":
        path.chmod(0o660)
    elif spoil == "symlink":
        real = tmp_path / "elsewhere.json"
        path.rename(real)
        path.symlink_to(real)
    else:
        doc["root"] = str(tmp_path / "another")
        path.write_text(json.dumps(doc))
    assert _metric_reads(tmp_path, cache, root, *TOP1) == 3 + 3  # the look and the locked pass
    assert _steps(root) == ["step_1", "step_3"]


def test_a_cache_directory_others_may_write_is_not_used(tmp_path: Path) -> None:
    root, cache = tmp_path / "run", tmp_path / "cache"
    _run(root, {1: 1.0, 2: 2.0})
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)
    done = _sweep(cache, root, *TOP2)
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout.splitlines()[0])
    assert line["event"] == "cache_unusable" and "writable by others" in line["reason"]
    assert list(cache.iterdir()) == []


def test_prune_removes_files_unused_for_long_at_most_once_a_day(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    old, fresh = cache / "old.json", cache / "fresh.json"
    old.write_text("{}")
    fresh.write_text("{}")
    now = time.time()
    long_ago = now - (STALE_DAYS + 1) * 86400
    os.utime(old, (long_ago, long_ago))
    prune(cache, now)
    assert sorted(p.name for p in cache.iterdir()) == [".pruned", "fresh.json"]
    old.write_text("{}")
    os.utime(old, (long_ago, long_ago))
    prune(cache, now + 3600)  # within the day: not again
    assert old.exists()
    prune(cache, now + 2 * 86400)
    assert not old.exists() and fresh.exists()
