"""The daemon as systemd and operators see it: notifications, SIGTERM, metrics, health, secrets."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

import bluesky.plans as bp
import httpx
import pytest
from ophyd.sim import det

from tiled_writer_sidecar.testing import (
    Acquisition,
    TiledContainer,
    ZmqProxy,
    wait_until,
)
from tiled_writer_sidecar.testing.acquisition import expected_rows
from tiled_writer_sidecar.testing.sidecar import SidecarProcess


def _metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)"
    match = re.search(pattern, text)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def test_notifies_ready_then_stopping_and_exits_zero_on_sigterm(
    tiled_container: TiledContainer, proxy: ZmqProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under systemd (a fake NOTIFY_SOCKET): READY=1 once receiving, WATCHDOG=1, STOPPING=1, exit 0."""
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    messages: list[str] = []

    def received(text: str) -> bool:
        try:
            messages.extend(listener.recv(4096).decode().splitlines())
        except TimeoutError:
            pass
        return any(m.startswith(text) for m in messages)

    try:
        sidecar = SidecarProcess(
            tmp_path / "sidecar", zmq_address=proxy.out_address, tiled_uri=tiled_container.uri, api_key="k"
        )
        sidecar.start()
        wait_until(lambda: received("READY=1"), 30, what="READY=1")
        wait_until(lambda: received("WATCHDOG=1"), 30, what="WATCHDOG=1")
        started = time.monotonic()
        assert sidecar.terminate(timeout=30) == 0
        assert time.monotonic() - started < 30
        wait_until(lambda: received("STOPPING=1"), 5, what="STOPPING=1")
        assert messages.index("READY=1") < messages.index("STOPPING=1")
    finally:
        listener.close()


def test_metrics_count_what_was_sent_and_healthz_reports_tiled(
    acquisition: Acquisition, sidecar: SidecarProcess
) -> None:
    """/metrics counts exactly the documents of a known run; /healthz is 200 with Tiled up."""
    (uid,) = acquisition.run(bp.count([det], 10))
    sidecar.wait_drained([uid])
    text = httpx.get(sidecar.metrics_url, timeout=10).text
    sent = [name for name, doc in acquisition.documents]
    for kind in ("start", "descriptor", "event", "stop"):
        assert _metric(text, "tiled_writer_sidecar_documents_received_total", f'kind="{kind}"') == sent.count(
            kind
        )
    assert _metric(text, "tiled_writer_sidecar_backlog_documents") == 0
    wait_until(
        lambda: "tiled_writer_sidecar_uploaded_rows_total 10.0" in httpx.get(sidecar.metrics_url).text, 10
    )
    health = httpx.get(sidecar.health_url, timeout=10)
    assert health.status_code == 200
    assert health.json()["tiled"]["state"] == "up"


def test_healthz_is_503_while_the_spool_cannot_be_written_and_recovers(
    acquisition: Acquisition, sidecar: SidecarProcess
) -> None:
    """An unwritable spool (immutable runs/ directory) makes /healthz 503 with the reason; fixed, it is 200."""
    runs = sidecar.spool_dir / "runs"
    if subprocess.run(["chattr", "+i", str(runs)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this file system")
    try:
        acquisition.run(bp.count([det], 3))
        response = wait_until(
            lambda: (r := httpx.get(sidecar.health_url, timeout=10)).status_code == 503 and r,
            20,
            what="/healthz 503",
        )
        assert "spool" in " ".join(response.json()["reasons"])
    finally:
        subprocess.run(["chattr", "-i", str(runs)], check=True)
    (uid,) = acquisition.run(bp.count([det], 3))
    wait_until(lambda: httpx.get(sidecar.health_url, timeout=10).status_code == 200, 20, what="/healthz 200")
    sidecar.wait_drained([uid])
    assert "SPOOL NOT WRITABLE" in sidecar.log_tail(200)


def test_api_key_never_appears_in_logs_status_or_spool(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """The API key is used but never written anywhere: log, status, health, metrics, spool files."""
    key = tiled_container.api_key
    with SidecarProcess(
        tmp_path / "sidecar", zmq_address=proxy.out_address, tiled_uri=tiled_container.uri, api_key=key
    ) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        (uid,) = acquisition.run(bp.count([det], 5))
        sidecar.wait_drained([uid])
        outputs = [
            sidecar.log_tail(10_000),
            str(sidecar.status()),
            httpx.get(sidecar.health_url).text,
            httpx.get(sidecar.metrics_url).text,
        ]
        outputs += [p.read_bytes().decode("latin-1") for p in sidecar.directory.rglob("*") if p.is_file()]
    assert outputs and all(key not in text for text in outputs)


def test_wrong_api_key_says_unauthorized_keeps_data_and_uploads_after_fix(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """A wrong key: one clear 'unauthorized' line, data stays spooled; with the right key it uploads."""
    directory = tmp_path / "sidecar"
    sidecar = SidecarProcess(
        directory, zmq_address=proxy.out_address, tiled_uri=tiled_container.uri, api_key="wrong"
    )
    with sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        (uid,) = acquisition.run(bp.count([det], 5))
        wait_until(lambda: "tiled unauthorized" in sidecar.log_tail(200), 90, what="unauthorized log line")
        (run,) = sidecar.status()["runs"]
        assert run["state"] in ("pending", "uploading") and run["documents"] == 8
    assert sidecar.log_tail(500).count("tiled unauthorized") == 1
    fixed = SidecarProcess(
        directory,
        zmq_address=proxy.out_address,
        tiled_uri=tiled_container.uri,
        api_key=tiled_container.api_key,
    )
    with fixed:
        fixed.wait_drained([uid])
    emitted = [row["det"] for row in expected_rows(acquisition.documents, run_uid=uid)]
    assert list(tiled_container.client()[uid]["primary"].read()["det"].values) == emitted
