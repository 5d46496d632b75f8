"""The keeper's first pass runs several roots at a time (bench P9K: on a cold disk a pass mostly
waits for reads), even with ``[daemon] workers = 1``, and no root's first pass is skipped."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tests.fusefs import fuse_available, passthrough_mount
from tests.helpers import Daemon, steps, wait_until, write_checkpoint

_REASON = fuse_available()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"FUSE unavailable: {_REASON}")

ROOTS = 8
READ_LATENCY_S = 0.5  # every read(2) through the mount waits this long: a slow network server


def test_first_pass_overlaps_roots_and_skips_none(tmp_path: Path) -> None:
    source, mountpoint = tmp_path / "src", tmp_path / "mnt"
    for r in range(ROOTS):
        for step in (1, 2):
            write_checkpoint(source / f"run-{r}", step, final=True, files=0)
    mountpoint.mkdir()
    with passthrough_mount(
        source, mountpoint, op_latency_s=READ_LATENCY_S, latency_ops=("read",)
    ) as mnt:
        config = tmp_path / "ckptkeeper.toml"
        lines = ["[defaults]", "keep_latest_n = 1", 'observer = "polling"', "", "[daemon]"]
        lines += ["workers = 1", ""]
        for r in range(ROOTS):
            lines += ["[[root]]", f'path = "{mnt / f"run-{r}"}"', ""]
        config.write_text("\n".join(lines))
        started = time.monotonic()
        daemon = Daemon(["--config", str(config)])
        try:
            daemon.wait_ready(timeout=60.0)
            took = time.monotonic() - started
            ready = daemon.find("ready")
            assert ready and ready[-1]["first_pass_complete"] is True
            # Every root's first pass acted: step_1 went, step_2 stayed (none skipped).
            for r in range(ROOTS):
                assert wait_until(lambda r=r: steps(source / f"run-{r}") == {2}, timeout=10.0)
        finally:
            daemon.stop(timeout=30.0)
    # One root at a time, the passes alone would wait at least ROOTS * READ_LATENCY_S for
    # the training_info.json reads (two per root, one is enough for the bound).
    assert took < ROOTS * READ_LATENCY_S, f"first pass took {took:.1f} s: roots did not overlap"
