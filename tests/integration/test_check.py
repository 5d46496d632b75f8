"""``ckptkeeper check``: the Nagios/Icinga probe, run as the real command against real roots.

Exit codes 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN; one summary line; ``--json``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers import CKPTKEEPER, Daemon, wait_until, write_checkpoint
from tests.smallfs import small_tmpfs

POLICY = ["--keep-top-k", "2", "--metric", "r", "--higher-is-better"]
NOBODY = 65534


def check(*args: str) -> tuple[int, str]:
    proc = subprocess.run([CKPTKEEPER, "check", *args], capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout.strip()


def check_as(uid: int, *args: str) -> tuple[int, str]:
    """``ckptkeeper check`` in a forked child that drops to ``uid`` (and no groups) first.

    In-process because the interpreter itself may live where another uid cannot read it; what
    the probe needs is loaded before the fork."""
    import ckptkeeperd.check
    from ckptkeeperd import cli

    assert ckptkeeperd.check.run_check is not None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            os.close(read)
            os.dup2(write, 1)
            os.dup2(write, 2)
            sys.stdout = sys.stderr = open(1, "w", closefd=False)  # noqa: SIM115
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            cli.main(["check", *args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 99
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    os.close(write)
    with open(read, "rb") as fh:
        out = fh.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.strip()


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def trash_entry(root: Path, name: str, seconds_ago: float) -> Path:
    when = time.time_ns() - int(seconds_ago * 1e9)
    path = root / ".ckptkeeper" / "trash" / f"{when}-{name}"
    (path / "policy").mkdir(parents=True)
    (path / "policy" / "shard.bin").write_bytes(b"x" * 100)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    for step, r in ((1, 0.2), (2, 0.9), (3, 0.5)):
        write_checkpoint(root, step, {"r": r}, final=True)
    return root


def test_healthy_root_is_ok_with_performance_data(root: Path) -> None:
    code, line = check(str(root), *POLICY)
    assert code == 0, line
    assert line == (
        "CKPTKEEPER OK - 1 root, 3 checkpoints"
        " | roots=1 critical=0 warning=0 unknown=0 checkpoints=3"
    )


def test_stopped_keeper_leaves_a_complete_save_unfinalized(
    root: Path, daemons: list[Daemon]
) -> None:
    d = Daemon([str(root), *POLICY, "--sweep-interval", "1s"])
    daemons.append(d)
    d.wait_ready()
    write_checkpoint(root, 4, {"r": 0.1})
    d.wait_for("finalized", step=4)
    assert check(str(root), *POLICY, "--sweep-interval", "1s")[0] == 0
    assert d.stop() == 0
    # The keeper is gone; a trainer goes on saving.
    save = write_checkpoint(root, 5, {"r": 0.3})
    code, line = check(str(root), *POLICY, "--sweep-interval", "1s")
    assert code == 0, line  # just written: a running keeper would have 2 intervals for it
    age(save / ".complete", 245)
    code, line = check(str(root), *POLICY, "--sweep-interval", "1s")
    assert code == 2, line
    assert line.startswith(
        f"CKPTKEEPER CRITICAL - 1 of 1 roots: {root}: complete save tmp_step_5 not finalized"
        " for 4m (keeper not running?) | roots=1 critical=1 warning=0 unknown=0"
    ), line
    # Judged against the root's own sweep_interval: with 5m, 4 minutes are still fine.
    assert check(str(root), *POLICY, "--sweep-interval", "5m")[0] == 0


def test_stuck_trash_warns_after_an_hour_and_is_critical_after_six(root: Path) -> None:
    entry = trash_entry(root, "step_0", 2 * 3600)
    code, line = check(str(root), *POLICY)
    assert code == 1, line
    assert f"trash {entry.name} not removed for 2h (stuck?)" in line
    assert check(str(root), *POLICY, "--trash-grace", "1d")[0] == 0  # still within its grace
    trash_entry(root, "step_00", 7 * 3600)
    code, line = check(str(root), *POLICY)
    assert code == 2 and "not removed for 7h" in line, line


def test_paused_deletions_warn(root: Path) -> None:
    (root / "ckptkeeper.toml").write_text("keep_top_k = 'three'\n")
    code, line = check(str(root), *POLICY)
    assert code == 1, line
    assert "deletions paused" in line and "keep_top_k" in line


def test_stale_save_not_collected_warns(root: Path) -> None:
    """Staleness counts ctimes too (they cannot be set back), so the save really ages here:
    stale after 2 s, not collected 2 s + sweep_interval (1 s) after its last change."""
    tmp = write_checkpoint(root, 9, {"r": 0.0}, complete=False)
    flags = (*POLICY, "--stale-after", "2s", "--sweep-interval", "1s")
    assert check(str(root), *flags)[0] == 0  # just written
    changed = max(max(st.st_mtime, st.st_ctime) for st in map(os.lstat, [tmp, *tmp.rglob("*")]))
    wait_until(lambda: time.time() > changed + 3.5, timeout=15, what="the save to age 3.5 s")
    assert check(str(root), *POLICY, "--stale-after", "1h")[0] == 0  # not stale under 1h
    before = time.time()
    code, line = check(str(root), *flags)
    after = time.time()
    assert code == 1, line
    found = re.search(r"stale save tmp_step_9 not collected \(untouched (\d+)s\)", line)
    assert found, line
    # Its age when the check looked, from its last change (ctime included): a moment within the
    # call, which a loaded machine stretches (the process's start-up alone can take seconds).
    assert int(before - changed) <= int(found[1]) <= int(after - changed), (line, changed)


def test_missing_root_is_critical_and_roots_are_counted(root: Path, tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    code, line = check(str(root), str(gone), *POLICY)
    assert code == 2, line
    assert line.startswith(f"CKPTKEEPER CRITICAL - 1 of 2 roots: {gone}: root does not exist |")
    assert "roots=2 critical=1 warning=0 unknown=0" in line


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """A directory another uid can reach (pytest's tmp_path is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="ckptkeeper-check-"))
    base.chmod(0o755)
    yield base
    subprocess.run(["rm", "-rf", str(base)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the probe as another uid")
def test_unreadable_root_is_unknown(shared_base: Path) -> None:
    root = shared_base / "run"
    write_checkpoint(root, 1, {"r": 1.0}, final=True)
    root.chmod(0o700)  # owned by root: uid 65534 may not list it
    code, line = check_as(NOBODY, str(root), *POLICY)
    assert code == 3, line
    assert line.startswith(f"CKPTKEEPER UNKNOWN - 1 of 1 roots: {root}: cannot list root: EACCES")
    root.chmod(0o755)
    code, line = check_as(NOBODY, str(root), *POLICY)
    assert code == 0, line  # the same probe, allowed to look


def test_worst_state_wins_and_json_lists_every_finding(root: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_checkpoint(other, 1, {"r": 1.0}, final=True)
    (other / "ckptkeeper.toml").write_text("keep_top_k = -1\n")
    save = write_checkpoint(root, 5, {"r": 0.3})
    age(save / ".complete", 3600)
    proc = subprocess.run(
        [CKPTKEEPER, "check", str(root), str(other), *POLICY, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    doc = json.loads(proc.stdout)
    assert doc["status"] == "CRITICAL" and doc["exit_code"] == 2
    assert doc["summary"].startswith("CKPTKEEPER CRITICAL - 2 of 2 roots: ")
    by_root = {r["root"]: r for r in doc["roots"]}
    assert by_root[str(root)]["status"] == "CRITICAL"
    assert by_root[str(other)]["status"] == "WARNING"
    assert "deletions paused" in by_root[str(other)]["findings"][0]["message"]


def test_usage_and_config_errors_are_unknown(tmp_path: Path) -> None:
    code, _ = check("--no-such-flag")
    assert code == 3
    bad = tmp_path / "bad.toml"
    bad.write_text("[defaults]\nkeep_top_k = 'x'\n")
    code, line = check("--config", str(bad))
    assert code == 3
    assert line == "CKPTKEEPER UNKNOWN - bad usage or configuration (see stderr)"


def test_check_changes_nothing(root: Path) -> None:
    save = write_checkpoint(root, 5, {"r": 0.3})
    age(save / ".complete", 3600)
    before = sorted(str(p) for p in root.rglob("*"))
    assert check(str(root), *POLICY)[0] == 2
    assert sorted(str(p) for p in root.rglob("*")) == before
    assert not (root / ".ckptkeeper").exists()


def test_free_space_under_min_free_warns_then_is_critical_when_only_protected_remain(
    tmp_path: Path,
) -> None:
    with small_tmpfs(tmp_path / "fs", "8m") as mount:
        root = mount / "run"
        for step, r in ((1, 0.2), (2, 0.9), (3, 0.5)):
            write_checkpoint(root, step, {"r": r}, final=True)
        big = 5 * 1024 * 1024  # of 8 MiB
        (root / "step_2" / "big.bin").write_bytes(b"x" * big)  # the best: protected
        code, line = check(str(root), *POLICY, "--min-free", "50%")
        assert code == 2, line
        assert "free space" in line and "only protected checkpoints left" in line
        (root / "step_2" / "big.bin").unlink()
        (root / "step_1" / "big.bin").write_bytes(b"x" * big)  # the worst: deletable
        code, line = check(str(root), *POLICY, "--min-free", "50%")
        assert code == 1, line
        assert "deleting under pressure" in line
        code, line = check(str(root), *POLICY)  # no min_free: space is not judged
        assert code == 0, line
