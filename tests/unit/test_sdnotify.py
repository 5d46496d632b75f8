"""sd_notify client: datagrams reach a real AF_UNIX socket; failures never raise."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckptkeeperd.sdnotify import Notifier, watchdog_interval

RECV_TIMEOUT_S = 5.0


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer than that.
    with tempfile.TemporaryDirectory(prefix="sdn-") as d:
        yield Path(d)


@pytest.fixture
def listener(socket_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(socket_dir / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(RECV_TIMEOUT_S)
    try:
        yield sock, path
    finally:
        sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[tuple[socket.socket, str]]:
    name = f"ckptkeeper-test-{os.getpid()}-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(RECV_TIMEOUT_S)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def test_ready_sends_ready_datagram_to_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    with Notifier({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.enabled
        assert notifier.address == path
        assert notifier.ready() is True
        assert sock.recv(4096) == b"READY=1"


def test_abstract_socket_address_with_at_sign_is_reached(
    abstract_listener: tuple[socket.socket, str],
) -> None:
    sock, address = abstract_listener
    with Notifier({"NOTIFY_SOCKET": address}) as notifier:
        assert notifier.address == address
        assert notifier.watchdog() is True
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_joins_fields_with_newlines_in_one_datagram(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    with Notifier({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.notify(READY=1, STATUS="watching 3 roots", MAINPID=os.getpid())
        assert sock.recv(4096).decode() == (
            f"READY=1\nSTATUS=watching 3 roots\nMAINPID={os.getpid()}"
        )


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda n: n.ready(), b"READY=1"),
        (lambda n: n.ready("up"), b"READY=1\nSTATUS=up"),
        (lambda n: n.watchdog(), b"WATCHDOG=1"),
        (lambda n: n.status("pruned 4"), b"STATUS=pruned 4"),
        (lambda n: n.stopping(), b"STOPPING=1"),
        (lambda n: n.send("RELOADING=1"), b"RELOADING=1"),
    ],
)
def test_helpers_send_the_documented_assignments(
    listener: tuple[socket.socket, str], call: Callable[[Notifier], bool], expected: bytes
) -> None:
    sock, path = listener
    with Notifier({"NOTIFY_SOCKET": path}) as notifier:
        assert call(notifier) is True
        assert sock.recv(4096) == expected


def test_newline_in_status_cannot_inject_another_assignment(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    with Notifier({"NOTIFY_SOCKET": path}) as notifier:
        notifier.status("line one\nREADY=1")
        assert sock.recv(4096) == b"STATUS=line one READY=1"


def test_repeated_sends_reuse_one_socket_and_all_arrive(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    with Notifier({"NOTIFY_SOCKET": path}) as notifier:
        for _ in range(3):
            assert notifier.watchdog()
        assert [sock.recv(4096) for _ in range(3)] == [b"WATCHDOG=1"] * 3


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1"}])
def test_without_usable_notify_socket_every_call_is_a_quiet_no_op(environ: dict[str, str]) -> None:
    notifier = Notifier(environ)
    assert not notifier.enabled
    assert notifier.address is None
    assert notifier.ready() is False
    assert notifier.send("WATCHDOG=1") is False
    notifier.close()


def test_default_environment_is_os_environ(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with Notifier() as notifier:
        assert notifier.stopping()
        assert sock.recv(4096) == b"STOPPING=1"


def test_send_to_missing_socket_returns_false_instead_of_raising(socket_dir: Path) -> None:
    with Notifier({"NOTIFY_SOCKET": str(socket_dir / "gone")}) as notifier:
        assert notifier.ready() is False


def test_send_after_listener_closed_returns_false(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    with Notifier({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.ready()
        sock.close()
        os.unlink(path)
        assert notifier.watchdog() is False


def test_oversized_datagram_returns_false(listener: tuple[socket.socket, str]) -> None:
    _, path = listener
    with Notifier({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.status("x" * (8 * 1024 * 1024)) is False


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": ""}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(
    environ: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(environ) == expected


def test_watchdog_interval_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 2.0
