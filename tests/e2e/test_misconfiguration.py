"""Wrong settings are loud: one clear log line within seconds and a state of their own (issue 21).

Real daemons with a wrong setting each: a `[tiled] uri` that answers HTTP
but is not Tiled (a plain web server recording what it is sent), a wrong API
key for a real Tiled server, and a `[zmq] address` where nothing listens.
Each must show, within a deadline counted from the start: its log line,
its state in ``/healthz`` (degraded, HTTP 200), ``/metrics``
(``tiled_state``, ``proxy_connected``), ``status --json`` and
``status --check`` (Nagios exit code).
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

import tiled_writer_sidecar
from tiled_writer_sidecar.testing import (
    TiledServer,
    ZmqProxy,
    free_port,
    wait_until,
)
from tiled_writer_sidecar.testing.ports import LOCALHOST
from tiled_writer_sidecar.testing.sidecar import SidecarProcess, sidecar_command

#: From the daemon's start: the uploader child first imports Tiled's client, pandas, pyarrow (~8 s of
#: CPU; 45 s measured at load 11 on 2 cores); the line follows within a second of that.
DEADLINE_S = 120.0


class NotTiled:
    """A web server on a free port that answers every GET with an HTML 404; records (path, User-Agent)."""

    def __init__(self) -> None:
        requests = self.requests = []  # type: list[tuple[str, str]]

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append((self.path, self.headers.get("User-Agent", "")))
                body = b"<html><body>not found</body></html>"
                self.send_response(404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer((LOCALHOST, free_port()), Handler)
        self.uri = f"http://{LOCALHOST}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def not_tiled() -> Iterator[NotTiled]:
    server = NotTiled()
    yield server
    server.close()


def nothing_listens() -> str:
    return f"tcp://{LOCALHOST}:{free_port()}"


def metric(sidecar: SidecarProcess, name: str, labels: str = "") -> float | None:
    text = httpx.get(sidecar.metrics_url, timeout=10).text
    found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(found[1]) if found else None


def check(sidecar: SidecarProcess) -> tuple[int, str]:
    done = subprocess.run(
        [*sidecar_command(), "status", "--check", "--spool-dir", str(sidecar.spool_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout


def wait_for_state(sidecar: SidecarProcess, state: str, started: float) -> float:
    """Wait until /healthz shows Tiled in `state`; how long after `started` it took."""
    wait_until(lambda: sidecar.health()["tiled"]["state"] == state, DEADLINE_S, what=f"tiled {state}")
    return time.monotonic() - started


@pytest.mark.process
def test_a_uri_that_is_not_tiled_and_a_proxy_address_where_nothing_listens(
    tmp_path: Path, not_tiled: NotTiled
) -> None:
    """One daemon, two wrong settings, JSON logs: one error line and one warning line (priorities 3
    and 4, the URI and address as fields), degraded /healthz naming both, tiled_state{state="not_tiled"}
    1, proxy_connected 0, status --check CRITICAL; every line of both processes is one JSON object (no
    library output breaks it); every API request carried the User-Agent tiled-writer-sidecar/VERSION."""
    sidecar = SidecarProcess(
        tmp_path,
        zmq_address=nothing_listens(),
        tiled_uri=not_tiled.uri,
        api_key="k" * 16,
        settings={"log": {"format": "json"}},
    )
    started = time.monotonic()
    with sidecar:
        took = wait_for_state(sidecar, "not_tiled", started)
        print(f"not_tiled after {took:.1f} s")
        wait_until(
            lambda: "no connection to the proxy" in sidecar.log_tail(400), DEADLINE_S, what="proxy line"
        )
        health = httpx.get(sidecar.health_url, timeout=10)
        body = health.json()
        assert health.status_code == 200 and body["status"] == "degraded", body
        assert any("no connection to the proxy" in w for w in body["warnings"])
        assert any("not a Tiled server" in w for w in body["warnings"])
        assert metric(sidecar, "tiled_writer_sidecar_tiled_state", '{state="not_tiled"}') == 1
        assert metric(sidecar, "tiled_writer_sidecar_tiled_state", '{state="up"}') == 0
        assert metric(sidecar, "tiled_writer_sidecar_proxy_connected") == 0
        assert sidecar.status()["uploader"]["tiled"] == "not_tiled"
        code, line = check(sidecar)
        assert code == 2 and line.startswith("TILED-WRITER-SIDECAR CRITICAL - ") and "not_tiled" in line
        log = sidecar.log_tail(400)
    # The test harness heads each start with a "==== ... start: COMMAND" line of its own.
    entries = [json.loads(line) for line in log.splitlines() if line.strip() and not line.startswith("====")]
    (error,) = [e for e in entries if "is not a Tiled server" in e["msg"]]
    assert error["PRIORITY"] == 3 and error["uri"] == not_tiled.uri and error["role"] == "uploader"
    assert "GET /api/v1/: HTTP 404, text/html" in error["msg"]
    assert error["SYSLOG_IDENTIFIER"] == "tiled-writer-sidecar"
    (warning,) = [e for e in entries if "no connection to the proxy" in e["msg"]]
    assert warning["PRIORITY"] == 4 and warning["role"] == "receiver"
    version = tiled_writer_sidecar.__version__
    assert any(e["msg"].startswith(f"tiled-writer-sidecar {version} starting") for e in entries)
    assert not [e for e in entries if "exc" in e or e["level"] == "critical"]
    # Every request to the API names the sidecar; tiled's client also sends a bare GET of the URI
    # itself (its http -> https redirect probe, tiled.client.context), which takes no headers.
    api = [(path, agent) for path, agent in not_tiled.requests if path.startswith("/api/")]
    assert api and all(agent.startswith(f"tiled-writer-sidecar/{version}") for _, agent in api), api


def test_a_wrong_api_key_is_unauthorized(
    tmp_path: Path, shared_tiled_server: TiledServer, proxy: ZmqProxy
) -> None:
    """A real Tiled, a wrong key: one error line naming the key, state unauthorized everywhere."""
    sidecar = SidecarProcess(
        tmp_path,
        zmq_address=proxy.out_address,
        tiled_uri=shared_tiled_server.uri,
        api_key="wrong-key-0123456789",
    )
    started = time.monotonic()
    with sidecar:
        took = wait_for_state(sidecar, "unauthorized", started)
        print(f"unauthorized after {took:.1f} s")
        body = sidecar.health()
        assert body["status"] == "degraded" and any("refused the API key" in w for w in body["warnings"])
        assert metric(sidecar, "tiled_writer_sidecar_tiled_state", '{state="unauthorized"}') == 1
        assert metric(sidecar, "tiled_writer_sidecar_proxy_connected") == 1
        assert sidecar.status()["uploader"]["tiled"] == "unauthorized"
        assert check(sidecar)[0] == 2
        log = sidecar.log_tail(400)
    lines = [line for line in log.splitlines() if "tiled unauthorized" in line]
    assert len(lines) == 1 and " ERROR " in lines[0] and "refused the API key (HTTP 401)" in lines[0], log
    assert "wrong-key-0123456789" not in log
