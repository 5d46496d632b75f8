"""RootWatcher with thousands of in-flight saves: threads stay few, watches stay bounded.

Real inotify, real polling, real kernel limits (a user namespace with few inotify watches), a real
inotify queue overflow (the watching process stopped while events pile up).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from tests.helpers import wait_until
from tests.userns import inotify_limited, userns_unavailable
from tests.watching import Recorder, inotify_wd_count, watchers

from ckptkeeper import write_marker
from ckptkeeperd.watch import RootWatcher

TIMEOUT = 10.0
SLOW = 30.0  # a debounce no test waits for


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def make_watcher(rec: Recorder) -> Iterator[Callable[..., RootWatcher]]:
    with watchers(debounce=SLOW, polling_interval=0.1) as make:
        yield functools.partial(make, rec.on_change)


def saves(root: Path, count: int) -> list[Path]:
    tmps = [root / f"tmp_step_{n}" for n in range(1, count + 1)]
    root.mkdir(parents=True)
    for t in tmps:
        t.mkdir()
    return tmps


@pytest.mark.parametrize("kind", ["inotify", "polling"])
def test_threads_do_not_grow_with_2000_in_flight_saves(
    kind: str, tmp_path: Path, rec: Recorder, make_watcher: Callable[..., RootWatcher]
) -> None:
    roots = [tmp_path / f"run{i}" for i in range(4)]
    tmps = {r: saves(r, 500) for r in roots}
    threads, wds = set(threading.enumerate()), inotify_wd_count()
    w = make_watcher()
    w.set_roots(dict.fromkeys(roots, kind), markers=dict.fromkeys(roots, ".complete"))
    for r in roots:
        w.set_in_flight(r, tmps[r])
    assert w.watch_count() == 4 + 2000
    source = "ckptkeeper-inotify" if kind == "inotify" else "ckptkeeper-poller"
    new = sorted(t.name for t in set(threading.enumerate()) - threads)
    assert new == ["ckptkeeper-debounce", source, "ckptkeeper-watch"]
    assert inotify_wd_count() - wds == (2004 if kind == "inotify" else 0)
    write_marker(tmps[roots[-1]][-1], ".complete")
    assert rec.wait_change(roots[-1])  # at once, long before the debounce
    assert rec.changes == [roots[-1]]


def test_in_flight_saves_past_max_tmp_watches_are_polled_and_it_is_logged_once(
    tmp_path: Path, rec: Recorder, make_watcher: Callable[..., RootWatcher]
) -> None:
    root = tmp_path / "run"
    tmps = saves(root, 6)
    wds = inotify_wd_count()
    with capture_logs() as logs:
        w = make_watcher(max_tmp_watches=3)
        w.set_roots({root: "inotify"}, markers={root: ".complete"})
        w.set_in_flight(root, tmps[:4])
        w.set_in_flight(root, tmps)
    assert w.watch_count() == 1 + 6
    assert inotify_wd_count() - wds == 1 + 3  # the root and three saves; three are polled
    limited = [e for e in logs if e["event"] == "watch_limit_reached"]
    assert len(limited) == 1, logs
    assert limited[0]["max_tmp_watches"] == 3 and limited[0]["fallback"] == "polling"
    (tmps[-1] / ".complete").touch()  # a polled one (set_in_flight watches in name order)
    assert rec.wait_change(root)
    # Saves finalized: their inotify watches go to the next new save.
    for t in tmps[:3]:
        t.rename(root / t.name.removeprefix("tmp_"))
    w.set_in_flight(root, tmps[3:])
    assert inotify_wd_count() - wds == 1
    (root / "tmp_step_7").mkdir()
    w.set_in_flight(root, [*tmps[3:], root / "tmp_step_7"])
    assert inotify_wd_count() - wds == 2


_EXHAUSTED_CHILD = """
import json, os, sys, time
from pathlib import Path
from structlog.testing import capture_logs
from ckptkeeperd.watch import RootWatcher
root = Path(sys.argv[1])
tmps = sorted(root.glob("tmp_step_*"))
changes, problems = [], []
with capture_logs() as logs:
    w = RootWatcher(
        changes.append, debounce=30, polling_interval=0.05,
        on_problem=lambda r, why: problems.append(why),
    )
    w.set_roots({root: "inotify"}, markers={root: ".complete"})
    w.set_in_flight(root, tmps)
    fdinfo = []
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            fdinfo.extend(open(f"/proc/self/fdinfo/{fd}").readlines())
        except OSError:
            pass  # the listing's own fd
    wds = sum(line.startswith("inotify wd:") for line in fdinfo)
    watches = w.watch_count()
    (tmps[-1] / ".complete").touch()
    deadline = time.monotonic() + 10
    while not changes and time.monotonic() < deadline:
        time.sleep(0.01)
    w.stop()
events = [{k: str(v) for k, v in e.items()} for e in logs]
print(json.dumps({"wds": wds, "watches": watches, "changes": len(changes),
                  "problems": problems, "logs": events}))
"""


def test_inotify_watches_running_out_fall_back_to_polling_logged_once(tmp_path: Path) -> None:
    reason = userns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path / "run"
    saves(root, 6)
    command = [sys.executable, "-c", _EXHAUSTED_CHILD, str(root)]
    proc = subprocess.run(
        inotify_limited(command, watches=3), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["wds"] == 3  # the root and two saves: all this user may have
    assert result["watches"] == 1 + 6  # the four others are polled...
    assert result["changes"] == 1  # ...and a marker in one of them is seen
    assert result["problems"] == []
    assert [e["event"] for e in result["logs"]] == ["inotify_watches_exhausted"]
    assert result["logs"][0]["fallback"] == "polling"


_OVERFLOW_CHILD = """
import sys
from pathlib import Path
from ckptkeeperd.watch import RootWatcher
busy, quiet = Path(sys.argv[1]), Path(sys.argv[2])
w = RootWatcher(lambda root: print("change", root.name, flush=True), debounce=0.05)
w.set_roots({busy: "inotify", quiet: "inotify"})
print("ready", flush=True)
sys.stdin.read()
w.stop()
"""


def stopped(pid: int) -> bool:
    """Every thread of ``pid`` is stopped (state T in /proc/PID/task/TID/stat)."""
    tasks = Path(f"/proc/{pid}/task")
    states = [(t / "stat").read_text().rpartition(")")[2].split()[0] for t in tasks.iterdir()]
    return all(state == "T" for state in states)


def test_a_lost_inotify_queue_makes_a_pass_of_every_root(tmp_path: Path) -> None:
    queue_max = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if queue_max > 200_000:
        pytest.skip(f"fs.inotify.max_queued_events is {queue_max}: too many files to overflow it")
    busy, quiet = tmp_path / "busy", tmp_path / "quiet"
    busy.mkdir()
    quiet.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", _OVERFLOW_CHILD, str(busy), str(quiet)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    lines: list[str] = []
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGSTOP)  # nobody reads the inotify fd: its queue fills up
        # Once every thread has stopped: until the thread the signal went to runs (late on a
        # loaded machine), the reader thread goes on draining the queue and nothing overflows.
        wait_until(lambda: stopped(child.pid), timeout=TIMEOUT, what="the child to stop")
        for i in range(queue_max + 10):
            os.mknod(busy / f"f{i}")
        child.send_signal(signal.SIGCONT)
        # Nothing happened in quiet: only the overflow can make its pass due.
        while "change quiet" not in lines and (line := child.stdout.readline()):
            lines.append(line.strip())
    finally:
        child.stdin.close()
        child.wait(TIMEOUT)
    assert "change quiet" in lines
    assert any("inotify_overflow" in line for line in lines)
