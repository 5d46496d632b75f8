"""``host:port`` addresses of the daemon's HTTP endpoint (``[daemon] metrics_address``)."""

from __future__ import annotations

__all__ = ["DEFAULT_METRICS_ADDRESS", "parse_address"]

#: Loopback only: metrics and the status page name every root; exposing them is a choice.
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9464"


def parse_address(text: str) -> tuple[str, int] | None:
    """``"host:port"`` (``"[v6]:port"`` for IPv6) as ``(host, port)``; None for ``""`` (off).

    Port 0 binds a free port. An empty host is refused rather than read as "every interface":
    ``0.0.0.0`` must be written out. Raises ValueError with the reason.
    """
    if text == "":
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError('expected "host:port" (e.g. "127.0.0.1:9464"), or "" to turn it off')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError('an IPv6 host goes in brackets: "[::1]:9464"')
    if not host:
        raise ValueError('no host: write "0.0.0.0:PORT" to listen on every interface')
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {port_text!r}")
    return host, int(port_text)
