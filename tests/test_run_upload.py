"""One run's upload in milliseconds: feed, flush, verify, finish, start, and the idle cost.

A real spool in tmp_path is written by the real `RunSpooler`; only Tiled is
faked (`FakeTiled`: each run's tables as lists of ``seq_num``, standing in for
`TiledRun` and the `tiled_client` requests `run_upload` makes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_tiled import FakeClient, FakeTiled, Spool, scan
from tiled_writer_sidecar.errors import BadRunDocument, UnsafeName
from tiled_writer_sidecar.outcomes import VerificationFailed
from tiled_writer_sidecar.run_upload import RunUpload, SeqNums, Shared
from tiled_writer_sidecar.spool.index import Received, Uploaded, UploaderStatus, UploadState
from tiled_writer_sidecar.tiled_link import TiledLink


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


@pytest.fixture
def tiled(monkeypatch: pytest.MonkeyPatch) -> FakeTiled:
    return FakeTiled().install(monkeypatch)


@pytest.fixture
def shared(spool: Spool, tiled: FakeTiled) -> Shared:
    status = UploaderStatus()
    link = TiledLink(spool.config, status, stop=__import__("threading").Event(), report=lambda: None)
    link.client = FakeClient()
    return Shared(spool.config, spool.dir, link, status)


def started(spool: Spool, shared: Shared, uid: str) -> RunUpload:
    run = RunUpload.start(spool.view(uid), shared)
    assert run is not None
    return run


def pump_until_finished(run: RunUpload, passes: int = 10) -> None:
    for _ in range(passes):
        run.pump()
        if run.finished:
            return
    raise AssertionError(f"run {run.uid} not finished after {passes} passes")


# ----------------------------------------------------------------- one run, start to end


def test_a_closed_run_is_fed_verified_and_recorded_uploaded(
    spool: Spool, tiled: FakeTiled, shared: Shared
) -> None:
    """pending -> uploading -> uploaded: every row in Tiled once, in order; counts and rows recorded."""
    uid = spool.closed_run(events=5)
    run = started(spool, shared, uid)
    assert Uploaded.load(spool.dir.run_dir(uid)).state == UploadState.UPLOADING
    pump_until_finished(run)
    uploaded = Uploaded.load(spool.dir.run_dir(uid))
    assert uploaded.state == UploadState.UPLOADED
    assert uploaded.documents == 8 and uploaded.rows == {"primary": 5}
    assert tiled.runs[uid] == {"primary": [1, 2, 3, 4, 5]}
    assert (shared.status.runs_uploaded, shared.status.documents, shared.status.rows) == (1, 8, 5)


def test_a_row_lost_in_tiled_fails_verification_and_leaves_the_run_uploading(
    spool: Spool, tiled: FakeTiled, shared: Shared
) -> None:
    """The read-back differs from what was fed: VerificationFailed, never ``uploaded``."""
    uid, docs, stop = scan(events=4)
    open_run = spool.open(docs)
    run = started(spool, shared, uid)
    run.pump()
    run.flush()
    tiled.runs[uid]["primary"].remove(2)
    spool.close(open_run, stop)
    with pytest.raises(VerificationFailed, match="Tiled holds 3 rows"):
        pump_until_finished(run)
    assert Uploaded.load(spool.dir.run_dir(uid)).state == UploadState.UPLOADING


def test_start_rewrites_a_partial_upload_and_quarantines_a_run_it_never_started(
    spool: Spool, tiled: FakeTiled, shared: Shared
) -> None:
    """``uploading`` + in Tiled: deleted, then written again; ``pending`` + in Tiled: quarantined, untouched."""
    ours, foreign = spool.closed_run(), spool.closed_run()
    Uploaded(state=UploadState.UPLOADING).save(spool.dir.run_dir(ours))
    tiled.runs[ours] = {"primary": [1]}
    tiled.runs[foreign] = {"primary": [7]}
    run = started(spool, shared, ours)
    assert tiled.deleted == [ours] and shared.status.rewrites == 1
    pump_until_finished(run)
    assert tiled.runs[ours] == {"primary": [1, 2, 3]}
    assert RunUpload.start(spool.view(foreign), shared) is None
    uploaded = Uploaded.load(spool.dir.run_dir(foreign))
    assert uploaded.state == UploadState.QUARANTINED and "already in Tiled" in (uploaded.reason or "")
    assert tiled.runs[foreign] == {"primary": [7]} and shared.status.runs_quarantined == 1


@pytest.mark.parametrize(
    ("tamper", "error"),
    [
        (lambda docs: docs.insert(1, ("start", {**docs[0][1], "uid": "other"})), BadRunDocument),
        (lambda docs: docs[1][1].update(run_start="another-run"), BadRunDocument),
        (lambda docs: docs[2][1].update(descriptor="not-a-descriptor"), BadRunDocument),
        (lambda docs: docs[1][1].update(name="../other/primary"), UnsafeName),
    ],
    ids=["second-start", "descriptor-of-another-run", "event-of-unknown-descriptor", "unsafe-stream"],
)
def test_a_document_not_of_this_run_is_refused_before_tiled_sees_it(
    spool: Spool, tiled: FakeTiled, shared: Shared, tamper: Any, error: type[Exception]
) -> None:
    """What is read back from the spool is untrusted: the run is refused (to be quarantined)."""
    uid, docs, _ = scan()
    tamper(docs)
    spool.open(docs)
    run = started(spool, shared, uid)
    with pytest.raises(error):
        run.pump()
    assert tiled.runs.get(uid, {}).get("primary", []) == []


# ----------------------------------------------------------------- idle cost (issue 14)


def test_an_idle_open_run_reads_received_json_only_when_it_changes(
    spool: Spool, tiled: FakeTiled, shared: Shared, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Caught up and open, 50 passes read received.json at most once; new documents and the
    close (each rewrites the file) are seen on the next pass, and the run finishes."""
    uid, docs, stop = scan(events=2)
    open_run = spool.open(docs)
    run = started(spool, shared, uid)
    run.pump()
    run.flush()
    loads: list[Path] = []
    real_load = Received.load
    monkeypatch.setattr(Received, "load", classmethod(lambda cls, d: loads.append(d) or real_load(d)))
    for _ in range(50):
        run.pump()
    assert len(loads) <= 1 and run.waiting and run.caught_up
    loads.clear()
    event = dict(docs[-1][1], uid="another-event", seq_num=3)
    spool.append(open_run, [("event", event)])
    assert run.pump() and run.fed == 5
    assert len(loads) == 1
    spool.close(open_run, stop)
    run.pump()
    assert len(loads) == 2 and run.received.closed
    pump_until_finished(run)
    assert tiled.runs[uid] == {"primary": [1, 2, 3]}


# ----------------------------------------------------------------- seq_num bookkeeping


def test_seq_nums_compare_in_order() -> None:
    """Verification compares order, not only the set: a moved row is a difference."""
    fed = SeqNums.of([1, 2, 3, 4, 5])
    assert fed.ranges == [[1, 5]] and fed.count == 5
    assert SeqNums.of([1, 2, 3, 4, 5]) == fed
    assert SeqNums.of([1, 2, 4, 3, 5]) != fed
    assert "out of order (row 2 holds seq_num 4)" in fed.describe_difference([1, 2, 4, 3, 5])
    assert "1 duplicated" in fed.describe_difference([1, 2, 3, 4, 4, 5])
    assert "Tiled holds 4 rows" in fed.describe_difference([1, 2, 3, 4])


def test_seq_nums_keep_duplicates_and_gaps_as_fed() -> None:
    """What a publisher sent (holes, repeats) is what Tiled must hold: no endless rewrite for it."""
    values: list[Any] = [1, 2, 2, 5, 6, 3]
    assert SeqNums.of(values).values() == values
