"""The proxy's Prometheus ``/metrics`` endpoint, safe against idle and flooding clients.

Served by `http_server.BoundedHTTPServer` (its docstring states the bounds: per-read and total
timeouts, at most `MAX_CONNECTIONS` at once and the rest refused, a reserve descriptor for when
none is left). The soft file-descriptor limit is raised to the hard one at start
(`raise_fd_limit`), so 0MQ keeps what it has; the forwarding loop never waits on this thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import resource
from http.server import BaseHTTPRequestHandler
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tiled_writer_sidecar.address import host_port
from tiled_writer_sidecar.errors import ConfigError, SidecarError
from tiled_writer_sidecar.http_server import BoundedHTTPServer
from tiled_writer_sidecar.tools.proxy.sockets import AddressInUse

log = logging.getLogger("tiled_writer_sidecar.proxy")

#: Connections served at once; more are refused (`http_server`).
MAX_CONNECTIONS = 16


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def _handler(registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    """A request handler serving `registry` on ``/metrics`` (404 elsewhere)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404)
                return
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("metrics: " + format, *args)

    return Handler


def start_metrics(address: str, registry: CollectorRegistry) -> BoundedHTTPServer:
    """Serve `registry` on ``HOST:PORT`` in a daemon thread; returns the server (`stop` it)."""
    bind = host_port(address)
    if bind is None:
        raise ConfigError(f"--metrics-address must be HOST:PORT, not {address!r}")
    try:
        server = BoundedHTTPServer(
            bind, _handler(registry), name="proxy-metrics", max_connections=MAX_CONNECTIONS
        )
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise AddressInUse(f"--metrics-address {address}: address already in use") from None
        raise SidecarError(f"--metrics-address {address}: {err.strerror or err}") from None
    server.start()
    return server
