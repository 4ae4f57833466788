"""The health snapshot in milliseconds: what makes the sidecar unhealthy, the backlog, uploader.json.

A real spool in tmp_path written by the real `RunSpooler` (tests/support/fake_tiled's
`Spool`); the receiver's counters are a plain `ReceiverStats`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.support.fake_tiled import Spool, scan
from tiled_writer_sidecar.daemon.health import LOOP_STALL_SECONDS, health_snapshot
from tiled_writer_sidecar.receive.counters import ReceiverStats
from tiled_writer_sidecar.receive.ledger import CHECKS_PER_SNAPSHOT, RECENT_RUNS, RunLedger
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.state_files import (
    Received,
    Uploaded,
    UploaderStatus,
    UploadState,
)


def test_an_empty_spool_without_an_uploader_yet_is_healthy_with_zero_counts(tmp_path: Path) -> None:
    """No uploader.json yet: Tiled's state is "unknown", upload counts are 0 and no status age is made up."""
    health = health_snapshot(ReceiverStats(), SpoolDir(tmp_path / "spool"), time.time())
    assert health.healthy and health.reasons == []
    assert health.tiled.state == "unknown" and health.tiled.since is None
    assert health.upload.documents == 0 and health.upload.status_age_seconds is None
    assert health.spool.backlog_runs == 0 and health.spool.oldest_unuploaded_age_seconds is None


def test_tiled_down_is_reported_but_is_not_unhealthy(tmp_path: Path) -> None:
    """The sidecar is built for a Tiled outage: uploader.json's state and error show, the status stays ok."""
    spool = SpoolDir(tmp_path / "spool")
    UploaderStatus(tiled="down", last_error="ConnectError: refused", documents=12, rows=9, retries=3).save(
        spool.root
    )
    health = health_snapshot(ReceiverStats(), spool, time.time())
    assert health.healthy
    assert (health.tiled.state, health.tiled.last_error) == ("down", "ConnectError: refused")
    assert (health.upload.documents, health.upload.rows, health.upload.retries) == (12, 9, 3)
    assert health.upload.status_age_seconds is not None and 0 <= health.upload.status_age_seconds < 60


def test_a_stalled_loop_an_unwritable_spool_and_a_broken_subscription_are_unhealthy(tmp_path: Path) -> None:
    """Each of the three conditions under which documents could be lost is a reason, and only those."""
    stats = ReceiverStats()
    stats.spool_writable = False
    stats.subscription_problem = "subscription lost: message too large"
    stalled = time.time() - LOOP_STALL_SECONDS - 5
    health = health_snapshot(stats, SpoolDir(tmp_path / "spool"), stalled)
    assert not health.healthy and health.status == "unhealthy"
    assert len(health.reasons) == 3
    assert health.reasons[0].startswith("receiver loop stalled")
    assert "not writable" in health.reasons[1] and health.reasons[2] == stats.subscription_problem


def test_backlog_counts_runs_not_yet_uploaded(tmp_path: Path) -> None:
    """Two spooled runs (one open, one closed), nothing uploaded: both are backlog, with every document."""
    spool = Spool(tmp_path / "spool")
    spool.closed_run(events=3, first_received=time.time() - 30)
    _, docs, _ = scan(events=2)
    spool.open(docs)
    health = health_snapshot(ReceiverStats(), spool.dir, time.time())
    assert health.spool.runs == 2 and health.spool.backlog_runs == 2
    assert health.spool.backlog_documents == (2 + 3 + 1) + (2 + 2)  # start, descriptor, events (, stop)
    assert health.spool.oldest_unuploaded_age_seconds is not None
    assert health.spool.oldest_unuploaded_age_seconds >= 29


def test_the_healthz_body_is_json_with_the_sections_the_monitor_reads(tmp_path: Path) -> None:
    """`as_dict` round-trips through JSON with status, reasons, receiver, spool, tiled, upload and runs."""
    spool = Spool(tmp_path / "spool")
    spool.closed_run()
    health = health_snapshot(ReceiverStats(), spool.dir, time.time())
    body = json.loads(json.dumps(health.as_dict()))
    assert set(body) == {"status", "reasons", "warnings", "receiver", "spool", "tiled", "upload", "runs"}
    assert body["spool"]["backlog_runs"] == 1 and len(body["runs"]) == 1
    assert health.status_line() == "received 0 docs; backlog 6 docs in 1 run(s); tiled unknown"


def test_with_a_ledger_a_snapshot_reads_a_bounded_number_of_run_files_and_learns_what_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 runs in the spool, taken over by a RunLedger: each snapshot reads at most CHECKS_PER_SNAPSHOT
    uploaded.json and RECENT_RUNS received.json files (never the whole spool), the backlog counts the
    waiting runs, and runs the uploader finished leave the backlog as the oldest are checked first."""
    spool = Spool(tmp_path / "spool")
    uids = [spool.closed_run(events=1, first_received=1000.0 + n) for n in range(300)]
    ledger = RunLedger(spool.dir)
    ledger.load(spool.dir.runs())
    stats = ReceiverStats(ledger=ledger)
    for uid in uids[:10]:
        Uploaded(state=UploadState.UPLOADED, documents=5).save(spool.dir.run_dir(uid))
    reads = {"uploaded": 0, "received": 0}
    real_uploaded, real_received = Uploaded.load, Received.load

    def count_uploaded(directory: Path) -> Uploaded:
        reads["uploaded"] += 1
        return real_uploaded(directory)

    def count_received(directory: Path) -> Received | None:
        reads["received"] += 1
        return real_received(directory)

    monkeypatch.setattr(Uploaded, "load", count_uploaded)
    monkeypatch.setattr(Received, "load", count_received)
    health = health_snapshot(stats, spool.dir, time.time())
    assert reads["uploaded"] <= CHECKS_PER_SNAPSHOT + RECENT_RUNS and reads["received"] <= RECENT_RUNS
    assert health.spool.runs == 300 and health.spool.backlog_runs == 290
    assert health.spool.oldest_unuploaded_age_seconds is not None
    assert [r["uid"] for r in health.runs] == uids[-RECENT_RUNS:]
    ledger.note(Received(uid="new-run", documents=7))
    after = health_snapshot(stats, spool.dir, time.time()).spool
    assert after.backlog_runs == 291 and after.backlog_documents == health.spool.backlog_documents + 7


def test_a_missing_proxy_or_a_wrong_tiled_setting_is_degraded_not_unhealthy(tmp_path: Path) -> None:
    """No proxy connection for a while, Tiled refusing the key or not being Tiled: status "degraded"
    (still served with 200) with a warning each; a Tiled that is merely down stays "ok"."""
    spool = SpoolDir(tmp_path / "spool")
    stats = ReceiverStats(proxy_absent="no connection to the proxy at tcp://127.0.0.1:1 for 5 s")
    UploaderStatus(tiled="not_tiled", last_error="http://x answers but is not a Tiled server").save(
        spool.root
    )
    health = health_snapshot(stats, spool, time.time())
    assert health.status == "degraded" and health.healthy and health.reasons == []
    assert health.warnings == [
        stats.proxy_absent,
        "tiled not_tiled: http://x answers but is not a Tiled server",
    ]
    UploaderStatus(tiled="down", last_error="ConnectError").save(spool.root)
    assert health_snapshot(ReceiverStats(), spool, time.time()).status == "ok"
