"""``ckptkeeper sweep --jobs N`` (issue 9, item 3): local roots in forked workers, with the
output and exit code of one process; `ckptkeeperd.fanout` itself in real forked processes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import CKPTKEEPER, wait_until, write_checkpoint

FLAGS = ["--keep-top-k", "1", "--metric", "loss", "--lower-is-better", "--keep-latest-n", "1"]


def _fleet(base: Path, roots: int) -> list[Path]:
    out = []
    for r in range(roots):
        root = base / f"run-{r:02d}"
        for step in (1, 2, 3, 4):
            write_checkpoint(root, step, {"loss": (step * 7 + r) % 5}, final=step < 4)
        out.append(root)
    return out


def _sweep(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CKPTKEEPER, "sweep", *args], capture_output=True, text=True, timeout=120)


def _lines(stdout: str) -> list[dict[str, Any]]:
    """Log lines without what differs between two runs (times)."""
    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    for line in lines:
        for key in ("timestamp", "duration_ms", "removed_ms"):
            line.pop(key, None)
        if "trash_path" in line:  # named by the time of the move
            line["trash_path"] = line["trash_path"].rsplit("-", 1)[-1]
    return lines


def _doc(stdout: str) -> list[dict[str, Any]]:
    doc = json.loads(stdout)
    for root in doc["roots"]:
        root.pop("duration_ms")
        root.pop("free", None)  # the filesystem's free bytes, shared with everything else
        for o in root.get("outcomes", ()):
            o.pop("duration_ms", None)
    return list(doc["roots"])


def test_sweep_with_jobs_acts_and_prints_as_one_process(tmp_path: Path) -> None:
    """Same decisions, the same log lines in the same (root) order, the same JSON document and
    the same exit code (1: the last root, in the last worker's chunk, does not exist)."""
    results = {}
    for jobs in ("1", "3"):
        roots = _fleet(tmp_path / jobs, 9)
        missing = tmp_path / jobs / "zz-gone"  # a root that does not exist: an error, exit 1
        logs = _sweep("--jobs", jobs, *FLAGS, *map(str, roots), str(missing))
        assert logs.returncode == 1, logs.stderr
        kept = {r.name: sorted(p.name for p in r.glob("step_*")) for r in roots}
        results[jobs] = (_lines(logs.stdout.replace(f"/{jobs}/", "/X/")), kept)
    assert results["1"] == results["3"]
    events = [line["event"] for line in results["3"][0]]
    assert events.count("finalized") == 9 and "deleted" in events, events
    order = [line["root"] for line in results["3"][0] if "root" in line]
    assert order == sorted(order), "lines are in the order of the roots"


def test_a_sweep_with_jobs_opens_nothing_for_writing_outside_its_roots(tmp_path: Path) -> None:
    """The workers' output and results go through anonymous memory files, not /tmp."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install -y strace)")
    roots = _fleet(tmp_path / "fleet", 4)
    log = tmp_path / "trace.log"
    done = subprocess.run(
        [
            *(strace, "-f", "-qq", "-y", "-e", "trace=open,openat,creat", "-o", str(log)),
            *(CKPTKEEPER, "sweep", "--jobs", "2", *FLAGS, *map(str, roots)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0 and "PTRACE" in done.stderr.upper():
        pytest.skip(f"strace cannot trace here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count('"deleted"') >= 4, "the workers acted"
    written = [
        line
        for line in log.read_text().splitlines()
        if any(flag in line for flag in ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TMPFILE", "creat("))
    ]
    outside = [line for line in written if str(tmp_path / "fleet") not in line]
    assert written and outside == [], outside


def test_sweep_json_with_jobs_matches_one_process(tmp_path: Path) -> None:
    docs = {}
    for jobs in ("1", "2"):
        roots = _fleet(tmp_path / jobs, 5)
        proc = _sweep("--jobs", jobs, "--json", "--dry-run", *FLAGS, *map(str, roots))
        assert proc.returncode == 0, proc.stderr
        docs[jobs] = _doc(proc.stdout.replace(f"/{jobs}/", "/X/"))
    assert docs["1"] == docs["2"]
    assert [Path(r["root"]).name for r in docs["2"]] == [f"run-{i:02d}" for i in range(5)]


_CHILD = """
import os, signal, sys, time
from pathlib import Path
from ckptkeeperd.fanout import WorkerFailed, map_chunks
mode, where = sys.argv[1], Path(sys.argv[2])

def work(chunk):
    out = []
    for item in chunk:
        print(f"line {item}", flush=True)
        if mode == "kill" and item == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "raise" and item == 5:
            raise RuntimeError("worker broke")
        if mode == "parent" and item == 1:
            raise RuntimeError("parent broke")
        if mode == "wait" and item >= 2:
            (where / f"child-{os.getpid()}").touch()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(0.05)
        out.append(item * 10)
    return out

results = map_chunks(list(range(6)), 3, work)
print("results", [r if not isinstance(r, WorkerFailed) else "failed" for r in results])
"""


def _fanout(mode: str, where: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(where)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_fanout_keeps_the_order_of_output_and_results(tmp_path: Path) -> None:
    proc = _fanout("ok", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        *(f"line {i}" for i in range(6)),
        "results [0, 10, 20, 30, 40, 50]",
    ]


def test_a_worker_that_dies_fails_its_items_only(tmp_path: Path) -> None:
    """SIGKILL in the second chunk, an exception in the third: their items are failures (the
    caller reports them as errors), the first chunk's results stand, the output left is kept."""
    killed = _fanout("kill", tmp_path)
    assert killed.stdout.splitlines()[-1] == "results [0, 10, 'failed', 'failed', 40, 50]"
    assert "line 2\nline 3\n" in killed.stdout
    broke = _fanout("raise", tmp_path)
    assert broke.stdout.splitlines()[-1] == "results [0, 10, 20, 30, 'failed', 'failed']"
    assert "RuntimeError: worker broke" in broke.stderr


def test_when_the_parents_own_chunk_fails_the_workers_output_is_still_shown(
    tmp_path: Path,
) -> None:
    proc = _fanout("parent", tmp_path)
    assert proc.returncode == 1 and "RuntimeError: parent broke" in proc.stderr
    assert proc.stdout.splitlines() == [f"line {i}" for i in range(6)]


def test_sigterm_to_the_sweep_reaches_its_workers(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, "wait", str(tmp_path)])
    try:
        wait_until(lambda: len(list(tmp_path.glob("child-*"))) == 2, timeout=30, what="workers")
        pids = [int(p.name.split("-")[1]) for p in tmp_path.glob("child-*")]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
        wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=30, what="workers gone")
    finally:
        proc.kill()
        proc.wait()


def _alive(pid: int) -> bool:
    """Running (a zombie not yet reaped by its new parent counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def test_default_jobs_is_the_cpus_this_process_may_use() -> None:
    code = "from ckptkeeperd.fanout import default_jobs; print(default_jobs())"
    out = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.strip() == "1"
