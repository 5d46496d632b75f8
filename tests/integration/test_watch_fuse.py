"""observer=auto on a FUSE mount (our stand-in for NFS/Lustre): it must poll, and polling must see
what another host writes behind the mount, which inotify on this host never would."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from tests.fusefs import fuse_available, passthrough_mount

from ckptkeeperd.fstype import filesystem_type
from ckptkeeperd.watch import RootWatcher, resolve_observer

_REASON = fuse_available()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"FUSE unavailable: {_REASON}")


def test_auto_picks_polling_for_a_root_under_a_fuse_mount(tmp_path: Path) -> None:
    source, mountpoint = tmp_path / "src", tmp_path / "mnt"
    source.mkdir()
    mountpoint.mkdir()
    with passthrough_mount(source, mountpoint) as mnt:
        root = mnt / "run"
        root.mkdir()
        assert filesystem_type(root) == "fuse.ckptpassthrough"
        assert resolve_observer(root, "auto") == "polling"
        assert resolve_observer(root, "inotify") == "inotify"  # an explicit setting is kept
    assert resolve_observer(tmp_path, "auto") == "inotify"  # the same dir outside the mount


def test_polling_sees_a_marker_written_behind_the_mount(tmp_path: Path) -> None:
    source, mountpoint = tmp_path / "src", tmp_path / "mnt"
    (source / "run" / "tmp_step_3").mkdir(parents=True)
    mountpoint.mkdir()
    changed = threading.Condition()
    changes: list[Path] = []

    def on_change(root: Path) -> None:
        with changed:
            changes.append(root)
            changed.notify_all()

    with passthrough_mount(source, mountpoint) as mnt:
        root = mnt / "run"
        w = RootWatcher(on_change, debounce=0.05, polling_interval=0.2)
        try:
            w.set_roots({root: resolve_observer(root, "auto")})
            w.set_in_flight(root, [root / "tmp_step_3"])
            with changed:  # the new tmp watch triggers its root once; take that first
                assert changed.wait_for(lambda: root in changes, 10)
                changes.clear()
            # "Another host": written on the server side, not through this mount.
            (source / "run" / "tmp_step_3" / ".complete").write_text("{}")
            with changed:
                assert changed.wait_for(lambda: root in changes, 10)
        finally:
            w.stop()
