"""RunSpooler: staging, one write per flush, drops and received.json, on a real spool in tmp_path."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tiled_writer_sidecar.config import SpoolConfig
from tiled_writer_sidecar.receive.counters import ReceiverStats
from tiled_writer_sidecar.receive.spooler import STAGE_RECORDS, RunSpooler
from tiled_writer_sidecar.spool.codec import pack_document, unpack_document
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.record import HEADER_SIZE
from tiled_writer_sidecar.spool.segment import LogReader, LogWriter
from tiled_writer_sidecar.spool.state_files import Received


def make(tmp_path: Path, **settings: object) -> RunSpooler:
    config = SpoolConfig(dir=str(tmp_path / "spool"), **settings)  # type: ignore[arg-type]
    return RunSpooler(config, SpoolDir(tmp_path / "spool"), ReceiverStats())


def payload(n: int) -> bytes:
    return pack_document("event", {"uid": f"e{n}", "seq_num": n, "data": {"x": n}})


def logged(spooler: RunSpooler, uid: str) -> list[bytes]:
    return list(LogReader(spooler.spool.run_dir(uid)).read())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_staged_documents_are_counted_at_once_and_written_in_order_at_flush(tmp_path: Path) -> None:
    """Three documents staged: counted in received and stats, on disk only after flush, in order."""
    spooler = make(tmp_path)
    run = spooler.open(Received(uid="r1"))
    records = [payload(n) for n in range(3)]
    for record in records:
        spooler.stage(run, "event", record)
    assert run.received.documents == 3 and spooler.stats.documents["event"] == 3
    assert run.received.bytes == sum(HEADER_SIZE + len(r) for r in records)
    assert logged(spooler, "r1") == []
    spooler.flush(run)
    assert logged(spooler, "r1") == records
    assert [unpack_document(r)[1]["seq_num"] for r in logged(spooler, "r1")] == [0, 1, 2]


def test_a_run_is_written_by_itself_at_stage_records(tmp_path: Path) -> None:
    """STAGE_RECORDS staged documents are written without a flush (a long wake never holds them all)."""
    spooler = make(tmp_path)
    run = spooler.open(Received(uid="r1"))
    for n in range(STAGE_RECORDS):
        spooler.stage(run, "event", payload(n))
    assert len(logged(spooler, "r1")) == STAGE_RECORDS


def test_fsync_always_writes_each_document_when_staged(tmp_path: Path) -> None:
    """fsync = "always": nothing waits in memory."""
    spooler = make(tmp_path, fsync="always")
    run = spooler.open(Received(uid="r1"))
    spooler.stage(run, "event", payload(1))
    assert logged(spooler, "r1") == [payload(1)]


def test_received_json_never_counts_a_record_that_is_not_in_the_log(tmp_path: Path) -> None:
    """save() writes the staged records first; the saved count equals the records in the log."""
    spooler = make(tmp_path)
    run = spooler.open(Received(uid="r1"))
    for n in range(5):
        spooler.stage(run, "event", payload(n))
    spooler.save(run)
    saved = Received.load(spooler.spool.run_dir("r1"))
    assert saved is not None and saved.documents == len(logged(spooler, "r1")) == 5


def test_over_max_bytes_only_control_documents_are_kept(tmp_path: Path) -> None:
    """At the spool size limit an event is dropped (counted, said once), a stop still kept."""
    spooler = make(tmp_path, max_bytes=1)
    run = spooler.open(Received(uid="r1"))
    spooler.stage(run, "event", payload(1))
    spooler.stage(run, "stop", pack_document("stop", {"uid": "s", "run_start": "r1"}))
    spooler.flush(run)
    assert run.received.dropped == 1 and spooler.stats.dropped == 1
    assert not spooler.stats.spool_writable
    assert [unpack_document(r)[0] for r in logged(spooler, "r1")] == ["stop"]


def test_a_write_the_disk_refuses_is_uncounted_and_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC on the write: the documents are uncounted, counted as dropped, nothing raises."""
    spooler = make(tmp_path)
    run = spooler.open(Received(uid="r1"))
    for n in range(2):
        spooler.stage(run, "event", payload(n))

    def full(self: LogWriter, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LogWriter, "_write", full)
    spooler.flush(run)
    assert run.received.documents == 0 and run.received.bytes == 0
    assert run.received.dropped == 2 and spooler.stats.documents["event"] == 0
    assert not spooler.stats.spool_writable


def test_each_open_run_holds_one_file_descriptor_and_close_releases_it(tmp_path: Path) -> None:
    """Ten open runs: ten more descriptors; closed, none, and their state is saved."""
    spooler = make(tmp_path)
    before = open_fds()
    runs = [spooler.open(Received(uid=f"r{n}")) for n in range(10)]
    assert open_fds() - before == 10
    for run in runs:
        spooler.stage(run, "event", payload(1))
        run.received.close("stop")
        spooler.close(run)
    assert open_fds() == before and spooler.open_files == {}
    saved = Received.load(spooler.spool.run_dir("r3"))
    assert saved is not None and saved.closed and saved.documents == 1


def test_shutdown_writes_and_saves_open_runs_and_resume_appends_after_them(tmp_path: Path) -> None:
    """shutdown() leaves a run open on disk; a new spooler resumes it and appends after its records."""
    spooler = make(tmp_path)
    run = spooler.open(Received(uid="r1"))
    spooler.stage(run, "event", payload(1))
    spooler.shutdown([run])
    saved = Received.load(spooler.spool.run_dir("r1"))
    assert saved is not None and not saved.closed and saved.documents == 1
    again = make(tmp_path)
    resumed = again.resume(saved)
    again.stage(resumed, "event", payload(2))
    again.flush(resumed)
    assert logged(again, "r1") == [payload(1), payload(2)]


def test_closing_a_run_saved_a_moment_ago_still_saves_it_closed(tmp_path: Path) -> None:
    """A run saved (nothing changed since), then closed: received.json says closed, with the reason."""
    spooler = make(tmp_path)
    run = spooler.open(Received(uid="r1"))
    spooler.stage(run, "start", payload(0))
    spooler.save(run)
    run.received.close("evicted")
    spooler.close(run)
    saved = Received.load(spooler.spool.run_dir("r1"))
    assert saved is not None and saved.closed and saved.close_reason == "evicted"
