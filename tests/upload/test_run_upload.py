"""One run's upload in milliseconds: feed, flush, verify, finish, start, and the idle cost.

A real spool in tmp_path is written by the real `RunSpooler`; only Tiled is
faked (`FakeTiled`: each run's tables as lists of ``seq_num``, standing in for
`TiledRun` and the `tiled_calls` requests `run_upload` makes).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_tiled import FakeClient, FakeRunWriter, FakeTiled, Spool, scan
from tiled_writer_sidecar.errors import BadRunDocument, UnsafeName
from tiled_writer_sidecar.spool.codec import pack_document
from tiled_writer_sidecar.spool.state_files import (
    Received,
    Uploaded,
    UploaderStatus,
    UploadState,
)
from tiled_writer_sidecar.upload import run_upload
from tiled_writer_sidecar.upload.connection import TiledLink
from tiled_writer_sidecar.upload.policy import ForeignRun, VerificationFailed
from tiled_writer_sidecar.upload.run_upload import (
    Phase,
    RunUpload,
    SeqNums,
    UploadContext,
)


@pytest.fixture
def context(spool: Spool, tiled: FakeTiled) -> UploadContext:
    status = UploaderStatus()
    link = TiledLink(spool.config, status, stop=__import__("threading").Event(), report=lambda: None)
    link.client = FakeClient()
    return UploadContext(spool.config, spool.dir, link, status)


def started(spool: Spool, context: UploadContext, uid: str) -> RunUpload:
    run = RunUpload.start(spool.view(uid), context)
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
    spool: Spool, tiled: FakeTiled, context: UploadContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pending (+ creating, before the create) -> uploading (once Tiled created the run: one write) ->
    uploaded: every row in Tiled once, in order; counts and rows recorded; uploaded.json written three
    times for a small run."""
    uid = spool.closed_run(events=5)
    saves: list[str] = []
    real_save = Uploaded.save
    monkeypatch.setattr(Uploaded, "save", lambda self, d: saves.append(self.state) or real_save(self, d))
    run = started(spool, context, uid)
    assert Uploaded.load(spool.dir.run_dir(uid)).state == UploadState.PENDING and uid not in tiled.runs
    pump_until_finished(run)
    assert saves == [UploadState.PENDING, UploadState.UPLOADING, UploadState.UPLOADED]
    uploaded = Uploaded.load(spool.dir.run_dir(uid))
    assert uploaded.state == UploadState.UPLOADED
    assert uploaded.documents == 8 and uploaded.rows == {"primary": 5}
    assert tiled.runs[uid] == {"primary": [1, 2, 3, 4, 5]}
    assert (context.status.runs_uploaded, context.status.documents, context.status.rows) == (1, 8, 5)
    assert uploaded.created and not uploaded.creating and uploaded.attempts == 1


def test_a_row_lost_in_tiled_fails_verification_and_leaves_the_run_uploading(
    spool: Spool, tiled: FakeTiled, context: UploadContext
) -> None:
    """The read-back differs from what was fed: VerificationFailed, never ``uploaded``."""
    uid, docs, stop = scan(events=4)
    open_run = spool.open(docs)
    run = started(spool, context, uid)
    run.pump()
    run.flush()
    tiled.runs[uid]["primary"].remove(2)
    spool.close(open_run, stop)
    with pytest.raises(VerificationFailed, match="Tiled holds 3 rows"):
        pump_until_finished(run)
    assert Uploaded.load(spool.dir.run_dir(uid)).state == UploadState.UPLOADING


def test_rows_tiled_acknowledged_as_fed_are_not_read_back_and_a_shortfall_is(
    spool: Spool, tiled: FakeTiled, context: UploadContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream whose appends Tiled acknowledged at once, as many rows as fed, is verified by that count:
    no read-back request. Fewer acknowledged than fed: the stream is read back (and here, short, fails)."""
    acknowledged: dict[str, int] = {}
    monkeypatch.setattr(FakeRunWriter, "acknowledged_rows", lambda self, stream: acknowledged[self.uid])
    read_back: list[str] = []
    real_read = run_upload.read_seq_nums
    monkeypatch.setattr(
        run_upload, "read_seq_nums", lambda c, uid, stream: read_back.append(uid) or real_read(c, uid, stream)
    )
    good, short = spool.closed_run(events=4), spool.closed_run(events=4)
    acknowledged.update({good: 4, short: 3})
    pump_until_finished(started(spool, context, good))
    assert read_back == [] and Uploaded.load(spool.dir.run_dir(good)).rows == {"primary": 4}

    real_flush = FakeRunWriter.flush

    def losing_the_last_row(self: FakeRunWriter) -> float | None:
        lag = real_flush(self)
        del tiled.runs[self.uid]["primary"][3:]
        return lag

    monkeypatch.setattr(FakeRunWriter, "flush", losing_the_last_row)
    with pytest.raises(VerificationFailed, match="Tiled holds 3 rows"):
        pump_until_finished(started(spool, context, short))
    assert read_back == [short]


def test_start_rewrites_a_partial_upload_it_created_and_never_touches_a_run_it_did_not(
    spool: Spool, tiled: FakeTiled, context: UploadContext
) -> None:
    """``uploading`` + created here + in Tiled: deleted just before its start is fed again, both while a
    placeholder holds Tiled's highest node id. Not created here + in Tiled: the create answers 409 ->
    ForeignRun (quarantined by the scheduler); nothing deleted, not even for a run recorded
    ``uploading`` (an older import-backup) or ``quarantined``."""
    ours, foreign, imported = spool.closed_run(), spool.closed_run(), spool.closed_run()
    Uploaded(state=UploadState.UPLOADING, created=True).save(spool.dir.run_dir(ours))
    Uploaded(state=UploadState.QUARANTINED, created=False).save(spool.dir.run_dir(imported))
    tiled.runs[ours] = {"primary": [1]}
    tiled.runs[foreign] = {"primary": [7]}
    tiled.runs[imported] = {"primary": [8]}
    run = started(spool, context, ours)
    assert tiled.deleted == [] and context.status.rewrites == 0  # nothing until its start is fed
    pump_until_finished(run)
    assert tiled.deleted == [ours] and context.status.rewrites == 1
    assert tiled.placeholders == [(ours, [ours], [ours])]
    assert tiled.runs[ours] == {"primary": [1, 2, 3]}
    for uid in (foreign, imported, foreign):  # the second try (a replay) finds the same: foreign
        with pytest.raises(ForeignRun, match="already in Tiled and this spool did not create it"):
            started(spool, context, uid).pump()
        assert not Uploaded.load(spool.dir.run_dir(uid)).creating
    assert tiled.runs[foreign] == {"primary": [7]} and tiled.runs[imported] == {"primary": [8]}
    assert tiled.deleted == [ours]
    assert not Uploaded.load(spool.dir.run_dir(foreign)).created


def test_overwrite_foreign_deletes_a_run_this_spool_did_not_create(
    spool: Spool, tiled: FakeTiled, context: UploadContext
) -> None:
    """Only with the explicit flag (`replay --overwrite-foreign`)."""
    foreign = spool.closed_run()
    tiled.runs[foreign] = {"primary": [7]}
    context.overwrite_foreign = True
    pump_until_finished(started(spool, context, foreign))
    assert tiled.deleted == [foreign] and tiled.runs[foreign] == {"primary": [1, 2, 3]}
    assert Uploaded.load(spool.dir.run_dir(foreign)).created


def test_an_upload_cut_between_create_and_record_is_rewritten_not_quarantined(
    spool: Spool, tiled: FakeTiled, context: UploadContext
) -> None:
    """``creating`` left set by a killed uploader + the run in Tiled holds this spool's start: it is this
    spool's own run, deleted and written again. The same uid created from another start stays foreign."""
    ours, other = spool.closed_run(), spool.closed_run()
    first = started(spool, context, ours)
    first.pump()  # creates the run in Tiled...
    Uploaded(state=UploadState.PENDING, creating=True).save(spool.dir.run_dir(ours))  # ...then killed
    assert not Uploaded.load(spool.dir.run_dir(ours)).created
    pump_until_finished(started(spool, context, ours))
    assert tiled.deleted == [ours] and tiled.runs[ours] == {"primary": [1, 2, 3]}
    assert tiled.placeholders == [(ours, [ours], [ours])]  # deleted and created again under it
    assert Uploaded.load(spool.dir.run_dir(ours)).state == UploadState.UPLOADED

    Uploaded(state=UploadState.PENDING, creating=True).save(spool.dir.run_dir(other))
    tiled.runs[other] = {"primary": [7]}
    tiled.starts[other] = {"uid": other, "time": 0.0}
    with pytest.raises(ForeignRun):
        started(spool, context, other).pump()
    assert tiled.runs[other] == {"primary": [7]} and tiled.deleted == [ours]
    assert not Uploaded.load(spool.dir.run_dir(other)).creating


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
    spool: Spool, tiled: FakeTiled, context: UploadContext, tamper: Any, error: type[Exception]
) -> None:
    """What is read back from the spool is untrusted: the run is refused (to be quarantined)."""
    uid, docs, _ = scan()
    tamper(docs)
    spool.open(docs)
    run = started(spool, context, uid)
    with pytest.raises(error):
        run.pump()
    assert tiled.runs.get(uid, {}).get("primary", []) == []


# ----------------------------------------------------------------- idle cost (issue 14)


def test_an_idle_open_run_reads_received_json_only_when_it_changes(
    spool: Spool, tiled: FakeTiled, context: UploadContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Caught up and open, 50 passes read received.json at most once; new documents and the
    close (each rewrites the file) are seen on the next pass, and the run finishes."""
    uid, docs, stop = scan(events=2)
    open_run = spool.open(docs)
    run = started(spool, context, uid)
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


def test_a_late_seq_num_copy_verifies_against_the_tables_own_order() -> None:
    """Tiled reads a stream table back in seq_num order: a late copy of seq_num 1 (after 5) is where
    Tiled puts it, not a difference that would rewrite the run forever; a missing row still is."""
    fed = SeqNums.of([1, 2, 3, 4, 5, 1])
    assert fed.matches([1, 1, 2, 3, 4, 5]) and fed.matches([1, 2, 3, 4, 5, 1])
    assert not fed.matches([1, 2, 3, 4, 5]) and not fed.matches([1, 1, 2, 3, 5, 4])


def test_seq_nums_keep_duplicates_and_gaps_as_fed() -> None:
    """What a publisher sent (holes, repeats) is what Tiled must hold: no endless rewrite for it."""
    values: list[Any] = [1, 2, 2, 5, 6, 3]
    assert SeqNums.of(values).values() == values


def test_a_waiting_run_has_news_as_soon_as_its_log_grows(spool: Spool, context: UploadContext) -> None:
    """A run read to its end waits without passes, yet the next event appended to its log wakes it at
    once: received.json, which the receiver saves about once a second, is not what it waits for."""
    uid, docs, stop = scan(events=2)
    open_run = spool.open(docs[:3])  # start, descriptor, one event
    run = started(spool, context, uid)
    run.pump()
    run.pump()
    assert run.waiting and not run.has_news()
    state = (spool.dir.run_dir(uid) / "received.json").read_bytes()
    for name, doc in docs[3:]:  # what the receiver does between two saves of received.json
        spool.spooler.stage(open_run, name, pack_document(name, doc))
    spool.spooler.flush(open_run)
    assert (spool.dir.run_dir(uid) / "received.json").read_bytes() == state
    assert run.has_news()
    run.pump()
    assert run.fed == 4
    spool.close(open_run, stop)
    assert run.has_news()


def test_a_live_run_paces_its_appends_only_while_a_backlog_drains(
    spool: Spool, tiled: FakeTiled, context: UploadContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run being acquired writes its rows as soon as it reads them; while backlog runs use Tiled's tables
    it appends at most every LIVE_PACE_S, its rows held (and coalesced) meanwhile, not lost."""
    tiled_config = dataclasses.replace(context.config.tiled, batch_seconds=60.0)  # no batch falls due
    monkeypatch.setattr(context, "config", dataclasses.replace(context.config, tiled=tiled_config))
    uid, docs, stop = scan(events=3)
    open_run = spool.open(docs[:3])  # start, descriptor, event 1
    run = started(spool, context, uid)
    run.pump()
    assert tiled.runs[uid] == {"primary": [1]}  # the first row at once
    with context.tables_lock.lane(live=False):
        pass  # a backlog run just sent a table request
    spool.append(open_run, docs[3:4])
    run.pump()
    assert tiled.runs[uid] == {"primary": [1]} and run.tiled.buffered_rows() == 1 and not run.waiting
    run.last_flush -= run_upload.LIVE_PACE_S
    run.pump()
    assert tiled.runs[uid] == {"primary": [1, 2]}
    monkeypatch.setattr(run_upload, "BACKLOG_RECENT_S", 0.0)  # the backlog is done
    spool.append(open_run, docs[4:5])
    run.pump()
    assert tiled.runs[uid] == {"primary": [1, 2, 3]}
    spool.close(open_run, stop)
    pump_until_finished(run)


def test_each_pass_sets_the_phase_from_what_it_read(
    spool: Spool, tiled: FakeTiled, context: UploadContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass that reads a full batch leaves the run READING (it holds a slot), one that reads fewer
    CAUGHT_UP, one that reads nothing and holds no rows WAITING; read to the end and closed, DONE."""
    monkeypatch.setattr(run_upload, "RECORDS_PER_PUMP", 3)
    uid, docs, stop = scan(events=2)  # 4 records
    open_run = spool.open(docs)
    run = started(spool, context, uid)
    assert run.phase is Phase.READING and run.busy
    run.pump()
    assert run.phase is Phase.READING and run.busy and run.fed == 3
    run.pump()
    assert run.phase is Phase.CAUGHT_UP and run.caught_up and not (run.busy or run.waiting)
    run.pump()
    assert run.phase is Phase.WAITING and run.waiting and run.idle
    spool.close(open_run, stop)
    pump_until_finished(run)
    assert run.phase is Phase.DONE and run.finished and tiled.runs[uid] == {"primary": [1, 2]}
