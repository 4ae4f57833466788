"""A Tiled served by several uvicorn workers on PostgreSQL, as facilities scale it out.

`PostgresTiledServer(..., workers=2)`: ``uvicorn --factory
tiled.server.app:app_factory --workers 2`` on one catalog and tables in
PostgreSQL, the catalog initialised once before the workers start. In-process
TiledWriter writes a run through it and reads it back row for row; stopping it
leaves none of its processes behind. Skipped (with the reason) where
PostgreSQL is not installed; CI installs it (scripts/system-deps.sh).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import bluesky.plans as bp
import pytest
from bluesky_tiled_plugins import TiledWriter
from ophyd.sim import det

from tests.support.postgres import PostgresServer, PostgresTiledServer
from tiled_writer_sidecar.testing import Acquisition, expected_rows, frame_rows, read_stream, wait_until


@pytest.fixture
def tiled_server(postgres: PostgresServer, tmp_path: Path) -> Iterator[PostgresTiledServer]:
    """Tiled with two workers on `postgres` (named like conftest's fixture: its log is attached on failure)."""
    with PostgresTiledServer(tmp_path / "tiled", postgres, workers=2) as server:
        yield server


def live_group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _ppid, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(group) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def test_two_workers_on_postgresql_serve_tiled_writer_and_stop_whole(
    postgres: PostgresServer, tiled_server: PostgresTiledServer
) -> None:
    """Two worker processes start on one PostgreSQL catalog, a TiledWriter run reads back row for row
    (and its rows are in PostgreSQL), and stop() leaves no process of the server behind."""
    tiled = tiled_server
    assert "--workers" in tiled.command()
    pgid = tiled.pid
    assert pgid is not None
    members = live_group_members(pgid)
    assert len(members) >= 3, members  # the supervisor and its two workers
    assert tiled.log_tail(400).count("Application startup complete.") >= 2
    # Initialised once before the workers: they do not initialise it again.
    assert '"init_if_not_exists": false' in tiled.config_path.read_text()
    assert (tiled.directory / "catalog-init.log").exists()

    with Acquisition(None) as acq:
        acq.subscribe(TiledWriter(tiled.client()))
        (uid,) = acq.run(bp.count([det], 5))
    rows = frame_rows(read_stream(tiled.client(), uid, "primary"))
    assert rows == expected_rows(acq.documents, "primary", run_uid=uid)
    assert tiled.client()[uid].metadata["stop"]["exit_status"] == "success"
    assert postgres.query(f"SELECT count(*) FROM nodes WHERE key = '{uid}'", database="catalog") == [["1"]]
    assert "Internal Server Error" not in tiled.log_tail(2000)

    tiled.stop()
    assert not tiled.running
    # Stragglers (multiprocessing's resource tracker) exit once the supervisor is gone.
    wait_until(lambda: not live_group_members(pgid), 30, interval=0.1, what="every server process gone")
