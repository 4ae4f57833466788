"""SpoolDir: uids matched whole, locks and run directories never through a symlink, the
quarantine bounded by bytes and files and counted in the spool's size."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from tiled_writer_sidecar.commands.status import status_report
from tiled_writer_sidecar.config import SpoolConfig
from tiled_writer_sidecar.daemon.health import health_snapshot
from tiled_writer_sidecar.errors import SpoolError
from tiled_writer_sidecar.receive.counters import ReceiverStats
from tiled_writer_sidecar.receive.ingest import Ingest
from tiled_writer_sidecar.spool import directory
from tiled_writer_sidecar.spool.check import verify_spool
from tiled_writer_sidecar.spool.directory import QUARANTINE_PREFIX, SpoolDir, is_safe_uid
from tiled_writer_sidecar.spool.segment import FsyncPolicy, LogWriter
from tiled_writer_sidecar.spool.state_files import Received
from tiled_writer_sidecar.upload.run_index import RunIndex


@pytest.mark.parametrize("uid", ["run\n", "run\r", "a/b", "..", "a..b", "", ".hidden", "x" * 129, "ü"])
def test_unsafe_uids_are_refused(uid: str) -> None:
    """A uid is safe only if it matches whole: a trailing newline is not."""
    assert not is_safe_uid(uid)


def test_a_usual_uid_is_safe() -> None:
    """bluesky's uuid4 uids are accepted."""
    assert is_safe_uid("5a2c4e1e-0000-4000-8000-000000000001")


@pytest.mark.parametrize("role", ["receiver", "uploader"])
def test_a_symlinked_lock_file_is_refused_and_its_target_kept(tmp_path: Path, role: str) -> None:
    """lock() and is_locked() refuse a lock file that is a symlink; the target is not truncated."""
    spool = SpoolDir(tmp_path / "spool")
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    (spool.root / f"{role}.lock").symlink_to(target)
    with pytest.raises(SpoolError, match="symlink"):
        spool.lock(role)
    with pytest.raises(SpoolError, match="symlink"):
        spool.is_locked(role)
    assert target.read_bytes() == b"precious"


def test_lock_still_locks(tmp_path: Path) -> None:
    """The lock is taken once; a second SpoolDir sees it held."""
    first, second = SpoolDir(tmp_path), SpoolDir(tmp_path)
    first.lock("receiver")
    assert second.is_locked("receiver")
    first.unlock()
    assert not second.is_locked("receiver")


def test_symlinked_run_directories_are_skipped(tmp_path: Path) -> None:
    """A run directory that is a symlink is not listed, read or counted."""
    spool = SpoolDir(tmp_path / "spool")
    elsewhere = tmp_path / "elsewhere"
    writer = LogWriter(elsewhere, 1 << 20, FsyncPolicy("never"))
    writer.append(b"x" * 1000)
    writer.close()
    Received(uid="evil").save(elsewhere)
    (spool.runs_dir / "evil").symlink_to(elsewhere)
    assert spool.runs() == [] and spool.total_bytes() == 0 and spool.segment_count() == 0


def test_a_symlinked_run_directory_is_never_listed_read_or_counted_by_receiver_uploader_status_verify(
    tmp_path: Path,
) -> None:
    """One open and one closed run planted elsewhere and linked into runs/: the receiver's recovery and
    size, the uploader's index, `status`, `/healthz` and `verify` all go through `run_listing` and
    neither read nor count them (verify names each as a refused symlink)."""
    spool = SpoolDir(tmp_path / "spool")
    for uid, closed in (("evil-open", False), ("evil-closed", True)):
        elsewhere = tmp_path / uid
        writer = LogWriter(elsewhere, 1 << 20, FsyncPolicy("never"))
        writer.append(b"x" * 1000)
        writer.close()
        Received(uid=uid, documents=1, bytes=1000, closed=closed, stop_received=closed).save(elsewhere)
        (spool.runs_dir / uid).symlink_to(elsewhere)
    planted = {
        uid: sorted(p.name for p in (tmp_path / uid).iterdir()) for uid in ("evil-open", "evil-closed")
    }
    run_dirs, links = spool.run_listing()
    assert run_dirs == [] and sorted(links) == ["evil-closed", "evil-open"]
    ingest = Ingest(SpoolConfig(dir=str(spool.root)), spool, ReceiverStats())
    assert ingest.recover() == [] and ingest.tracker.runs == {} and ingest.ledger.runs == 0
    ingest.upkeep()
    index = RunIndex(spool)
    index.refresh()
    assert index.known == set() and index.next_closed() is None and index.live() == []
    report = status_report(spool)
    assert report["runs"] == [] and report["totals"]["bytes"] == 0
    health = health_snapshot(ReceiverStats(), spool, loop_beat=time.time())
    assert health.spool.runs == health.spool.backlog_runs == 0
    assert [(r.run, r.records, r.problem) for r in verify_spool(spool)] == [
        ("evil-closed", 0, "a symlink: not read, not repaired"),
        ("evil-open", 0, "a symlink: not read, not repaired"),
    ]
    assert planted == {uid: sorted(p.name for p in (tmp_path / uid).iterdir()) for uid in planted}


def test_quarantine_keeps_a_prefix_of_a_large_frame(tmp_path: Path) -> None:
    """A frame larger than the prefix is kept as a header line (length, sha256) and its first bytes."""
    spool = SpoolDir(tmp_path)
    frame = os.urandom(3 * QUARANTINE_PREFIX)
    path = spool.quarantine("too-big", frame)
    assert path is not None
    header, _, kept = path.read_bytes().partition(b"\n")
    assert kept == frame[:QUARANTINE_PREFIX]
    assert f"length={len(frame)}".encode() in header
    assert hashlib.sha256(frame).hexdigest().encode() in header
    assert spool.total_bytes() == path.stat().st_size < len(frame)


def test_quarantine_is_bounded_by_bytes_and_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The oldest entries go first once either bound would be passed; 0 bytes keeps nothing."""
    spool = SpoolDir(tmp_path, quarantine_max_bytes=5 * QUARANTINE_PREFIX)
    for i in range(20):
        spool.quarantine("bad", bytes([i]) * QUARANTINE_PREFIX)
    names = sorted(p.name for p in spool.quarantine_dir.iterdir())
    assert len(names) == 5 and spool.quarantine_bytes() <= spool.quarantine_max_bytes
    assert (spool.quarantine_dir / names[0]).read_bytes()[:1] == bytes([15])
    monkeypatch.setattr(directory, "QUARANTINE_MAX_FILES", 3)
    for _ in range(4):
        spool.quarantine("small", b"tiny")
    assert len(list(spool.quarantine_dir.iterdir())) == 3
    spool.quarantine_max_bytes = 0
    assert spool.quarantine("bad", b"anything") is None


def test_quarantine_bytes_count_in_total_bytes_across_instances(tmp_path: Path) -> None:
    """Another process's SpoolDir (status, /healthz) counts the quarantine too."""
    SpoolDir(tmp_path).quarantine("bad", b"z" * 1000)
    assert SpoolDir(tmp_path).total_bytes() == 1000
