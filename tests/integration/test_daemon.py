"""The real `ckptkeeper run` process against real roots: events, schedule, signals, sidecar."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tests.helpers import CKPTKEEPER, Daemon, step_names, steps, wait_until, write_checkpoint

POLICY = ["--keep-top-k", "2", "--metric", "r", "--higher-is-better"]


def _age_tree(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (old, old), follow_symlinks=False)


@pytest.mark.parametrize("observer", ["inotify", "polling"])
def test_complete_saves_are_finalized_and_pruned_by_events_alone(
    tmp_path: Path, daemons: list[Daemon], observer: str
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    # sweep_interval 1h: only watch events can drive these passes.
    d = Daemon([str(root), *POLICY, "--observer", observer, "--sweep-interval", "1h"])
    daemons.append(d)
    d.wait_ready()
    rewards = {1: 0.5, 2: 0.9, 3: 0.1, 4: 0.7, 5: 0.2}
    for step, r in rewards.items():
        write_checkpoint(root, step, {"r": r})
        d.wait_for("finalized", step=step, timeout=10)
    # top-2 by r = {2, 4}, plus the latest (5).
    wait_until(
        lambda: step_names(root) == {"step_2", "step_4", "step_5"}, timeout=10, what="pruned set"
    )
    # "deleted" is logged once a step's trash entry is removed, just after it left the root.
    wait_until(lambda: len(d.find("deleted")) >= 2, timeout=10, what="two deleted events")
    deleted = {e["step"] for e in d.find("deleted")}
    assert deleted == {1, 3}
    for e in d.find("deleted"):
        assert e["root"] == str(root) and e["bytes"] > 0 and "outside top-2" in e["reason"]
    assert d.stop() == 0


def _last_change(path: Path) -> float:
    return max(max(st.st_mtime, st.st_ctime) for st in map(os.lstat, [path, *path.rglob("*")]))


def test_stale_unmarked_save_is_garbage_collected(tmp_path: Path, daemons: list[Daemon]) -> None:
    """An abandoned save (old mtimes, and its ctime older than stale_after: a ctime cannot be set
    back, so the test waits that long) is collected; a save being written beside it is not."""
    stale_after = 3.0
    root = tmp_path / "run"
    root.mkdir()
    write_checkpoint(root, 1, {"r": 1.0})
    abandoned = write_checkpoint(root, 2, {"r": 2.0}, complete=False)
    _age_tree(abandoned, 3600)
    wait_until(
        lambda: time.time() > _last_change(abandoned) + stale_after + 0.5,
        timeout=stale_after + 10,
        what="the abandoned save to be older than stale_after",
    )
    fresh = write_checkpoint(root, 3, {"r": 3.0}, complete=False)
    stop = threading.Event()

    def keep_writing() -> None:  # the trainer writing tmp_step_3: a write every 50 ms
        for i in itertools.count():
            if stop.wait(0.05):
                return
            (fresh / "policy" / f"chunk_{i % 8}.bin").write_bytes(b"x" * 1024)

    writer = threading.Thread(target=keep_writing, daemon=True)
    writer.start()
    try:
        args = ["--stale-after", "3s", "--sweep-interval", "1s", "--log-level", "debug"]
        d = Daemon([str(root), *POLICY, *args])
        daemons.append(d)
        d.wait_ready()
        event = d.wait_for("garbage_collected", step=2)[0]
        d.wait_for("pass_done", count=len(d.find("pass_done")) + 2, timeout=15)
    finally:
        stop.set()
        writer.join(timeout=10)
    assert "stale" in event["reason"]
    assert not abandoned.exists() and fresh.exists()
    assert not d.find("garbage_collected", step=3)
    assert not (root / ".ckptkeeper" / "trash").exists() or not any(
        (root / ".ckptkeeper" / "trash").iterdir()
    )
    assert d.stop() == 0


def test_held_writer_lock_prevents_collection_until_released(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    tmp = write_checkpoint(root, 4, {"r": 1.0}, complete=False)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl,os,sys; fd=os.open(sys.argv[1], os.O_RDWR|os.O_CREAT);"
            "fcntl.flock(fd, fcntl.LOCK_EX);"
            "print('locked', flush=True); sys.stdin.read()",
            str(tmp / ".writer.lock"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        _age_tree(tmp, 3600)
        d = Daemon(
            [
                str(root),
                *POLICY,
                "--stale-after",
                "1s",
                "--sweep-interval",
                "1s",
                "--log-level",
                "debug",
            ]
        )
        daemons.append(d)
        d.wait_ready()
        d.wait_for("pass_done", count=3, timeout=15)  # several passes with the lock held
        assert tmp.exists() and not d.find("garbage_collected")
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(5)
    d.wait_for("garbage_collected", step=4, timeout=15)
    assert not tmp.exists()
    assert d.stop() == 0


def test_interrupted_replace_and_trash_leftovers_are_recovered_at_start(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    write_checkpoint(root, 2, {"r": 2.0}, final=True)
    (root / "old_step_2").mkdir()  # beside step_2: garbage
    write_checkpoint(root, 3, {"r": 3.0}, final=True)
    os.rename(root / "step_3", root / "old_step_3")  # replace interrupted before a new save existed
    trash = root / ".ckptkeeper" / "trash"
    trash.mkdir(parents=True)
    (trash / "123-step_1" / "deep").mkdir(parents=True)
    (trash / "123-step_1" / "deep" / "x.bin").write_bytes(b"x" * 100)
    d = Daemon([str(root), *POLICY])
    daemons.append(d)
    d.wait_ready()
    assert step_names(root) == {"step_2", "step_3"}
    assert (root / "step_3" / "training_info.json").exists()
    assert list(trash.iterdir()) == []
    assert {e["action"] for e in d.find("recovered")} == {"discard", "restore"}
    assert d.stop() == 0


def test_run_directory_created_after_start_is_discovered(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    base = tmp_path / "ckpt"
    base.mkdir()
    cfg = tmp_path / "ckptkeeper.toml"
    cfg.write_text(
        f'[defaults]\nkeep_top_k = 1\nsweep_interval = "1s"\n\n[[discover]]\nglob = "{base}/*"\n'
    )
    d = Daemon(["--config", str(cfg)])
    daemons.append(d)
    d.wait_ready()
    run_b = base / "run-b"
    run_b.mkdir()
    write_checkpoint(run_b, 1)
    d.wait_for("root_added", root=str(run_b), timeout=15)
    d.wait_for("finalized", root=str(run_b), step=1, timeout=15)
    assert steps(run_b) == {1}
    assert d.stop() == 0


def test_sigterm_stops_within_ten_seconds_with_exit_zero(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    d = Daemon([str(tmp_path), *POLICY])
    daemons.append(d)
    d.wait_ready()
    started = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0
    assert time.monotonic() - started < 10
    d.wait_for("stopped")


def test_sighup_reloads_a_valid_config_and_keeps_the_old_one_when_invalid(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    cfg = tmp_path / "ckptkeeper.toml"
    cfg.write_text(f'[defaults]\nsweep_interval = "1h"\n\n[[root]]\npath = "{root}"\n')
    for step in range(1, 5):
        write_checkpoint(root, step, {"r": float(step)}, final=True)
    d = Daemon(["--config", str(cfg)])
    daemons.append(d)
    d.wait_ready()
    assert steps(root) == {1, 2, 3, 4}  # no bound configured: nothing deleted

    cfg.write_text(
        f'[defaults]\nsweep_interval = "1h"\nkeep_top_k = "three"\n\n[[root]]\npath = "{root}"\n'
    )
    d.signal(signal.SIGHUP)
    failed = d.wait_for("config_reload_failed")[0]
    assert "keep_top_k" in failed["reason"] and str(cfg) in failed["reason"]
    assert d.proc.poll() is None and steps(root) == {1, 2, 3, 4}

    cfg.write_text(
        f'[defaults]\nsweep_interval = "1h"\nkeep_latest_n = 2\n\n[[root]]\npath = "{root}"\n'
    )
    d.signal(signal.SIGHUP)
    d.wait_for("config_reloaded")
    wait_until(lambda: steps(root) == {3, 4}, what="reloaded policy applied")
    assert d.stop() == 0


def test_sd_notify_ready_watchdog_status_and_stopping(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(15)
    try:
        d = Daemon(
            [str(tmp_path), *POLICY],
            env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"},
        )
        daemons.append(d)
        seen: list[str] = []

        def receive_until(prefix: str) -> None:
            while not any(m.startswith(prefix) for m in seen):
                seen.extend(sock.recv(4096).decode().splitlines())

        receive_until("READY=1")
        receive_until("WATCHDOG=1")
        receive_until("STATUS=")
        d.signal(signal.SIGTERM)
        receive_until("STOPPING=1")
        assert d.proc.wait(10) == 0
    finally:
        sock.close()


def test_sidecar_runs_a_final_pass_and_exits_with_the_trainer_code(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    trainer = (
        "import sys; from tests.helpers import write_checkpoint; from pathlib import Path;"
        "[write_checkpoint(Path(sys.argv[1]), s, {'r': float(s)}) for s in range(1, 5)];"
        "sys.exit(3)"
    )
    d = Daemon(
        [
            str(root),
            "--keep-latest-n",
            "1",
            "--sweep-interval",
            "1h",
            "--",
            sys.executable,
            "-c",
            trainer,
            str(root),
        ],
        cwd=Path(__file__).resolve().parents[2],
    )
    daemons.append(d)
    assert d.proc.wait(30) == 3
    d.stop()
    assert step_names(root) == {"step_4"}


def test_watch_pid_sidecar_exits_after_the_watched_process(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    d = Daemon([str(tmp_path), *POLICY, "--watch-pid", str(sleeper.pid)])
    daemons.append(d)
    d.wait_ready()
    write_checkpoint(tmp_path, 7, {"r": 1.0})
    assert sleeper.stdin is not None
    sleeper.stdin.close()
    sleeper.wait(5)
    assert d.proc.wait(15) == 0
    d.stop()
    assert steps(tmp_path) == {7}


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("[defaults]\nkeep_top_k = -1\n", ["defaults.keep_top_k", ">= 0"]),
        ('[defaults]\nstale_after = "5 weeks"\n', ["stale_after", "duration"]),
        ("[defaults\n", ["line"]),
        ("[defaults]\nbogus = 1\n", ["bogus"]),
    ],
)
def test_bad_config_exits_2_naming_file_key_and_reason(
    tmp_path: Path, content: str, words: list[str]
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        content + f'\n[[root]]\npath = "{tmp_path}"\n'
        if not content.startswith("[defaults\n")
        else content
    )
    for command in ("run", "sweep", "status"):
        proc = subprocess.run(
            [CKPTKEEPER, command, "--config", str(cfg)], capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert str(cfg) in proc.stderr
        for word in words:
            assert word in proc.stderr, (word, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_one_hostile_root_does_not_stop_the_others(tmp_path: Path, daemons: list[Daemon]) -> None:
    good = tmp_path / "good"
    good.mkdir()
    missing = tmp_path / "missing"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    linked = tmp_path / "linked"
    linked.symlink_to(outside)
    vanishing = tmp_path / "vanishing"
    vanishing.mkdir()
    d = Daemon(
        [
            str(good),
            str(missing),
            str(linked),
            str(vanishing),
            "--keep-latest-n",
            "1",
            "--sweep-interval",
            "1s",
        ]
    )
    daemons.append(d)
    d.wait_ready()
    shutil.rmtree(vanishing)
    for step in (1, 2):
        write_checkpoint(good, step)
    wait_until(lambda: step_names(good) == {"step_2"}, what="good root kept")
    problems = {e["root"]: e["reason"] for e in d.find("root_problem")}
    assert "does not exist" in problems[str(missing)]
    assert "symlink" in problems[str(linked)]
    d.wait_for("root_problem", root=str(vanishing))
    assert (outside / "precious").read_text() == "keep me"
    assert len(d.find("root_problem", root=str(missing))) == 1  # logged once, not every pass
    assert d.proc.poll() is None
    assert d.stop() == 0


def test_observer_auto_uses_inotify_on_local_disk(tmp_path: Path, daemons: list[Daemon]) -> None:
    d = Daemon([str(tmp_path), *POLICY])
    daemons.append(d)
    d.wait_ready()
    assert d.find("root_added", root=str(tmp_path))[0]["observer"] == "inotify"
    assert d.stop() == 0


def test_observer_auto_uses_polling_on_a_fuse_mount(tmp_path: Path, daemons: list[Daemon]) -> None:
    from tests.fusefs import fuse_available, passthrough_mount

    reason = fuse_available()
    if reason is not None:
        pytest.skip(reason)
    source, mnt = tmp_path / "src", tmp_path / "mnt"
    source.mkdir()
    mnt.mkdir()
    with passthrough_mount(source, mnt) as mounted:
        root = Path(mounted) / "run"
        root.mkdir()
        d = Daemon([str(root), *POLICY, "--sweep-interval", "1h"])
        daemons.append(d)
        d.wait_ready()
        assert d.find("root_added", root=str(root))[0]["observer"] == "polling"
        write_checkpoint(root, 1, {"r": 1.0})
        d.wait_for("finalized", step=1, timeout=15)  # seen by polling, not by a sweep
        assert d.stop() == 0
