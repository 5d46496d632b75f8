"""Several keepers: `[daemon] shard` / `--shard i/n` split the roots; flock scope warnings."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from tests.fusefs import fuse_available, passthrough_mount
from tests.helpers import CKPTKEEPER, write_checkpoint

from ckptkeeperd.config import ConfigError, config_from_flags, load_config, with_shard
from ckptkeeperd.lockscope import LockScopeWarner, lock_scope
from ckptkeeperd.roots import expand_roots
from ckptkeeperd.shard import Shard, parse_shard, shard_index


def test_parse_shard_accepts_i_of_n_and_says_what_is_wrong() -> None:
    assert parse_shard("2/5") == Shard(2, 5)
    for bad, why in [("5/5", "below n"), ("1/0", "at least 1"), ("a/b", '"i/n"'), ("3", '"i/n"')]:
        with pytest.raises(ValueError, match=why):
            parse_shard(bad)


def test_shard_index_is_stable_and_spreads_roots() -> None:
    # Fixed values: a keeper on another host or Python version must agree (no hash()).
    assert shard_index("/lustre/ckpt/run-a", 4) == shard_index("/lustre/ckpt/run-a", 4)
    assert shard_index("/lustre/ckpt/run-a", 1) == 0
    counts = [0] * 4
    for i in range(1000):
        counts[shard_index(f"/ckpt/run-{i}", 4)] += 1
    assert min(counts) > 200, counts


def test_config_shard_key_is_validated_with_file_and_key(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[daemon]\nshard = "1/3"\n[[root]]\npath = "/r"\n')
    assert load_config(good).daemon.shard == Shard(1, 3)
    bad = tmp_path / "bad.toml"
    bad.write_text('[daemon]\nshard = "3/3"\n[[root]]\npath = "/r"\n')
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "daemon.shard" in str(info.value) and "below n" in str(info.value)
    with pytest.raises(ConfigError, match="--shard"):
        with_shard(config_from_flags(["/r"], {}), "x/2")


def test_every_root_is_in_exactly_one_shard(tmp_path: Path) -> None:
    roots = [tmp_path / f"run-{i}" for i in range(40)]
    for root in roots:
        root.mkdir()
    config = config_from_flags(roots, {})
    seen: list[Path] = []
    for i in range(3):
        seen += [root for root, _ in expand_roots(with_shard(config, f"{i}/3"))]
    assert sorted(seen) == sorted(roots)


def test_sweep_processes_with_shards_split_the_roots(tmp_path: Path) -> None:
    """Three real `sweep --shard i/3` processes over 12 roots: each root pruned by one of them."""
    roots = []
    for i in range(12):
        root = tmp_path / f"run-{i}"
        for step in (1, 2, 3):
            write_checkpoint(root, step, {"loss": 1.0 / step}, final=True)
        roots.append(root)
    handled: list[str] = []
    for i in range(3):
        out = subprocess.run(
            [CKPTKEEPER, "sweep", *map(str, roots), "--keep-latest-n", "1", "--shard", f"{i}/3"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        events = [json.loads(line) for line in out.stdout.splitlines()]
        handled += [e["root"] for e in events if e["event"] == "deleted" and e["step"] == 1]
    assert sorted(handled) == sorted(map(str, roots))  # each root once, by its shard
    assert all(not (root / "step_1").exists() and (root / "step_3").exists() for root in roots)


_MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /lustre rw,relatime - lustre 10.0.0.1@o2ib:/fs rw,flock,lazystatfs
31 22 0:41 / /lustre-local rw,relatime - lustre 10.0.0.1@o2ib:/fs rw,localflock
32 22 0:42 / /lustre-none rw,relatime - lustre 10.0.0.1@o2ib:/fs rw,noflock
40 22 0:50 / /nfs rw,relatime - nfs4 srv:/export rw,vers=4.2,local_lock=none,addr=10.0.0.2
41 22 0:51 / /nfs-flock rw,relatime - nfs srv:/export rw,vers=3,local_lock=flock,addr=10.0.0.2
42 22 0:52 / /nfs-all rw,relatime - nfs srv:/export rw,vers=3,local_lock=all,addr=10.0.0.2
50 22 0:60 / /beegfs rw,relatime - beegfs beegfs_nodev rw,cfgFile=/etc/beegfs/c.conf
"""


@pytest.mark.parametrize(
    ("path", "scope"),
    [
        ("/lustre/run", "cluster"),
        ("/lustre-local/run", "local"),
        ("/lustre-none/run", "local"),
        ("/nfs/run", "cluster"),
        ("/nfs-flock/run", "local"),
        ("/nfs-all/run", "local"),
        ("/beegfs/run", "local"),
        ("/home/run", "node"),
    ],
)
def test_lock_scope_from_mount_options(path: str, scope: str) -> None:
    assert lock_scope(path, _MOUNTINFO).scope == scope


def test_lock_scope_warning_once_per_root() -> None:
    warner = LockScopeWarner(_MOUNTINFO)
    with capture_logs() as logs:
        from ckptkeeperd.logs import get_logger

        log = get_logger()
        for _ in range(3):
            warner.check("/nfs-flock/run", log)
            warner.check("/nfs/run", log)
            warner.check("/home/run", log)
    warned = [e for e in logs if e["event"] == "lock_scope"]
    assert [(e["root"], e["lock_scope"], e["log_level"]) for e in warned] == [
        ("/nfs-flock/run", "local", "warning")
    ]
    assert "local_lock=flock" in warned[0]["reason"]


@pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))
def test_sweep_warns_on_a_real_mount_with_node_local_flock(tmp_path: Path) -> None:
    """A real FUSE mount (flock handled by the kernel of this node unless the server says
    otherwise): the sweep process warns ``lock_scope=local`` once for the root."""
    source, mountpoint = tmp_path / "src", tmp_path / "mnt"
    (source / "run").mkdir(parents=True)
    mountpoint.mkdir()
    with passthrough_mount(source, mountpoint) as mnt:
        write_checkpoint(mnt / "run", 1, {"loss": 1.0}, final=True)
        out = subprocess.run(
            [CKPTKEEPER, "sweep", str(mnt / "run"), str(mnt / "run")],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    warned = [e for e in events if e["event"] == "lock_scope"]
    assert len(warned) == 1 and warned[0]["lock_scope"] == "local"
    assert warned[0]["fstype"] == "fuse.ckptpassthrough"


@pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))
def test_sweep_judges_each_filesystem_once_and_warns_for_each_of_its_roots(tmp_path: Path) -> None:
    """The scope is judged once per filesystem (st_dev) in a sweep: every root on the FUSE mount
    is warned about, none on the host's filesystem, whatever order they come in."""
    source, mountpoint = tmp_path / "src", tmp_path / "mnt"
    for name in ("run1", "run2"):
        (source / name).mkdir(parents=True)
    mountpoint.mkdir()
    host = [tmp_path / "host1", tmp_path / "host2"]
    for root in host:
        write_checkpoint(root, 1, {"loss": 1.0}, final=True)
    with passthrough_mount(source, mountpoint) as mnt:
        fused = [mnt / "run1", mnt / "run2"]
        for root in fused:
            write_checkpoint(root, 1, {"loss": 1.0}, final=True)
        order = [host[0], fused[0], host[1], fused[1]]
        out = subprocess.run(
            [CKPTKEEPER, "sweep", *map(str, order)], capture_output=True, text=True, timeout=60
        )
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    warned = [e["root"] for e in events if e["event"] == "lock_scope"]
    assert warned == [str(fused[0]), str(fused[1])]
