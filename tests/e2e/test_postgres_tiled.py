"""Production Tiled: catalog AND appendable tables in PostgreSQL, with real processes.

How facilities run Tiled: ``tiled serve catalog postgresql://.../catalog
--init --write DIR/data --write postgresql://.../tables``, the catalog
through asyncpg and TiledWriter's ``internal`` tables through the ADBC
PostgreSQL driver. PostgreSQL itself is Debian's ``postgresql`` package,
started by the test on a free port in a temporary directory
(`PostgresServer`; as the ``postgres`` account when we are root). Then the
real chain: RunEngine -> `Publisher` -> bluesky-0MQ-proxy ->
``tiled-writer-sidecar run`` -> that Tiled. Every row read back from Tiled is
compared with what the RunEngine emitted (`expected_rows`), and the rows are
also counted in PostgreSQL directly, so the test cannot pass on some other
storage. Skipped (with the reason) where PostgreSQL is not installed; CI
installs it (scripts/system-deps.sh).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import bluesky.preprocessors as bpp
import pytest
from bluesky_tiled_plugins import TiledWriter
from ophyd.sim import det, motor

from tests.support.daemon import assert_rows_in_tiled, make_sidecar, run_documents
from tests.support.postgres import PostgresServer, PostgresTiledServer
from tiled_writer_sidecar.testing import Acquisition, ZmqProxy, wait_until
from tiled_writer_sidecar.testing.acquisition import expected_rows, run_uids
from tiled_writer_sidecar.testing.sidecar import SidecarProcess
from tiled_writer_sidecar.testing.tiled_readback import frame_rows, read_stream
from tiled_writer_sidecar.upload.tiled_calls import read_seq_nums

#: A bluesky plan.
Plan = Generator[Any, Any, Any]

#: Quick retries, so the backlog drains soon after Tiled is back.
SETTINGS: dict[str, dict[str, Any]] = {
    "tiled": {"batch_seconds": 0.5, "backoff_initial_seconds": 0.2, "backoff_max_seconds": 2.0}
}


@pytest.fixture
def tiled_server(postgres: PostgresServer, tmp_path: Path) -> Iterator[PostgresTiledServer]:
    """Tiled on `postgres` (named like conftest's fixture, so its log is attached on failure)."""
    with PostgresTiledServer(tmp_path / "tiled", postgres) as server:
        yield server


def run_status(sidecar: SidecarProcess, uid: str) -> dict[str, Any]:
    for run in sidecar.status()["runs"]:
        if run["uid"] == uid:
            return dict(run)
    raise AssertionError(f"run {uid} is not in the spool")


def assert_uploaded(status: dict[str, Any], acq: Acquisition, uids: list[str]) -> None:
    runs = {r["uid"]: r for r in status["runs"]}
    for uid in uids:
        sent = len(run_documents(acq.documents, uid))
        assert runs[uid]["state"] == "uploaded", runs[uid]
        assert runs[uid]["documents"] == sent
        assert runs[uid]["uploaded_documents"] == sent
        assert runs[uid]["gaps"] == {}


def rows_in_postgres(postgres: PostgresServer) -> int:
    """Rows of every table Tiled made in the ``tables`` database, counted by PostgreSQL."""
    tables = postgres.query(
        "SELECT quote_ident(table_name) FROM information_schema.tables"
        " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
        database="tables",
    )
    return sum(
        int(postgres.query(f"SELECT count(*) FROM {name}", database="tables")[0][0]) for (name,) in tables
    )


def runs_in_catalog(postgres: PostgresServer, uids: list[str]) -> set[str]:
    """Which of `uids` are nodes in the PostgreSQL catalog (``nodes.key``)."""
    keys = ", ".join(f"'{uid}'" for uid in uids)
    rows = postgres.query(f"SELECT key FROM nodes WHERE key IN ({keys})", database="catalog")
    return {key for (key,) in rows}


def test_catalog_and_tables_in_postgresql_survive_a_tiled_restart(
    postgres: PostgresServer,
    tiled_server: PostgresTiledServer,
    proxy: ZmqProxy,
    acquisition: Acquisition,
    tmp_path: Path,
) -> None:
    """count(30) and scan(20) land row for row; a scan made while Tiled is stopped drains after it restarts."""
    tiled = tiled_server
    assert not (tiled.directory / "catalog.db").exists()
    assert not (tiled.directory / "tables.db").exists()
    with make_sidecar(tmp_path, proxy, tiled, **SETTINGS) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)

        # 1. Tiled up: both runs arrive whole.
        (count_uid,) = acquisition.run(bp.count([det], 30))
        (scan_uid,) = acquisition.run(bp.scan([det], motor, -1, 1, 20))
        assert_uploaded(sidecar.wait_drained([count_uid, scan_uid]), acquisition, [count_uid, scan_uid])
        assert assert_rows_in_tiled(tiled, acquisition, count_uid) == 30
        assert assert_rows_in_tiled(tiled, acquisition, scan_uid) == 20
        assert tiled.client()[scan_uid].metadata["stop"]["exit_status"] == "success"
        # ... and they are in PostgreSQL, not somewhere else.
        assert runs_in_catalog(postgres, [count_uid, scan_uid]) == {count_uid, scan_uid}
        assert rows_in_postgres(postgres) == 30 + 20

        # 2. Tiled stopped (SIGTERM): the RunEngine goes on, the sidecar spools.
        tiled.stop()
        assert not tiled.running
        (backlog_uid,) = acquisition.run(bp.scan([det], motor, 0, 1, 15))
        sent = len(run_documents(acquisition.documents, backlog_uid))
        pending = wait_until(
            lambda: (run := run_status(sidecar, backlog_uid))["documents"] == sent and run,
            30,
            interval=0.25,
            what="the backlog run fully spooled",
        )
        assert pending["state"] == "pending", pending
        assert pending["uploaded_documents"] == 0

        # 3. Tiled started again on the same PostgreSQL: the backlog drains, nothing is lost or doubled.
        tiled.start()
        assert_uploaded(sidecar.wait_drained([backlog_uid]), acquisition, [count_uid, scan_uid, backlog_uid])
        assert assert_rows_in_tiled(tiled, acquisition, backlog_uid) == 15
        assert assert_rows_in_tiled(tiled, acquisition, count_uid) == 30
        assert assert_rows_in_tiled(tiled, acquisition, scan_uid) == 20
        uids = [count_uid, scan_uid, backlog_uid]
        assert runs_in_catalog(postgres, uids) == set(uids)
        assert rows_in_postgres(postgres) == 30 + 20 + 15
        assert len(tiled.startup_times) == 2


def count_with_pause(detector: Any, first: int, second: int, between: Callable[[], None]) -> Plan:
    """One run of `first` + `second` readings of `detector`; `between()` runs after the first ones."""

    @bpp.run_decorator(md={"plan_name": "count_with_pause"})
    def inner() -> Plan:
        for _ in range(first):
            yield from bps.trigger_and_read([detector])
        between()  # plain Python while the run is open: the RunEngine waits for it
        for _ in range(second):
            yield from bps.trigger_and_read([detector])

    return (yield from inner())


def stream_table(client: Any, uid: str) -> Any:
    """The ``internal`` table client of the run's primary stream (under bluesky-tiled-plugins' wrappers)."""
    run = getattr(client[uid], "base", client[uid])
    stream = getattr(run["primary"], "base", run["primary"])
    return stream["internal"]


def test_runs_read_back_in_seq_num_order_after_postgresql_reuses_freed_space(
    postgres: PostgresServer,
    tiled_server: PostgresTiledServer,
    proxy: ZmqProxy,
    acquisition: Acquisition,
    tmp_path: Path,
) -> None:
    """PostgreSQL returns a table's rows in physical order, and a deleted run's space is reused: a run
    written by in-process TiledWriter then reads back out of seq_num order (the issue, reproduced); the
    same run written at the same time by the sidecar, into the same SQL table, reads back in order.

    The filler run is deleted through Tiled as the uploader deletes a run it rewrites (its rows are
    DELETEd) and the table VACUUMed (what autovacuum does by itself) half-way through the run.
    """
    tiled = tiled_server
    root = tiled.client()
    for name in ("filler", "inprocess"):
        root.create_container(name)
    token = acquisition.subscribe(TiledWriter(root["filler"]))  # one append of the whole run
    (filler_uid,) = acquisition.run(bp.count([det], 3000))
    acquisition.unsubscribe(token)
    first, second = 60, 600
    acquisition.subscribe(TiledWriter(root["inprocess"], batch_size=first))  # appends every 60 rows
    with make_sidecar(tmp_path, proxy, tiled, tiled={"batch_rows": first, "batch_seconds": 0.2}) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)

        def free_space_before_the_rest() -> None:
            """Both writers' first rows are in the table; delete the filler run and VACUUM."""
            uid = run_uids(acquisition.documents)[-1]  # the run in progress
            wait_until(
                lambda: len(read_seq_nums(root, uid, "primary") or []) == first,
                60,
                interval=0.1,
                what="the sidecar's first rows in Tiled",
            )
            root["filler"].delete_contents(filler_uid, recursive=True, external_only=False)
            postgres.psql("VACUUM", database="tables")

        uids = acquisition.run(count_with_pause(det, first, second, free_space_before_the_rest))
        (uid,) = uids
        assert_uploaded(sidecar.wait_drained(uids), acquisition, uids)

    expected = expected_rows(acquisition.documents, run_uid=uid)
    theirs = [row["seq_num"] for row in frame_rows(read_stream(root["inprocess"], uid))]
    ours = frame_rows(read_stream(root, uid))
    # Without the fix: every row is there, once, but not in order.
    assert sorted(theirs) == [row["seq_num"] for row in expected]
    assert theirs != sorted(theirs)
    # With it: row for row, in order.
    assert ours == expected
    # Same SQL table for both; only the sidecar's data source asks Tiled to order by seq_num.
    (their_source,) = stream_table(root["inprocess"], uid).data_sources()
    (our_source,) = stream_table(root, uid).data_sources()
    assert our_source.parameters["table_name"] == their_source.parameters["table_name"]
    assert our_source.parameters["order_by_args"] == [{"column": "seq_num", "direction": "asc"}]
    assert "order_by_args" not in their_source.parameters
    # The sidecar's rows are stored out of order too: read as Tiled reads a table without the parameter.
    physical = postgres.query(
        f'SELECT seq_num FROM "{our_source.parameters["table_name"]}"'
        f" WHERE _dataset_id = {int(our_source.parameters['dataset_id'])} ORDER BY _partition_id",
        database="tables",
    )
    stored = [int(seq) for (seq,) in physical]
    assert sorted(stored) == [row["seq_num"] for row in expected]
    assert stored != sorted(stored)
