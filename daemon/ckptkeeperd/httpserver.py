"""The daemon's HTTP endpoint: ``GET /metrics`` (Prometheus text format) and ``GET /`` (a page).

``serve(address, metrics, page)`` binds ``host:port`` (`address.parse_address`) and answers on a
thread of its own until `Endpoint.close`. ``metrics`` renders the text format (e.g.
`KeeperMetrics.render`) and ``page`` the HTML of ``GET /``, both at each request; without a page,
``/`` says where the metrics are. Nothing else is served (404), nothing is written.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .address import parse_address
from .exposition import CONTENT_TYPE

__all__ = ["Endpoint", "open_endpoint", "serve"]

Page = Callable[[], bytes]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    metrics: Page
    page: Page | None
    log: Any


class _V6Server(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "ckptkeeper"
    sys_version = ""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                self._send(200, CONTENT_TYPE, self.server.metrics())
            elif path == "/" and self.server.page is not None:
                self._send(200, "text/html; charset=utf-8", self.server.page())
            elif path == "/":
                self._send(200, "text/plain; charset=utf-8", b"ckptkeeper: metrics at /metrics\n")
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: see /metrics\n")
        except Exception as exc:  # a rendering bug answers 500; the daemon goes on
            if self.server.log is not None:
                self.server.log.error("http_error", path=path, error=repr(exc))
            self._send(500, "text/plain; charset=utf-8", b"internal error\n")

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged (a scrape every 15 s would flood the event log)."""


class Endpoint:
    """A running server; ``address`` is what it is bound to (the real port when 0 was asked)."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="ckptkeeper-http"
        )
        self._thread.daemon = True
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        text = host.decode() if isinstance(host, bytes) else str(host)
        return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve(
    address: str,
    metrics: Page,
    page: Page | None = None,
    *,
    log: Any = None,
) -> Endpoint:
    """Serve ``metrics()`` on ``address`` (``"host:port"``); ``page()`` answers ``GET /``.

    Raises ValueError for a malformed address, OSError when it cannot be bound."""
    parsed = parse_address(address)
    if parsed is None:
        raise ValueError("no address: the endpoint is turned off")
    host, port = parsed
    kind = _V6Server if ":" in host else _Server
    server = kind((host, port), _Handler)
    server.metrics, server.page, server.log = metrics, page, log
    return Endpoint(server)


def open_endpoint(address: str, metrics: Page, page: Page | None, log: Any) -> Endpoint | None:
    """`serve` for the daemon: None when turned off (``""``) or when the address cannot be bound
    (logged as ``metrics_unavailable``: the keeper keeps checkpoints without it)."""
    if not address:
        return None
    try:
        endpoint = serve(address, metrics, page, log=log)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        log.warning("metrics_unavailable", address=address, reason=reason)
        return None
    log.info("metrics_serving", address=endpoint.address)
    return endpoint
