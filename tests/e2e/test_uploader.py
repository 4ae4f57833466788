"""The uploader against a real Tiled whose appends fail: retried in place, exactly once.

The uploader runs in this process on a spool filled by the real receiver
code path; its Tiled URI is a `FaultyTiled`, an HTTP proxy in front of the
session's Tiled server that forwards every request unchanged except the
n-th append (``PATCH .../table/partition/...``) of the test's choosing:

- ``locked``: a real server-side failure. The proxy holds an exclusive
  lock on Tiled's SQLite tables database while it forwards the append, so
  Tiled itself answers 500 "database is locked" (what a client reading
  the table while the uploader appends causes); the rows did not land.
- ``lost``: forwarded, applied by Tiled, and its answer replaced by a 500:
  the rows landed but the uploader cannot know it without looking.
- ``dropped``: not forwarded, the connection closed without an answer (a
  Tiled stopping as the request arrives): the rows are not in Tiled, and no
  Tiled holds the request any more.
- ``dropped_applied``: forwarded, applied, then the connection closed
  without an answer (a Tiled killed right after its commit).
- ``proxy_timeout``: not forwarded, answered 504 as by a proxy that gave
  up waiting: the rows are not in Tiled, but for all the uploader knows
  Tiled may still be applying them, so it cannot decide and rewrites that
  run (only that run).

Every test checks the contract: every row in Tiled once (``seq_num``
1..N, values as spooled), and the run's tree identical to what an
in-process TiledWriter writes (no "notes" about retries in its metadata).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import event_model
import pytest
from bluesky_tiled_plugins import TiledWriter

from tests.support.faulty_tiled import Fault, FaultyTiled
from tiled_writer_sidecar.config import Config, SpoolConfig, TiledConfig
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.state_files import Uploaded
from tiled_writer_sidecar.testing import TiledServer
from tiled_writer_sidecar.testing.ports import wait_until
from tiled_writer_sidecar.testing.sidecar import spool_documents
from tiled_writer_sidecar.testing.tiled_readback import differences, tree_summary, without_volatile
from tiled_writer_sidecar.upload.scheduler import MAX_ACTIVE_RUNS, Uploader
from tiled_writer_sidecar.upload.tiled_calls import read_seq_nums

Document = tuple[str, dict[str, Any]]


@pytest.fixture
def faulty_tiled(shared_tiled_server: TiledServer) -> Iterator[FaultyTiled]:
    proxy = FaultyTiled(shared_tiled_server)
    yield proxy
    proxy.close()


def _upload(spool_dir: Path, uri: str, api_key: str, monkeypatch: pytest.MonkeyPatch) -> Uploader:
    monkeypatch.setenv("TILED_API_KEY", api_key)
    config = Config(
        tiled=TiledConfig(uri=uri, batch_rows=250, backoff_initial_seconds=0.1, backoff_max_seconds=0.5),
        spool=SpoolConfig(dir=str(spool_dir)),
    )
    uploader = Uploader(config, SpoolDir(spool_dir, create=False), give_up_after=60.0)
    uploader.run(until_idle=True)
    return uploader


def _run(events: int, scan_id: int) -> list[Document]:
    """start, a `primary` stream of `events` scalar events, stop."""
    bundle = event_model.compose_run(metadata={"scan_id": scan_id, "plan_name": "count"})
    keys = {"det": {"dtype": "number", "shape": [], "source": "SIM:det"}}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys)
    t0 = bundle.start_doc["time"]
    documents: list[Document] = [("start", dict(bundle.start_doc)), ("descriptor", dict(desc.descriptor_doc))]
    for i in range(events):
        t = t0 + 0.001 * (i + 1)
        event = desc.compose_event(data={"det": float(i)}, timestamps={"det": t}, seq_num=i + 1, time=t)
        documents.append(("event", dict(event)))
    documents.append(("stop", dict(bundle.compose_stop())))
    return documents


def _runs(*sizes: int) -> list[list[Document]]:
    return [_run(n, scan_id=i + 1) for i, n in enumerate(sizes)]


def _check_exactly_once(
    server: TiledServer, container: str, runs: list[list[Document]], tmp_path: Path
) -> None:
    """Every row once, and each run's tree equal to in-process TiledWriter's."""
    ours = server.client()[container]
    inprocess_name = f"{container}-inprocess"
    inprocess = server.client().create_container(inprocess_name)
    writer = TiledWriter(inprocess)
    for documents in runs:
        for name, doc in documents:
            writer(name, doc)
    theirs = server.client()[inprocess_name]
    for documents in runs:
        uid = documents[0][1]["uid"]
        events = sum(1 for name, _ in documents if name == "event")
        assert sorted(read_seq_nums(ours, uid, "primary") or []) == list(range(1, events + 1))
        summary = without_volatile(tree_summary(ours, uid))
        assert "notes" not in summary.get("metadata", {}), summary
        assert differences(summary, without_volatile(tree_summary(theirs, uid))) == [], uid


def _container(server: TiledServer, tmp_path: Path) -> str:
    server.client().create_container(tmp_path.name)
    return tmp_path.name


@pytest.mark.parametrize("action", ["locked", "lost", "dropped", "dropped_applied"])
def test_failed_append_is_retried_in_place(
    action: str,
    faulty_tiled: FaultyTiled,
    shared_tiled_server: TiledServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 500 or a connection closed unanswered on an append (rows applied or not): no rewrite, no duplicate."""
    container = _container(shared_tiled_server, tmp_path)
    runs = _runs(1000)
    spool_documents(tmp_path / "spool", [d for run in runs for d in run])
    faulty_tiled.faults.append(Fault(action, nth=2))
    uploader = _upload(
        tmp_path / "spool",
        f"{faulty_tiled.uri}/api/v1/metadata/{container}",
        faulty_tiled.upstream.api_key,
        monkeypatch,
    )
    assert faulty_tiled.faults[0].fired == 1
    assert uploader.status.append_retries >= 1
    assert uploader.status.rewrites == 0
    assert uploader.status.runs_uploaded == 1
    uploaded = Uploaded.load(tmp_path / "spool" / "runs" / runs[0][0][1]["uid"])
    assert (uploaded.state, uploaded.attempts, uploaded.rows) == ("uploaded", 1, {"primary": 1000})
    _check_exactly_once(shared_tiled_server, container, runs, tmp_path)


def test_ambiguous_append_rewrites_only_its_run(
    faulty_tiled: FaultyTiled,
    shared_tiled_server: TiledServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 504 from a proxy (Tiled may still apply the append) cannot be decided: that run is rewritten, no other."""
    container = _container(shared_tiled_server, tmp_path)
    runs = _runs(1000, 1000, 1000)
    spool_documents(tmp_path / "spool", [d for run in runs for d in run])
    broken = runs[1][0][1]["uid"]
    faulty_tiled.faults.append(Fault("proxy_timeout", nth=2, where=broken))
    uploader = _upload(
        tmp_path / "spool",
        f"{faulty_tiled.uri}/api/v1/metadata/{container}",
        faulty_tiled.upstream.api_key,
        monkeypatch,
    )
    assert faulty_tiled.faults[0].fired == 1
    assert uploader.status.rewrites == 1
    assert uploader.status.runs_uploaded == 3
    attempts = {
        run[0][1]["uid"]: Uploaded.load(tmp_path / "spool" / "runs" / run[0][1]["uid"]).attempts
        for run in runs
    }
    assert attempts == {uid: (2 if uid == broken else 1) for uid in attempts}
    _check_exactly_once(shared_tiled_server, container, runs, tmp_path)


def test_open_runs_do_not_starve_new_runs(
    shared_tiled_server: TiledServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More runs left open (no stop) than upload slots: a run spooled after them is still uploaded."""
    container = _container(shared_tiled_server, tmp_path)
    open_runs = [run[:-1] for run in _runs(*[10] * (MAX_ACTIVE_RUNS + 2))]  # no stop: open
    closed = _run(10, scan_id=99)
    spool_documents(tmp_path / "spool", [d for run in open_runs for d in run] + closed)
    monkeypatch.setenv("TILED_API_KEY", shared_tiled_server.api_key)
    config = Config(
        tiled=TiledConfig(uri=f"{shared_tiled_server.uri}/api/v1/metadata/{container}", batch_seconds=0.2),
        spool=SpoolConfig(dir=str(tmp_path / "spool")),
    )
    stop = threading.Event()
    uploader = Uploader(config, SpoolDir(tmp_path / "spool", create=False), stop=stop)
    thread = threading.Thread(target=uploader.run)
    thread.start()
    try:
        closed_dir = tmp_path / "spool" / "runs" / closed[0][1]["uid"]
        deadline = time.monotonic() + 60
        while Uploaded.load(closed_dir).state != "uploaded" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert Uploaded.load(closed_dir).state == "uploaded"
        # The open runs wait in memory, their rows flushed (the closed run leaves `active` just after
        # its uploaded.json says uploaded).
        wait_until(lambda: len(uploader.active) == len(open_runs), 10, what="only the open runs in flight")
    finally:
        stop.set()
        thread.join(30)
    ours = shared_tiled_server.client()[container]
    for documents in [*open_runs, closed]:
        assert sorted(read_seq_nums(ours, documents[0][1]["uid"], "primary") or []) == list(range(1, 11))
