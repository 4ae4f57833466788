"""An HTTP proxy in front of a real Tiled that breaks chosen appends (see `FaultyTiled`).

Actions: ``locked`` (Tiled itself answers 500 "database is locked": the
proxy holds an exclusive lock on its SQLite tables while forwarding),
``lost`` (applied, answer replaced by a 500), ``proxy_timeout`` (not
forwarded, 504), ``refuse`` (not forwarded, 500: a Tiled that fails
that run's appends while it answers everything else), ``dropped`` (not
forwarded, the connection closed without an answer: a Tiled stopping as
the request arrives) and ``dropped_applied`` (forwarded and applied, then
the connection closed without an answer: a Tiled killed after its commit).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from tiled_writer_sidecar.testing import TiledServer
from tiled_writer_sidecar.testing.ports import LOCALHOST

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}


@dataclass
class Fault:
    """Make the `nth` (1-based; 0: every) append whose URL contains `where` fail with `action`."""

    action: str
    nth: int = 2
    where: str = ""
    seen: int = 0
    fired: int = 0


@dataclass
class FaultyTiled:
    """An HTTP proxy to `upstream` that breaks the appends `faults` name (see the module docstring)."""

    upstream: TiledServer
    faults: list[Fault] = field(default_factory=list)
    appends: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._http = httpx.Client(base_url=self.upstream.uri, timeout=60)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                answer = proxy.handle(self.command, self.path, dict(self.headers), body)
                if answer is None:  # dropped: close the connection without a response
                    self.close_connection = True
                    return
                status, headers, content = answer
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = do_HEAD = _any  # noqa: N815 - http.server names

        self._server = ThreadingHTTPServer((LOCALHOST, 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"http://{LOCALHOST}:{self._server.server_address[1]}"

    def _fault_for(self, method: str, path: str) -> Fault | None:
        if method != "PATCH" or "/table/partition/" not in path:
            return None
        with self._lock:
            self.appends += 1
            for fault in self.faults:
                if fault.where in path:
                    fault.seen += 1
                    if fault.seen == fault.nth or fault.nth == 0:
                        fault.fired += 1
                        return fault
        return None

    def handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes] | None:
        """The answer to send, or None to close the connection without one."""
        fault = self._fault_for(method, path)
        forward = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
        if fault is not None and fault.action == "dropped":
            return None
        if fault is not None and fault.action == "proxy_timeout":
            return 504, [("Content-Type", "text/plain")], b"Gateway Timeout"
        if fault is not None and fault.action == "refuse":
            return 500, [("Content-Type", "text/plain")], b"Internal Server Error"
        if fault is not None and fault.action == "locked":
            with sqlite3.connect(self.upstream.tables_path, timeout=30) as db:
                db.execute("BEGIN EXCLUSIVE")
                response = self._http.request(method, path, headers=forward, content=body)
                db.rollback()
            assert response.status_code == 500, response.text  # server.log: "database is locked"
        else:
            response = self._http.request(method, path, headers=forward, content=body)
        if fault is not None and fault.action == "lost":
            return 500, [("Content-Type", "text/plain")], b"Internal Server Error"
        if fault is not None and fault.action == "dropped_applied":
            return None
        kept = [(k, v) for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP]
        return response.status_code, kept, response.content

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.close()
