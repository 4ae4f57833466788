"""The proxy's Prometheus ``/metrics`` endpoint, safe against idle and flooding clients.

- A connection gets `CONNECTION_TIMEOUT_S` per read or write, then it is
  closed; at most `MAX_CONNECTIONS` are served at once, more are closed at
  once (counted in `refused`).
- File descriptors: the soft limit is raised to the hard one at start, and
  one descriptor is held in reserve: when ``accept`` finds none left
  (EMFILE), the reserve is released, the waiting client accepted and closed
  at once, the reserve taken again, so the listener never spins and 0MQ
  keeps what it has. The forwarding loop never waits on this thread.
- A client that goes away is one debug line, never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .address import host_port
from .errors import ConfigError, SidecarError
from .proxy_sockets import AddressInUse

log = logging.getLogger("tiled_writer_sidecar.proxy")

CONNECTION_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 16


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


class _Handler(BaseHTTPRequestHandler):
    timeout = CONNECTION_TIMEOUT_S
    server: MetricsServer

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404)
            return
        body = generate_latest(self.server.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)


class MetricsServer(ThreadingHTTPServer):
    """A thread per connection, at most `MAX_CONNECTIONS`, each with a timeout (module doc)."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry) -> None:
        self.registry = registry
        self.refused = 0
        self.fd_exhausted = 0
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._reserve: int | None = None
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self._reserve = os.open(os.devnull, os.O_RDONLY)

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as err:
            if err.errno in (errno.EMFILE, errno.ENFILE) and self._reserve is not None:
                self.fd_exhausted += 1
                os.close(self._reserve)
                with contextlib.suppress(OSError):
                    sock, _ = self.socket.accept()
                    sock.close()
                self._reserve = os.open(os.devnull, os.O_RDONLY)
                if self.fd_exhausted == 1 or self.fd_exhausted % 1000 == 0:
                    log.warning(
                        "metrics: no file descriptor left, a client was closed (%d)", self.fd_exhausted
                    )
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics: client %s dropped", client_address)

    def server_close(self) -> None:
        super().server_close()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None


def start_metrics(address: str, registry: CollectorRegistry) -> MetricsServer:
    """Serve `registry` on ``HOST:PORT`` in a daemon thread; returns the server (`shutdown` it)."""
    bind = host_port(address)
    if bind is None:
        raise ConfigError(f"--metrics-address must be HOST:PORT, not {address!r}")
    try:
        server = MetricsServer(bind, registry)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise AddressInUse(f"--metrics-address {address}: address already in use") from None
        raise SidecarError(f"--metrics-address {address}: {err.strerror or err}") from None
    threading.Thread(target=server.serve_forever, name="proxy-metrics", daemon=True).start()
    return server
