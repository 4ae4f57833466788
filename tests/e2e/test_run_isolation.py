"""One run never holds back another (issue 19), against a real Tiled.

The uploader runs in this process, in a thread, on a spool written by the
receiver's own code (`RunSpooler`, `spool_documents`) or planted directly
(a poison run the receiver would never spool); Tiled is the session's
server, behind a `FaultyTiled` where a test needs a run whose appends fail.

- a poison run (TiledWriter raises on its documents) is quarantined with
  its reason in two attempts, while the runs spooled after it are readable
  within seconds of their stop (the latencies are printed);
- a run whose every append Tiled answers 500 is quarantined while the
  others upload untouched;
- two uploaders uploading the same run uid into one Tiled: one writes it,
  the other quarantines it; nothing is deleted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import event_model
import pytest

from tests.e2e.test_uploader import _container, _run, _runs
from tests.support.fake_tiled import Spool
from tests.support.faulty_tiled import Fault, FaultyTiled
from tests.support.spool import plant_closed_run
from tiled_writer_sidecar.config import Config, SpoolConfig, TiledConfig
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.state_files import Uploaded, UploadState
from tiled_writer_sidecar.testing import TiledServer
from tiled_writer_sidecar.testing.ports import wait_until
from tiled_writer_sidecar.testing.sidecar import spool_documents
from tiled_writer_sidecar.upload.scheduler import Uploader
from tiled_writer_sidecar.upload.tiled_calls import read_seq_nums

Document = tuple[str, dict[str, Any]]


def _config(spool_dir: Path, uri: str) -> Config:
    return Config(
        tiled=TiledConfig(uri=uri, batch_seconds=0.2, backoff_initial_seconds=0.1, backoff_max_seconds=0.5),
        spool=SpoolConfig(dir=str(spool_dir)),
    )


def _poison_run() -> list[Document]:
    """A run TiledWriter raises on: a stream_datum of a stream_resource never sent."""
    bundle = event_model.compose_run(metadata={"scan_id": 666, "plan_name": "poison"})
    keys = {"img": {"dtype": "array", "shape": [1, 2, 2], "source": "SIM:img", "external": "STREAM:"}}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys)
    datum = {
        "uid": "missing-sres/0",
        "stream_resource": "missing-sres",
        "descriptor": desc.descriptor_doc["uid"],
        "indices": {"start": 0, "stop": 1},
        "seq_nums": {"start": 1, "stop": 2},
    }
    return [
        ("start", dict(bundle.start_doc)),
        ("descriptor", dict(desc.descriptor_doc)),
        ("stream_datum", datum),
        ("stop", dict(bundle.compose_stop())),
    ]


class Running:
    """An uploader running in a thread until `stop`."""

    def __init__(self, uploader: Uploader) -> None:
        self.uploader = uploader
        self.thread = threading.Thread(target=uploader.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.uploader.stop_event.set()
        self.thread.join(60)


@pytest.fixture
def faulty_tiled(shared_tiled_server: TiledServer) -> Iterator[FaultyTiled]:
    proxy = FaultyTiled(shared_tiled_server)
    yield proxy
    proxy.close()


def _state(spool_dir: Path, uid: str) -> Uploaded:
    return Uploaded.load(spool_dir / "runs" / uid)


def test_good_runs_behind_a_poison_run_are_readable_within_seconds_of_their_stop(
    shared_tiled_server: TiledServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The poison run is quarantined with TiledWriter's reason in two attempts (and again on replay);
    each good run, spooled while the uploader runs, is in Tiled seconds after its stop."""
    container = _container(shared_tiled_server, tmp_path)
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir)
    poison = _poison_run()
    poison_uid = poison[0][1]["uid"]
    plant_closed_run(spool.dir, poison_uid, poison_uid, poison)
    monkeypatch.setenv("TILED_API_KEY", shared_tiled_server.api_key)
    uri = f"{shared_tiled_server.uri}/api/v1/metadata/{container}"
    running = Running(Uploader(_config(spool_dir, uri), SpoolDir(spool_dir, create=False)))
    stopped: dict[str, float] = {}
    good = [_run(20, scan_id=n + 1) for n in range(8)]
    try:
        for documents in good:
            run = spool.open(documents[:-1])
            spool.close(run, documents[-1][1])
            stopped[documents[0][1]["uid"]] = time.time()
        for uid in stopped:
            wait_until(lambda u=uid: _state(spool_dir, u).state == UploadState.UPLOADED, 120, what=f"{uid}")
        wait_until(lambda: _state(spool_dir, poison_uid).state == UploadState.QUARANTINED, 60, what="poison")
    finally:
        running.stop()
    latencies = sorted(_state(spool_dir, uid).updated - t for uid, t in stopped.items())
    print(f"\nstop -> uploaded behind a poison run: max {latencies[-1]:.2f} s, median {latencies[4]:.2f} s")
    ours = shared_tiled_server.client()[container]
    for uid in stopped:
        assert read_seq_nums(ours, uid, "primary") == list(range(1, 21))
    bad = _state(spool_dir, poison_uid)
    assert bad.attempts == 2 and "missing-sres" in (bad.reason or ""), bad
    replayed = Uploader(_config(spool_dir, uri), SpoolDir(spool_dir, create=False), only={poison_uid})
    replayed.run(until_idle=True)
    again = _state(spool_dir, poison_uid)
    assert again.state == UploadState.QUARANTINED and again.attempts == 4, again


def test_a_run_tiled_answers_500_on_every_append_is_quarantined_and_the_others_upload(
    faulty_tiled: FaultyTiled,
    shared_tiled_server: TiledServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tiled answers the others (and its root): the 500s are that run's problem. It backs off alone and
    is quarantined with the reason; every other run is uploaded, none rewritten."""
    container = _container(shared_tiled_server, tmp_path)
    runs = _runs(30, 30, 30, 30, 30)
    spool_documents(tmp_path / "spool", [d for run in runs for d in run])
    bad = runs[0][0][1]["uid"]
    faulty_tiled.faults.append(Fault("refuse", nth=0, where=bad))
    monkeypatch.setenv("TILED_API_KEY", shared_tiled_server.api_key)
    uri = f"{faulty_tiled.uri}/api/v1/metadata/{container}"
    uploader = Uploader(_config(tmp_path / "spool", uri), SpoolDir(tmp_path / "spool", create=False))
    started = time.monotonic()
    uploader.run(until_idle=True)
    print(f"\n500 on every append of one run: all decided in {time.monotonic() - started:.1f} s")
    quarantined = _state(tmp_path / "spool", bad)
    assert quarantined.state == UploadState.QUARANTINED and "500" in (quarantined.reason or "")
    assert "while Tiled answered" in (quarantined.reason or "")
    ours = shared_tiled_server.client()[container]
    for documents in runs[1:]:
        uid = documents[0][1]["uid"]
        assert _state(tmp_path / "spool", uid).attempts == 1
        assert read_seq_nums(ours, uid, "primary") == list(range(1, 31))
    assert uploader.status.runs_uploaded == len(runs) - 1 and uploader.status.tiled == "up"


def test_two_uploaders_with_the_same_run_never_delete_each_others(
    shared_tiled_server: TiledServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two spools holding the same run, uploading into one Tiled at once: one creates it, the other
    gets 409 and quarantines it ("did not create it"); the run is in Tiled once, whole, never deleted."""
    container = _container(shared_tiled_server, tmp_path)
    documents = _run(200, scan_id=1)
    uid = documents[0][1]["uid"]
    spools = [tmp_path / "a", tmp_path / "b"]
    for spool_dir in spools:
        spool_documents(spool_dir, documents)
    monkeypatch.setenv("TILED_API_KEY", shared_tiled_server.api_key)
    uri = f"{shared_tiled_server.uri}/api/v1/metadata/{container}"
    uploaders = [Uploader(_config(d, uri), SpoolDir(d, create=False)) for d in spools]
    threads = [threading.Thread(target=up.run, kwargs={"until_idle": True}) for up in uploaders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    states = sorted(_state(d, uid).state for d in spools)
    assert states == [UploadState.QUARANTINED, UploadState.UPLOADED]
    loser = next(d for d in spools if _state(d, uid).state == UploadState.QUARANTINED)
    assert "did not create it" in (_state(loser, uid).reason or "")
    assert sum(up.status.rewrites for up in uploaders) == 0
    assert read_seq_nums(shared_tiled_server.client()[container], uid, "primary") == list(range(1, 201))
