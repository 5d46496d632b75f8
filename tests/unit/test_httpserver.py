"""The endpoint the daemon serves: /metrics from a render callable, / from an optional page (the
status page plugs in here), 404 elsewhere, 500 for a page that raises; loopback by default."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest
from structlog.testing import capture_logs

from ckptkeeperd.address import DEFAULT_METRICS_ADDRESS, parse_address
from ckptkeeperd.httpserver import open_endpoint, serve
from ckptkeeperd.logs import get_logger


def fetch(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (http://127.0.0.1)
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_metrics_page_and_not_found() -> None:
    calls: list[str] = []

    def page() -> bytes:
        calls.append("page")
        return b"<html>roots</html>"

    endpoint = serve("127.0.0.1:0", lambda: b"ckptkeeper_up 1.0\n", page)
    try:
        base = f"http://{endpoint.address}"
        assert fetch(f"{base}/metrics") == (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            b"ckptkeeper_up 1.0\n",
        )
        assert fetch(f"{base}/?refresh=1") == (
            200,
            "text/html; charset=utf-8",
            b"<html>roots</html>",
        )
        assert calls == ["page"]  # rendered per request
        assert fetch(f"{base}/other")[0] == 404
    finally:
        endpoint.close()


def test_without_a_page_root_points_to_metrics() -> None:
    endpoint = serve("127.0.0.1:0", lambda: b"")
    try:
        code, _, body = fetch(f"http://{endpoint.address}/")
        assert code == 200 and b"/metrics" in body
    finally:
        endpoint.close()


def test_a_page_that_raises_is_a_500_and_the_server_goes_on() -> None:
    def broken() -> bytes:
        raise RuntimeError("template bug")

    with capture_logs() as logs:
        endpoint = serve("127.0.0.1:0", lambda: b"ok 1.0\n", broken, log=get_logger())
        try:
            base = f"http://{endpoint.address}"
            assert fetch(f"{base}/")[0] == 500
            assert fetch(f"{base}/metrics")[0] == 200
        finally:
            endpoint.close()
    errors = [e for e in logs if e["event"] == "http_error"]
    assert errors and errors[0]["path"] == "/" and "template bug" in errors[0]["error"]


def test_close_frees_the_port() -> None:
    endpoint = serve("127.0.0.1:0", lambda: b"")
    port = int(endpoint.address.rsplit(":", 1)[1])
    endpoint.close()
    with socket.create_server(("127.0.0.1", port)):
        pass  # bindable again


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        endpoint = serve("[::1]:0", lambda: b"six 1.0\n")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc.strerror}")
    try:
        assert endpoint.address.startswith("[::1]:")
        assert fetch(f"http://{endpoint.address}/metrics")[2] == b"six 1.0\n"
    finally:
        endpoint.close()


def test_open_endpoint_is_off_for_empty_and_reports_a_bind_failure() -> None:
    with capture_logs() as logs:
        assert open_endpoint("", lambda: b"", None, get_logger()) is None
        assert not logs
        with socket.create_server(("127.0.0.1", 0)) as taken:
            address = f"127.0.0.1:{taken.getsockname()[1]}"
            assert open_endpoint(address, lambda: b"", None, get_logger()) is None
    assert [e["event"] for e in logs] == ["metrics_unavailable"]
    assert logs[0]["address"] == address and logs[0]["log_level"] == "warning"


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("", None),
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9464", ("::1", 9464)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),  # noqa: S104 (written out: allowed)
    ],
)
def test_parse_address(text: str, parsed: tuple[str, int] | None) -> None:
    assert parse_address(text) == parsed


def test_default_address_is_loopback() -> None:
    assert parse_address(DEFAULT_METRICS_ADDRESS) == ("127.0.0.1", 9464)
