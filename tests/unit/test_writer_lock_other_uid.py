"""A writer lock the keeper cannot open is "maybe held": the save is kept and the plan says why.

Three real users: the trainer (owns ``tmp_step_5/.writer.lock``, mode 0600, and holds it), the
keeper (another uid sharing the run's group, so it could collect the save) and root, which only
builds the tree (root ignores permission bits, so neither side may be root). The keeper runs
scan -> plan -> apply as its own uid, with a clock ``AHEAD`` of the files' ctimes so the save is
stale but for its lock. Each side is a forked child that drops to its uid (``setresuid``: no way
back), so the library under test is this process's.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest

from ckptkeeper import Policy, apply_plan, plan, scan_root

TRAINER, KEEPER, GROUP = 4242, 4243, 4244
STALE_AFTER = 3600.0
AHEAD = 2 * STALE_AFTER
GROUP_DIR = 0o2770  # the run's group (the keeper's too) may write: it could collect the save
WHY = "writer lock unreadable (Permission denied): treated as held"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to create files of other uids and switch to them"
)


class AsUser:
    """``fn(inbox, outbox)`` run in a forked child under another uid (real, effective and saved:
    no way back to root), talking to the test over two pipes of text lines."""

    def __init__(self, uid: int, groups: list[int], fn: Callable[[TextIO, TextIO], None]) -> None:
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                os.close(down_w)
                os.close(up_r)
                os.setgroups(groups)
                os.setresgid(GROUP, GROUP, GROUP)
                os.setresuid(uid, uid, uid)
                with os.fdopen(down_r) as inbox, os.fdopen(up_w, "w") as outbox:
                    fn(inbox, outbox)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(down_r)
        os.close(up_w)
        self.pid = pid
        self.outbox = os.fdopen(up_r)
        self.inbox = os.fdopen(down_w, "w")

    def read(self) -> Any:
        line = self.outbox.readline()
        assert line, "the child exited early (its traceback is in the captured stderr)"
        return json.loads(line)

    def send(self, line: str) -> None:
        self.inbox.write(line + "\n")
        self.inbox.flush()

    def wait(self) -> int:
        self.inbox.close()
        _, status = os.waitpid(self.pid, 0)
        self.outbox.close()
        return os.waitstatus_to_exitcode(status)


def _keeper(run: Path, pause: bool, inbox: TextIO, outbox: TextIO) -> None:
    """The keeper's side: scan, plan with a clock AHEAD, report the plan; with ``pause``, wait
    for a line before applying it (the test changes the lock in between); apply; report."""
    policy = Policy(stale_after=STALE_AFTER)
    now = time.time() + AHEAD
    scan = scan_root(run, stale_before=now - policy.stale_after)
    p = plan(scan, policy, now)
    doc = {
        "uid": os.geteuid(),
        "in_flight": [
            [t.path.name, t.writer_locked, getattr(t, "writer_lock_unreadable", None)]
            for t in scan.in_flight
        ],
        "decisions": [[d.path.name, d.action.value, list(d.reasons)] for d in p],
    }
    outbox.write(json.dumps(doc) + "\n")
    outbox.flush()
    if pause:
        inbox.readline()
    outcomes = apply_plan(p)
    outbox.write(json.dumps([[o.decision.path.name, o.status, o.detail] for o in outcomes]) + "\n")


def _hold(lock: Path, inbox: TextIO, outbox: TextIO) -> None:
    """The trainer's side: hold flock(LOCK_EX) on its lock until told to stop."""
    fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
    fcntl.flock(fd, fcntl.LOCK_EX)
    outbox.write('"locked"\n')
    outbox.flush()
    inbox.readline()


@pytest.fixture
def root() -> Iterator[Path]:
    """A run directory of the trainer, writable by its group (the keeper's too), reachable by
    other uids (pytest's own tmp_path is under a root-only 0700 directory)."""
    base = Path(tempfile.mkdtemp(prefix="ckptkeeper-lock-uid-"))
    try:
        base.chmod(0o755)
        run = base / "run"
        run.mkdir()
        save = run / "tmp_step_5"
        (save / "policy").mkdir(parents=True)
        (save / "policy" / "shard_0.bin").write_bytes(b"w" * 4096)
        (save / "training_info.json").write_text(json.dumps({"step": 5}))
        for dirpath, dirnames, filenames in os.walk(run):
            for name in [*dirnames, *filenames]:
                path = os.path.join(dirpath, name)
                os.chown(path, TRAINER, GROUP)
                os.chmod(path, GROUP_DIR if name in dirnames else 0o660)
        os.chown(run, TRAINER, GROUP)
        os.chmod(run, GROUP_DIR)
        yield run
    finally:
        shutil.rmtree(base, ignore_errors=True)


def make_lock(run: Path, mode: int) -> Path:
    lock = run / "tmp_step_5" / ".writer.lock"
    lock.touch()
    os.chown(lock, TRAINER, GROUP)
    os.chmod(lock, mode)
    return lock


class Holder:
    """The trainer's process, holding flock(LOCK_EX) on the lock as the trainer's uid."""

    def __init__(self, lock: Path) -> None:
        self.child = AsUser(TRAINER, [], functools.partial(_hold, lock))
        assert self.child.read() == "locked", "the trainer could not take its lock"

    def release(self) -> None:
        assert self.child.wait() == 0


def keeper(run: Path, *, pause: bool = False) -> AsUser:
    return AsUser(KEEPER, [GROUP], functools.partial(_keeper, run, pause))


def keeper_pass(run: Path) -> tuple[dict[str, Any], list[list[Any]]]:
    child = keeper(run)
    planned, applied = child.read(), child.read()
    assert child.wait() == 0
    return planned, applied


def tmp_decision(planned: dict[str, Any]) -> tuple[str, list[str]]:
    (found,) = [(a, r) for name, a, r in planned["decisions"] if name == "tmp_step_5"]
    return found


@pytest.mark.parametrize("held", [True, False], ids=["held", "not_held"])
def test_another_users_0600_writer_lock_keeps_the_save(root: Path, held: bool) -> None:
    lock = make_lock(root, 0o600)
    holder = Holder(lock) if held else None
    try:
        planned, applied = keeper_pass(root)
    finally:
        if holder is not None:
            holder.release()
    assert planned["uid"] == KEEPER
    assert planned["in_flight"] == [["tmp_step_5", True, "Permission denied"]]
    action, reasons = tmp_decision(planned)
    assert action == "wait"
    assert reasons[0] == WHY and reasons[1].startswith("no marker, untouched for 2.0h")
    assert applied == []
    assert (root / "tmp_step_5" / "policy" / "shard_0.bin").exists()


@pytest.mark.parametrize("held", [True, False], ids=["held", "not_held"])
def test_a_readable_writer_lock_is_probed_as_usual(root: Path, held: bool) -> None:
    """The same save with a lock the keeper can open: kept while held, collected once not
    (so the keeper could collect it above: only the unreadable lock kept it)."""
    lock = make_lock(root, 0o644)
    holder = Holder(lock) if held else None
    try:
        planned, applied = keeper_pass(root)
    finally:
        if holder is not None:
            holder.release()
    action, reasons = tmp_decision(planned)
    if held:
        assert (action, reasons, applied) == ("wait", ["writer lock held"], [])
        assert (root / "tmp_step_5").is_dir()
    else:
        assert action == "collect" and "stale" in reasons[0]
        assert [(name, status) for name, status, _ in applied] == [("tmp_step_5", "done")]
        assert not (root / "tmp_step_5").exists()


def test_a_lock_turned_unreadable_after_the_plan_is_rechecked_before_collecting(
    root: Path,
) -> None:
    child = keeper(root, pause=True)
    try:
        planned = child.read()
        assert tmp_decision(planned)[0] == "collect"  # no lock file at all when planned
        holder = Holder(make_lock(root, 0o600))
        try:
            child.send("apply")
            applied = child.read()
        finally:
            holder.release()
    finally:
        assert child.wait() == 0
    assert applied == [["tmp_step_5", "skipped", WHY]]
    assert (root / "tmp_step_5" / "policy" / "shard_0.bin").exists()


def _open_lock(lock: Path, inbox: TextIO, outbox: TextIO) -> None:
    try:
        os.close(os.open(lock, os.O_RDONLY))
        outbox.write('"opened"\n')
    except PermissionError:
        outbox.write('"EACCES"\n')


def test_the_keeper_side_is_not_root(root: Path) -> None:
    """The premise of the tests above: as the keeper's uid the lock really cannot be opened."""
    child = AsUser(KEEPER, [GROUP], functools.partial(_open_lock, make_lock(root, 0o600)))
    assert child.read() == "EACCES"
    assert child.wait() == 0
