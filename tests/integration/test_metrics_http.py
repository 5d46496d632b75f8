"""The live daemon's metrics over HTTP: values move as checkpoints are finalized and deleted; the
default address answers on loopback only; a bad or busy address never stops the keeper."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.helpers import Daemon, wait_until, write_checkpoint

POLICY = ["--keep-top-k", "2", "--metric", "r", "--higher-is-better"]
DEFAULT_PORT = 9464


def scrape(address: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def serving(d: Daemon) -> str:
    return str(d.wait_for("metrics_serving")[0]["address"])


def test_live_daemon_metrics_move_with_finalize_and_delete(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    d = Daemon([str(root), *POLICY, "--sweep-interval", "1h"])
    daemons.append(d)
    d.wait_ready()
    address = serving(d)
    r = str(root)

    def get(name: str, **labels: str) -> float | None:
        return scrape(address).get((name, frozenset({"root": r, **labels}.items())))

    assert get("ckptkeeper_checkpoints", state="kept") == 0
    first_pass = get("ckptkeeper_last_pass_timestamp_seconds")
    assert first_pass is not None
    for step, reward in ((1, 0.5), (2, 0.9), (3, 0.1)):
        write_checkpoint(root, step, {"r": reward})
        d.wait_for("finalized", step=step)
    wait_until(
        lambda: get("ckptkeeper_actions_total", action="finalize") == 3,
        what="finalize counted",
    )
    # top-2 {1, 2} + latest 3, once the full pass that follows the marker's own has run
    wait_until(lambda: get("ckptkeeper_checkpoints", state="kept") == 3, what="kept gauge")
    assert get("ckptkeeper_actions_total", action="delete") == 0
    write_checkpoint(root, 4, {"r": 0.7})  # top-2 {2, 4}, latest 4: steps 1 and 3 go
    d.wait_for("deleted", step=1)
    d.wait_for("deleted", step=3)
    wait_until(
        lambda: get("ckptkeeper_actions_total", action="delete") == 2, what="deletes counted"
    )
    after = scrape(address)

    def at(name: str, **labels: str) -> float:
        return after[(name, frozenset(labels.items()))]

    assert at("ckptkeeper_checkpoints", root=r, state="kept") == 2
    assert at("ckptkeeper_checkpoints", root=r, state="delete_pending") == 0
    assert at("ckptkeeper_actions_total", root=r, action="finalize") == 4
    assert at("ckptkeeper_action_failures_total", root=r, action="delete") == 0
    assert at("ckptkeeper_freed_bytes_total", root=r) > 0
    assert at("ckptkeeper_finalize_latency_seconds_count") == 4
    assert at("ckptkeeper_pass_duration_seconds_count") >= 5
    assert at("ckptkeeper_last_pass_timestamp_seconds", root=r) > first_pass
    with urllib.request.urlopen(f"http://{address}/", timeout=5) as resp:
        assert resp.status == 200
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{address}/nothing", timeout=5)
    assert info.value.code == 404
    assert d.stop() == 0
    with pytest.raises(OSError):  # the endpoint went with the daemon
        urllib.request.urlopen(f"http://{address}/metrics", timeout=5)


def _own_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses."""
    ip = shutil.which("ip")
    if ip is None:
        return []
    out = subprocess.run([ip, "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            addr = fields[fields.index("inet") + 1].split("/")[0]
            if not addr.startswith("127."):
                found.append(addr)
    return found


@pytest.fixture
def other_interface() -> Iterator[str]:
    """A non-loopback address of this machine: an existing one, else one on a dummy link that
    this test creates and removes (traffic to it never leaves the machine)."""
    found = _own_addresses()
    if found:
        yield found[0]
        return
    ip = shutil.which("ip")
    if ip is None or os.geteuid() != 0:
        pytest.skip("only loopback here and cannot add a dummy interface (needs ip and root)")
    link, addr = f"ckm{os.getpid() % 100000}", f"10.200.{os.getpid() % 250}.1"
    made = subprocess.run([ip, "link", "add", link, "type", "dummy"], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a dummy interface: {made.stderr.decode().strip()}")
    try:
        subprocess.run([ip, "addr", "add", f"{addr}/32", "dev", link], check=True)
        subprocess.run([ip, "link", "set", link, "up"], check=True)
        yield addr
    finally:
        subprocess.run([ip, "link", "del", link], capture_output=True)


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except ConnectionRefusedError:
        return False


def test_default_address_is_loopback_only(
    tmp_path: Path, daemons: list[Daemon], other_interface: str
) -> None:
    # The probe can tell: a listener on every interface is reachable on that address.
    with socket.create_server(("0.0.0.0", 0)) as everywhere:  # noqa: S104 (on purpose)
        assert _connects(other_interface, everywhere.getsockname()[1])
    root = tmp_path / "run"
    root.mkdir()
    d = Daemon([str(root), *POLICY], metrics_address=None)  # no flag, no config: the default
    daemons.append(d)
    d.wait_ready()
    if d.find("metrics_unavailable"):
        reason = d.find("metrics_unavailable")[0]["reason"]
        pytest.skip(f"port {DEFAULT_PORT} is taken on this machine ({reason})")
    assert serving(d) == f"127.0.0.1:{DEFAULT_PORT}"
    assert _connects("127.0.0.1", DEFAULT_PORT)
    assert not _connects(other_interface, DEFAULT_PORT)
    assert ("ckptkeeper_build_info", frozenset({("version", "0.1.0")})) in scrape(
        f"127.0.0.1:{DEFAULT_PORT}"
    )
    assert d.stop() == 0


def test_busy_address_is_reported_and_the_keeper_goes_on(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        d = Daemon([str(root), *POLICY], metrics_address=f"127.0.0.1:{port}")
        daemons.append(d)
        d.wait_ready()
        event = d.find("metrics_unavailable")[0]
        assert event["address"] == f"127.0.0.1:{port}"
        assert event["reason"] == os.strerror(errno.EADDRINUSE)
        write_checkpoint(root, 1, {"r": 1.0})
        d.wait_for("finalized", step=1)  # keeping checkpoints does not depend on metrics
    assert d.stop() == 0


def test_metrics_address_from_config_can_be_turned_off_and_reloaded(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    config = tmp_path / "k.toml"
    config.write_text(f'[daemon]\nmetrics_address = ""\n[[root]]\npath = "{root}"\n')
    d = Daemon(["--config", str(config)], metrics_address=None)
    daemons.append(d)
    d.wait_ready()
    assert not d.find("metrics_serving") and not d.find("metrics_unavailable")
    config.write_text(
        f'[daemon]\nmetrics_address = "127.0.0.1:0"\nroot_labels = false\n'
        f'[[root]]\npath = "{root}"\n'
    )
    d.signal(signal.SIGHUP)
    d.wait_for("config_reloaded")
    address = serving(d)
    wait_until(
        lambda: ("ckptkeeper_checkpoints", frozenset({("state", "kept")})) in scrape(address),
        what="label-less series after the reload",
    )
    assert all("root" not in dict(labels) for _, labels in scrape(address))
    assert d.stop() == 0


def test_live_daemon_serves_the_status_page_at_the_root_path(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    root = tmp_path / "run<&>"  # shown escaped
    root.mkdir()
    for step, reward in ((1, 0.1), (2, 0.9), (3, 0.5)):  # step 1 goes
        write_checkpoint(root, step, {"r": reward}, final=True)
    d = Daemon([str(root), *POLICY, "--sweep-interval", "1h"])
    daemons.append(d)
    d.wait_ready()
    address = serving(d)
    d.wait_for("deleted", step=1)
    with urllib.request.urlopen(f"http://{address}/", timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        page = resp.read().decode()
    assert "run&lt;&amp;&gt;" in page and "run<&>" not in page
    assert "step_2" in page and "step_3" in page and "<svg" in page
    assert "<script" not in page
