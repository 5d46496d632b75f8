"""Disk pressure on a real small filesystem (DESIGN section 13): a 64 MiB tmpfs mounted by the
test (skipped, naming the reason, where mounting is not allowed), a real ``ckptkeeper run`` with
``--min-free 30%``, and a simulated daemon-mode trainer writing 10 MiB checkpoints into it.

The trainer saves once per keeper pass: after each marker it waits for the keeper's ``finalized``
event of that step and the end of that pass (``pass_done``), as a trainer that computes between
saves would give the keeper time to. Asserted: the trainer never meets ENOSPC while a deletable
checkpoint exists; after every pass the free space is back at ``min_free`` or only protected
checkpoints are left; pinned, best and milestone steps and the latest are never deleted; and the
keeper deleted beyond its other rules (``keep_top_k 3``) because of pressure, saying so.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from tests.helpers import Daemon, wait_until
from tests.smallfs import small_tmpfs

from ckptkeeper import write_marker

MiB = 1024 * 1024
SAVE_FILES, FILE_BYTES = 5, 2 * MiB  # 10 MiB per checkpoint
STEPS, PINNED, BEST, EVERY = 20, 2, 3, 10


def val_loss(step: int) -> float:
    return 0.01 if step == BEST else round(0.2 + ((step * 37) % 11) / 20, 3)


def protected(on_disk: set[int]) -> set[int]:
    """Section 13's protected set, independently: pinned, best, milestones, the latest."""
    out = {s for s in on_disk if s in (PINNED, BEST) or s % EVERY == 0}
    return out | ({max(on_disk)} if on_disk else set())


def steps_on_disk(root: Path) -> set[int]:
    return {int(p.name[5:]) for p in root.iterdir() if p.name.startswith("step_")}


def save(root: Path, step: int) -> str | None:
    """Write one checkpoint like a daemon-mode trainer; the error if a write failed."""
    tmp = root / f"tmp_step_{step}"
    try:
        (tmp / "policy").mkdir(parents=True)
        for i in range(SAVE_FILES):
            with open(tmp / "policy" / f"shard_{i}.bin", "wb") as fh:
                fh.write(os.urandom(FILE_BYTES))
        (tmp / "training_info.json").write_text(
            json.dumps({"step": step, "val_loss": val_loss(step)})
        )
        if step == PINNED:
            (tmp / "KEEP").touch()
        write_marker(tmp, ".complete")
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return None


def pass_done_after(daemon: Daemon, step: int) -> bool:
    """The keeper finished the pass that finalized ``step``."""
    events: list[dict[str, Any]] = list(daemon.events)
    marks = [
        i for i, e in enumerate(events) if e.get("event") == "finalized" and e.get("step") == step
    ]
    return bool(marks) and any(e.get("event") == "pass_done" for e in events[marks[0] :])


def free_and_target(root: Path) -> tuple[int, int]:
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize, -(-st.f_blocks * st.f_frsize * 30 // 100)


def test_trainer_never_meets_enospc_while_deletable_checkpoints_exist(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "fs", "64m") as fs:
        root = fs / "run"
        root.mkdir()
        daemon = Daemon(
            [
                *(str(root), "--metric", "val_loss", "--lower-is-better", "--keep-top-k", "3"),
                *("--keep-every-n-steps", str(EVERY), "--min-free", "30%", "--log-level", "debug"),
            ]
        )
        try:
            daemon.wait_ready()
            for step in range(1, STEPS + 1):
                before = steps_on_disk(root)
                failed = save(root, step)
                deletable = before - protected(before)
                assert failed is None or not deletable, (step, failed, "deletable:", deletable)
                if failed is not None:
                    break
                wait_until(lambda s=step: pass_done_after(daemon, s), 30, what=f"pass of {step}")
                on_disk = steps_on_disk(root)
                free, target = free_and_target(root)
                kept_up = free >= target or on_disk <= protected(on_disk)
                assert kept_up, (step, free, target, on_disk)
            on_disk = steps_on_disk(root)
            assert daemon.stop() == 0
        finally:
            daemon.kill()  # before the unmount (a no-op once stopped)
    assert {PINNED, BEST, EVERY, 2 * EVERY} <= on_disk
    deleted = daemon.find("deleted")
    assert not {e["step"] for e in deleted} & {PINNED, BEST, EVERY, 2 * EVERY}
    pressured = [e for e in deleted if e["reason"].startswith("disk pressure: ")]
    assert len(pressured) >= 5, [e["reason"] for e in deleted]
    # beyond keep_top_k: some of them were in the top 3 when deleted
    assert any("otherwise kept: top-3 by val_loss" in e["reason"] for e in pressured)
