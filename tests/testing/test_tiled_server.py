"""TiledServer: a real Tiled process on SQLite that survives restarts and crashes."""

from __future__ import annotations

import itertools
import json
import socket
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import httpx
import numpy
import pytest
from bluesky_tiled_plugins import TiledWriter
from ophyd.sim import DirectImage, det, motor

from tiled_writer_sidecar.testing import (
    Acquisition,
    TiledServer,
    expected_rows,
    frame_rows,
    read_stream,
    tree_summary,
)


@pytest.fixture
def local_re() -> Iterator[Acquisition]:
    """A RunEngine with a recorder and no Publisher (in-process baseline)."""
    with Acquisition(None) as acq:
        yield acq


def write_count(server: TiledServer, acq: Acquisition, num: int = 5) -> str:
    """Run bp.count([det], num) with an in-process TiledWriter; return the uid."""
    token = acq.subscribe(TiledWriter(server.client()))
    try:
        (uid,) = acq.run(bp.count([det], num))
    finally:
        acq.unsubscribe(token)
    return uid


def assert_rows(server: TiledServer, acq: Acquisition, uid: str) -> None:
    rows = frame_rows(read_stream(server.client(), uid, "primary"))
    assert rows == expected_rows(acq.documents, "primary", run_uid=uid)


def sqlite_rows(path: Path) -> dict[str, int]:
    """Row count of every data table in the tabular SQLite database."""
    with sqlite3.connect(path) as db:
        names = [
            name
            for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            if name.startswith("table_")
        ]
        return {name: db.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone()[0] for name in names}


def test_in_process_tiled_writer_round_trip(tiled_server: TiledServer, local_re: Acquisition) -> None:
    """TiledWriter can write to the server, and 5 events read back as 5 equal rows.

    Also pins the tree layout the sidecar must reproduce, and that the
    appendable table's rows are stored in the SQLite tables file (not DuckDB).
    """
    uid = write_count(tiled_server, local_re, 5)

    rows = frame_rows(read_stream(tiled_server.client(), uid, "primary"))
    events = [doc for name, doc in local_re.documents if name == "event"]
    assert len(rows) == len(events) == 5
    assert rows == expected_rows(local_re.documents)
    assert [row["det"] for row in rows] == [event["data"]["det"] for event in events]

    summary = tree_summary(tiled_server.client(), uid)
    assert summary["keys"] == ["primary"]
    assert summary["specs"] == ["BlueskyRun:3.0"]
    assert summary["start"]["uid"] == uid
    assert summary["stop"]["exit_status"] == "success"
    primary = summary["streams"]["primary"]
    assert primary["keys"] == ["internal"]
    assert primary["specs"] == ["BlueskyEventStream:3.0", "composite:None"]
    assert primary["columns"] == ["seq_num", "time", "det", "ts_det"]
    assert primary["rows"] == 5

    # The rows live in the tabular SQLite file, in one table.
    assert list(sqlite_rows(tiled_server.tables_path).values()) == [5]
    assert not list(tiled_server.directory.rglob("*.duckdb"))


def test_internal_arrays_are_read_back_as_columns(
    shared_tiled_server: TiledServer, local_re: Acquisition
) -> None:
    """A scan with an in-event 4x5 image: table columns and the zarr array match."""
    frames = itertools.count()
    camera = DirectImage(func=lambda: numpy.arange(20.0).reshape(4, 5) + next(frames), name="camera")
    camera.img.name = "frame"
    token = local_re.subscribe(TiledWriter(shared_tiled_server.client()))
    (uid,) = local_re.run(bp.scan([det, camera], motor, -1, 1, 7))
    local_re.unsubscribe(token)

    rows = frame_rows(read_stream(shared_tiled_server.client(), uid))
    assert len(rows) == 7
    assert rows == expected_rows(local_re.documents)
    assert {"motor", "motor_setpoint", "ts_motor", "frame", "ts_frame"} <= set(rows[0])
    assert rows[6]["frame"][0] == [6.0, 7.0, 8.0, 9.0, 10.0]

    primary = tree_summary(shared_tiled_server.client(), uid)["streams"]["primary"]
    assert primary["keys"] == ["frame", "internal"]
    assert primary["arrays"] == {"frame": {"shape": [7, 4, 5], "dtype": "float64"}}
    assert "frame" not in primary["columns"]
    assert "ts_frame" in primary["columns"]


def test_restart_keeps_port_and_data(tiled_server: TiledServer, local_re: Acquisition) -> None:
    """restart() comes back on the same URI with every run written before."""
    uri = tiled_server.uri
    uid = write_count(tiled_server, local_re)

    tiled_server.restart()

    assert tiled_server.uri == uri
    assert len(tiled_server.startup_times) == 2
    assert_rows(tiled_server, local_re, uid)
    second = write_count(tiled_server, local_re, 3)
    assert sorted(tiled_server.client()) == sorted([uid, second])


def test_kill_then_start_on_same_directory(tiled_server: TiledServer, local_re: Acquisition) -> None:
    """After SIGKILL (a crash) the same directory serves the old data and takes new."""
    uid = write_count(tiled_server, local_re)

    assert tiled_server.kill() == -9
    assert not tiled_server.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{tiled_server.uri}/api/v1/", timeout=2)

    tiled_server.start()

    assert_rows(tiled_server, local_re, uid)
    second = write_count(tiled_server, local_re, 2)
    assert_rows(tiled_server, local_re, second)


def test_pause_stalls_requests_until_resume(tiled_server: TiledServer) -> None:
    """A SIGSTOPped server accepts connections but answers nothing until SIGCONT."""
    url = f"{tiled_server.uri}/api/v1/"
    tiled_server.pause()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(url, timeout=httpx.Timeout(1.0, connect=1.0))
        assert tiled_server.running
    finally:
        tiled_server.resume()
    assert httpx.get(url, timeout=5).status_code == 200


def test_api_key_is_enforced(shared_tiled_server: TiledServer) -> None:
    """The server enforces its API key: anonymous clients cannot even read."""
    response = httpx.get(f"{shared_tiled_server.uri}/api/v1/metadata/", timeout=5)
    assert response.status_code == 401
    client: Any = shared_tiled_server.client()
    key = uuid.uuid4().hex
    client.create_container(key)
    assert key in client


def test_start_failure_reports_the_log(shared_tiled_server: TiledServer, tmp_path: Path) -> None:
    """A server that cannot bind exits; start() raises at once with its log tail."""
    other = TiledServer(tmp_path / "other", port=shared_tiled_server.port)
    with pytest.raises(RuntimeError, match=r"(?i)address already in use"):
        other.start()
    assert not other.running
    other.close()


@pytest.mark.process
def test_taken_port_is_replaced_on_first_start(tmp_path: Path) -> None:
    """If the free port is grabbed before Tiled binds it, start() picks another."""
    server = TiledServer(tmp_path / "tiled")
    taken = server.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            server.start()
            assert server.port != taken
            assert httpx.get(f"{server.uri}/api/v1/", timeout=5).status_code == 200
        finally:
            server.close()


def test_one_worker_keeps_tiled_serve_and_several_workers_refuse_a_memory_streaming_cache(
    tmp_path: Path,
) -> None:
    """workers=1 is `tiled serve catalog` (API key on the command line); workers=2 is uvicorn on
    app_factory with the API key in the config file, never initialising the catalog; a "memory"
    streaming cache (one per worker) with workers=2 is a ValueError."""
    one = TiledServer(tmp_path / "one")
    assert one.command()[1:3] == ["serve", "catalog"]
    assert one.command()[one.command().index("--api-key") + 1] == one.api_key

    two = TiledServer(tmp_path / "two", workers=2, streaming_cache="redis://127.0.0.1:1")
    argv = two.command()
    assert argv[argv.index("--workers") + 1] == "2"
    assert "tiled.server.app:app_factory" in argv and one.api_key not in argv and two.api_key not in argv
    config = json.loads(two.config_text())
    assert config["authentication"] == {"single_user_api_key": two.api_key}
    assert config["catalog"]["init_if_not_exists"] is False
    assert config["streaming_cache"] == {"uri": "redis://127.0.0.1:1"}

    with pytest.raises(ValueError, match="memory"):
        TiledServer(tmp_path / "three", workers=2, streaming_cache="memory")
    with pytest.raises(ValueError, match="at least 1"):
        TiledServer(tmp_path / "four", workers=0)
