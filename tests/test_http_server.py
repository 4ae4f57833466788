"""`BoundedHTTPServer`'s contract, each bound with real sockets: connections over the cap are refused and
counted, a silent client is dropped after the read timeout, a trickling one at the deadline, and with no
descriptor left the waiting client is closed with the reserve descriptor."""

from __future__ import annotations

import logging
import os
import resource
import socket
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest

from tiled_writer_sidecar.http_server import BoundedHTTPServer
from tiled_writer_sidecar.testing import wait_until


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


def _server(**bounds: Any) -> BoundedHTTPServer:
    bounds.setdefault("max_connections", 2)
    return BoundedHTTPServer(("127.0.0.1", 0), _Hello, name="test-http", **bounds)


@pytest.fixture
def serving() -> Iterator[BoundedHTTPServer]:
    server = _server(read_timeout_s=30.0, deadline_s=60.0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _half_sent(port: int) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port), timeout=30)
    client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # no end of headers: the handler waits
    return client


def _closed_by_server(client: socket.socket) -> bool:
    """True once the server closed `client` (end of stream or reset); blocks up to the client's timeout."""
    try:
        return client.recv(1024) == b""
    except ConnectionResetError:
        return True


def _get(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/", timeout=30).text


def test_a_connection_over_the_cap_is_closed_at_once_and_counted(serving: BoundedHTTPServer) -> None:
    held = [_half_sent(serving.port) for _ in range(2)]  # accepted first: the listen queue is in order
    try:
        third = _half_sent(serving.port)
        with third:
            assert _closed_by_server(third)
        assert serving.refused == 1
    finally:
        for client in held:
            client.close()
    assert wait_until(lambda: _get(serving.port), 30, what="a slot free again") == "hello\n"
    assert serving.refused == 1


def test_a_silent_client_is_dropped_after_the_read_timeout() -> None:
    server = _server(read_timeout_s=0.3, deadline_s=60.0)
    server.start()
    try:
        with _half_sent(server.port) as client:
            started = time.monotonic()
            assert _closed_by_server(client)
            assert time.monotonic() - started < 20  # the 30 s client timeout did not expire first
        assert _get(server.port) == "hello\n"
    finally:
        server.stop()


def test_a_trickling_client_is_hung_up_at_the_deadline() -> None:
    """One byte every 0.1 s never lets the 30 s read timeout expire; the 0.5 s deadline ends it."""
    server = _server(read_timeout_s=30.0, deadline_s=0.5)
    server.start()
    try:
        with _half_sent(server.port) as client:
            client.settimeout(0.05)
            started = time.monotonic()
            hung_up = False
            while not hung_up and time.monotonic() - started < 20:
                try:
                    client.sendall(b"X")
                    hung_up = client.recv(1024) == b""
                except TimeoutError:
                    time.sleep(0.05)
                except (BrokenPipeError, ConnectionResetError):
                    hung_up = True
            assert hung_up
    finally:
        server.stop()


def test_with_no_descriptor_left_the_waiting_client_is_closed_with_the_reserve(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`accept` fails with EMFILE (the soft limit lowered to the descriptors open): the server releases
    its reserve descriptor, accepts and closes the client, takes the reserve back; then serves again."""
    server = _server()
    client = socket.create_connection(("127.0.0.1", server.port), timeout=30)  # queued, not yet accepted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open(os.devnull, os.O_RDONLY)
    os.close(lowest_free)
    try:
        with caplog.at_level(logging.WARNING, logger="tiled_writer_sidecar.http_server"):
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no new descriptor now
            try:
                server.handle_request()
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert server.fd_exhausted == 1
        assert server._reserve is not None
        assert "test-http: no file descriptor left, a client was closed (1)" in caplog.text
        with client:
            assert _closed_by_server(client)
        server.start()
        assert _get(server.port) == "hello\n"
    finally:
        server.stop()
