"""A real S3 HTTP endpoint on loopback for tests and benches: moto's server, and a small proxy.

`S3Endpoint` starts moto's `ThreadedMotoServer` on 127.0.0.1 at a free port and, in front of it,
`FaultProxy`: a threaded HTTP proxy (also on 127.0.0.1) that forwards every request to moto and
counts them by operation, and on demand answers some itself: a 503 ``SlowDown`` for the next n
requests of an operation, a ``DeleteObjects`` answer that reports every key as ``SlowDown``
(per-key throttling), a gate that holds ``DeleteObjects`` requests (to ``kill -9`` a keeper in the
middle of a multi-batch delete), or stripping ``If-None-Match``/``If-Match`` (a store that ignores
conditional writes). Only 127.0.0.1 is ever used.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "host"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def operation(method: str, target: str) -> str:
    parts = urlsplit(target)
    query, path = parts.query, parts.path.strip("/")
    if method == "POST" and re.search(r"(^|&)delete(=|&|$)", query):
        return "DeleteObjects"
    if "/" not in path:
        return {"GET": "ListObjects", "PUT": "CreateBucket", "HEAD": "HeadBucket"}.get(
            method, method
        )
    return {"GET": "GetObject", "PUT": "PutObject", "HEAD": "HeadObject"}.get(method, method) + (
        "" if method != "DELETE" else "Object"
    )


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.slowdown: Counter[str] = Counter()  # op -> how many 503 SlowDown still to send
        self.key_slowdown = 0  # DeleteObjects answers (not forwarded) with every key SlowDown
        self.strip_conditions = False
        self.hold_deletes_after: int | None = None  # DeleteObjects beyond this many are held
        self.release = threading.Event()
        self.held = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                proxy.handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def count(self, op: str) -> int:
        with self.lock:
            return self.counts[op]

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        op = operation(h.command, h.path)
        with self.lock:
            self.counts[op] += 1
            n = self.counts[op]
            throttle = self.slowdown[op] > 0
            if throttle:
                self.slowdown[op] -= 1
            per_key = op == "DeleteObjects" and self.key_slowdown > 0
            if per_key:
                self.key_slowdown -= 1
            hold = op == "DeleteObjects" and self.hold_deletes_after is not None
            hold = hold and n > (self.hold_deletes_after or 0)
            if hold:
                self.held += 1
        if throttle:
            return self.reply(h, 503, _error("SlowDown", "Please reduce your request rate."))
        if per_key:
            keys = re.findall(rb"<Key>(.*?)</Key>", body)
            errors = b"".join(
                b"<Error><Key>" + k + b"</Key><Code>SlowDown</Code><Message>slow</Message></Error>"
                for k in keys
            )
            return self.reply(h, 200, b"<DeleteResult>" + errors + b"</DeleteResult>")
        if hold:
            self.release.wait(60)
            return self.reply(h, 503, _error("SlowDown", "held by the test"))
        self.forward(h, body)

    def forward(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        if self.strip_conditions:
            headers = {
                k: v for k, v in headers.items() if k.lower() not in ("if-none-match", "if-match")
            }
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
        try:
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            h.send_response(resp.status)
            length = str(len(data))  # a HEAD has no body: its Content-Length is moto's
            for k, v in resp.getheaders():
                if k.lower() == "content-length" and h.command == "HEAD":
                    length = v
                elif k.lower() not in _HOP and k.lower() != "content-length":
                    h.send_header(k, v)
            h.send_header("Content-Length", length)
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
        finally:
            conn.close()

    def reply(self, h: BaseHTTPRequestHandler, status: int, data: bytes) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/xml")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        with contextlib.suppress(OSError):
            h.wfile.write(data)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _error(code: str, message: str) -> bytes:
    return (
        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
        f"<Message>{message}</Message></Error>"
    ).encode()


class S3Endpoint:
    """moto on 127.0.0.1 behind a `FaultProxy`; ``url`` is the proxy's."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.moto_port = free_port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.moto_port, verbose=False)
        self.moto.start()
        self.proxy = FaultProxy(self.moto_port)
        self.url = f"http://127.0.0.1:{self.proxy.port}"

    def env(self) -> dict[str, str]:
        """The environment of a keeper process that talks to this endpoint."""
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update(
            AWS_ENDPOINT_URL=self.url,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",  # noqa: S106 - moto dummy credentials
            AWS_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true",
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        )
        return env

    def client(self, direct: bool = False) -> Any:
        import boto3

        port = self.moto_port if direct else self.proxy.port
        return boto3.session.Session().client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",  # noqa: S106
            region_name="us-east-1",
        )

    def close(self) -> None:
        self.proxy.close()
        self.moto.stop()


@contextlib.contextmanager
def s3_endpoint() -> Iterator[S3Endpoint]:
    endpoint = S3Endpoint()
    try:
        yield endpoint
    finally:
        endpoint.close()
