"""The scheduler in milliseconds: the quarantine rule, candidates, slots, parking, uploader.json.

A real spool in tmp_path, written by the real `RunSpooler`; Tiled is the fake
of tests/support/fake_tiled.py, and "is Tiled answering other requests"
(`TiledLink.reachable`) is set by each test.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_tiled import FakeClient, FakeRunWriter, FakeTiled, Spool, http_error, scan, transport
from tiled_writer_sidecar.backoff import Backoff
from tiled_writer_sidecar.config import Config, SpoolConfig
from tiled_writer_sidecar.errors import TiledUnavailableError, UnsafeName
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.state_files import (
    UPLOADER,
    Received,
    RunView,
    Uploaded,
    UploaderStatus,
    UploadState,
)
from tiled_writer_sidecar.states import TiledState
from tiled_writer_sidecar.upload import connection, run_index, run_upload
from tiled_writer_sidecar.upload import scheduler as uploader_module
from tiled_writer_sidecar.upload.connection import IN_PLACE_ATTEMPTS
from tiled_writer_sidecar.upload.policy import (
    MAX_RUN_FAILURES,
    AppendAmbiguous,
    Decided,
    Outcome,
    Stopping,
    decide,
)
from tiled_writer_sidecar.upload.scheduler import MAX_ACTIVE_RUNS, DrainRate, Uploader

# ----------------------------------------------------------------- the quarantine rule


@pytest.fixture
def uploader(tmp_path: Path) -> Uploader:
    spool = SpoolDir(tmp_path / "spool")
    return Uploader(Config(spool=SpoolConfig(dir=str(spool.root))), spool, workers=0)


def planted_run(uploader: Uploader, uid: str = "run-1") -> RunView:
    directory = uploader.spool.runs_dir / uid
    directory.mkdir()
    received = Received(uid=uid, closed=True)
    received.save(directory)
    Uploaded(state="uploading").save(directory)
    return RunView(directory, received, Uploaded.load(directory))


def fail(uploader: Uploader, view: RunView, err: Exception, fed: int = 7) -> bool:
    """Report one failure of `view`'s upload; True if it paused everyone (handed up, decided), False if the
    run backs off alone or was quarantined."""
    try:
        uploader._run_failed(view, err, fed=fed)
    except Decided as raised:
        assert raised.err is err and raised.rule is decide(err)
        return True
    return False


def reachable(uploader: Uploader, answers: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uploader.link, "reachable", lambda: answers)


def test_the_same_rejection_twice_while_tiled_answers_quarantines_with_the_reason(
    uploader: Uploader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once: the run backs off alone (reason in uploaded.json); twice in a row: quarantined, with the reason."""
    reachable(uploader, True, monkeypatch)
    view = planted_run(uploader)
    assert not fail(uploader, view, http_error(422))
    once = Uploaded.load(view.directory)
    assert once.state == "uploading" and "422" in (once.reason or "") and "retried in" in (once.reason or "")
    assert "run-1" in uploader.index.out and "run-1" not in uploader.done
    assert not fail(uploader, view, http_error(422))
    uploaded = Uploaded.load(view.directory)
    assert uploaded.state == "quarantined"
    assert uploaded.reason is not None and "422" in uploaded.reason
    assert "failed 2 times the same way while Tiled answered" in uploaded.reason
    assert uploader.status.runs_quarantined == 1 and "run-1" in uploader.done


def test_a_document_tiledwriter_raises_on_is_quarantined_on_the_second_identical_failure(
    uploader: Uploader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deterministic failure of the documents (any exception inside TiledWriter) is decided in two attempts."""
    reachable(uploader, True, monkeypatch)
    view = planted_run(uploader)
    err = KeyError("Stream Resource det-key2-uid is referenced before being received")
    assert not fail(uploader, view, err, fed=5)
    assert not fail(uploader, view, err, fed=5)
    assert Uploaded.load(view.directory).state == "quarantined"


def test_rejections_while_tiled_does_not_answer_never_count(
    uploader: Uploader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 4xx seen while Tiled's root does not answer may be a proxy's: never counted (the run backs off)."""
    reachable(uploader, False, monkeypatch)
    view = planted_run(uploader)
    for _ in range(MAX_RUN_FAILURES * 2):
        fail(uploader, view, http_error(404))
    assert Uploaded.load(view.directory).state == "uploading"


def test_different_failures_add_up_to_a_bounded_number_of_attempts(
    uploader: Uploader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure at another place in the log starts the repeat count again, but every loop ends:
    MAX_RUN_FAILURES failures while Tiled answers quarantine the run."""
    reachable(uploader, True, monkeypatch)
    view = planted_run(uploader)
    for fed in range(MAX_RUN_FAILURES - 1):
        assert not fail(uploader, view, http_error(400), fed=fed)
    assert Uploaded.load(view.directory).state == "uploading"
    assert not fail(uploader, view, http_error(400), fed=99)
    uploaded = Uploaded.load(view.directory)
    assert uploaded.state == "quarantined" and f"failed {MAX_RUN_FAILURES} times" in (uploaded.reason or "")


@pytest.mark.parametrize(
    "err",
    [http_error(500), http_error(502), transport(httpx.ConnectError), transport(httpx.ReadTimeout)],
    ids=["500", "502", "connect", "read-timeout"],
)
def test_a_tiled_that_does_not_answer_pauses_everyone_and_never_quarantines_a_run(
    err: Exception, uploader: Uploader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14: Tiled down (its root does not answer) thirty times: re-raised each time (everyone pauses),
    the run is given back to be rewritten, never quarantined."""
    reachable(uploader, False, monkeypatch)
    view = planted_run(uploader)
    for _ in range(30):
        assert fail(uploader, view, err)
    assert Uploaded.load(view.directory).state == "uploading"
    assert uploader.status.runs_quarantined == 0


def test_a_500_tiled_gives_one_run_while_it_answers_is_that_runs_problem(
    uploader: Uploader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiled answers its root: the failing run backs off alone (nothing re-raised, no global pause), with a
    not-before time; the same 500 five times in a row quarantines it."""
    reachable(uploader, True, monkeypatch)
    view = planted_run(uploader)
    for _ in range(4):
        assert not fail(uploader, view, http_error(500))
        (not_before, uid), *_ = uploader.index.delayed
        assert uid == "run-1" and not_before > 0
    assert Uploaded.load(view.directory).state == "uploading"
    assert not fail(uploader, view, http_error(500))
    assert Uploaded.load(view.directory).state == "quarantined"
    assert uploader.link.backoff.attempt == 0  # the outage backoff was never touched


def test_an_api_key_refused_pauses_everyone(uploader: Uploader, monkeypatch: pytest.MonkeyPatch) -> None:
    reachable(uploader, True, monkeypatch)
    view = planted_run(uploader)
    for _ in range(5):
        assert fail(uploader, view, http_error(401))
    assert Uploaded.load(view.directory).state == "uploading"


def test_the_runs_own_bad_content_is_quarantined_at_once(
    uploader: Uploader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unsafe name needs no repeat and no request to Tiled."""
    reachable(uploader, False, monkeypatch)
    view = planted_run(uploader)
    assert not fail(uploader, view, UnsafeName("stream name '../other/primary' could address another node"))
    uploaded = Uploaded.load(view.directory)
    assert uploaded.state == "quarantined" and "../other/primary" in (uploaded.reason or "")
    assert "run-1" in uploader.done


def test_a_planted_run_directory_with_an_unsafe_uid_is_quarantined_not_activated(
    uploader: Uploader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A uid with a trailing newline (as `is_safe_uid` used to let through) never reaches Tiled."""
    reachable(uploader, True, monkeypatch)
    view = planted_run(uploader, "0123-abcd\n")
    uploader.link.client = object()  # any request would fail loudly: none must be made
    uploader.step()
    assert not uploader.active
    uploaded = Uploaded.load(view.directory)
    assert uploaded.state == "quarantined" and "not a safe Tiled key" in (uploaded.reason or "")


def test_received_json_naming_another_run_is_quarantined(
    uploader: Uploader, monkeypatch: pytest.MonkeyPatch
) -> None:
    reachable(uploader, True, monkeypatch)
    view = planted_run(uploader, "run-a")
    Received(uid="run-b", closed=True).save(view.directory)
    uploader.link.client = object()
    uploader.step()
    assert Uploaded.load(view.directory).state == "quarantined"


# ----------------------------------------------------------------- candidates, slots, parking


def scheduler(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> Uploader:
    """An Uploader on `spool`, connected to the fake Tiled, Tiled answering."""
    monkeypatch.setattr(run_index, "LISTING_INTERVAL_S", 0.0)  # each step sees new run directories
    uploader = Uploader(spool.config, spool.dir, workers=0)
    uploader.link.client = FakeClient()
    monkeypatch.setattr(uploader.link, "reachable", lambda: True)
    return uploader


def test_at_most_max_active_runs_with_a_backlog_oldest_first(
    spool: Spool, tiled: FakeTiled, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six closed runs: the four oldest start; the rest wait for a slot; all end uploaded, in order."""
    uids = [spool.closed_run(first_received=1000.0 - n) for n in range(MAX_ACTIVE_RUNS + 2)]
    oldest_first = uids[::-1]
    uploader = scheduler(spool, monkeypatch)
    uploader.index.refresh()
    uploader._schedule()
    assert list(uploader.active) == oldest_first[:MAX_ACTIVE_RUNS]
    uploader.run(until_idle=True)
    assert sorted(tiled.runs) == sorted(uids)
    assert uploader.done == set(uids) and not uploader.active
    assert all(Uploaded.load(spool.dir.run_dir(u)).state == UploadState.UPLOADED for u in uids)


def test_caught_up_open_runs_take_no_slot(
    spool: Spool, tiled: FakeTiled, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More open, caught-up runs than slots never keep a newer closed run waiting."""
    open_runs = [spool.open(scan()[1], first_received=100.0 + n) for n in range(MAX_ACTIVE_RUNS + 1)]
    uploader = scheduler(spool, monkeypatch)
    for _ in range(3):
        uploader.step()
    assert len(uploader.active) == len(open_runs)
    closed = spool.closed_run(first_received=500.0)
    for _ in range(3):
        uploader.step()
    assert closed in uploader.done
    assert Uploaded.load(spool.dir.run_dir(closed)).state == UploadState.UPLOADED


def test_beyond_the_memory_bound_the_longest_idle_run_is_parked_then_resumed(
    tmp_path: Path, tiled: FakeTiled, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_open_runs + MAX_ACTIVE_RUNS runs in memory at most; the parked one comes back (rewritten)
    once its log grows, and is uploaded whole once it closes."""
    spool = Spool(tmp_path / "spool", max_open_runs=1)
    runs = []
    for n in range(MAX_ACTIVE_RUNS + 2):
        uid, docs, stop = scan()
        runs.append((uid, spool.open(docs, first_received=100.0 + n), docs, stop))
    uploader = scheduler(spool, monkeypatch)
    for _ in range(6):
        uploader.step()
    assert len(uploader.active) == MAX_ACTIVE_RUNS + 1
    assert len(uploader.parked) == 1
    (parked,) = uploader.parked
    uid, spooled, docs, stop = next(r for r in runs if r[0] == parked)
    for _ in range(3):
        uploader.step()
    assert parked not in uploader.active  # unchanged: stays parked
    spool.close(spooled, stop)
    for _ in range(4):
        uploader.step()
    assert parked not in uploader.parked and parked in uploader.done
    assert tiled.runs[parked] == {"primary": [1, 2, 3]}
    assert Uploaded.load(spool.dir.run_dir(parked)).attempts == 2


def test_replay_of_named_runs_takes_only_those_and_retries_a_quarantined_one(
    spool: Spool, tiled: FakeTiled, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`only`: the named runs (a quarantined one too), never the others."""
    named, other = spool.closed_run(), spool.closed_run()
    Uploaded(state=UploadState.QUARANTINED, reason="earlier").save(spool.dir.run_dir(named))
    uploader = Uploader(spool.config, spool.dir, only={named}, workers=0)
    uploader.link.client = FakeClient()
    uploader.run(until_idle=True)
    assert list(tiled.runs) == [named]
    assert Uploaded.load(spool.dir.run_dir(other)).state == UploadState.PENDING


# ----------------------------------------------------------------- uploader.json


def test_uploader_json_is_written_and_read_back_as_the_typed_status(
    spool: Spool, tiled: FakeTiled, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the scheduler writes is what /metrics, /healthz and `status` load."""
    spool.closed_run(events=4)
    uploader = scheduler(spool, monkeypatch)
    uploader.run(until_idle=True)
    loaded = UploaderStatus.load(spool.dir.root)
    assert loaded is not None
    assert (loaded.runs_uploaded, loaded.documents, loaded.rows) == (1, 7, 4)
    assert loaded == uploader.status


def test_a_hostile_uploader_json_loads_as_plain_values(tmp_path: Path) -> None:
    """uploader.json is untrusted input: wrong types become defaults, nothing raises."""
    root = tmp_path / "spool"
    root.mkdir()
    assert UploaderStatus.load(root) is None
    (root / UPLOADER).write_text(
        json.dumps(
            {
                "tiled": ["up"],
                "documents": "12",
                "rows": 2**70,
                "retries": 3.0,
                "last_error": "x" * 10_000,
                "lag_seconds": [0.5, "1", True, None, 2.5],
                "lag_histogram": [1, 2],
                "updated": "now",
            }
        )
    )
    loaded = UploaderStatus.load(root)
    assert loaded is not None
    assert loaded.tiled == "unknown" and loaded.documents == 0 and loaded.rows == 0 and loaded.retries == 3
    assert loaded.last_error is not None and len(loaded.last_error) == 1024
    assert loaded.lag_seconds == [0.5, 2.5] and loaded.lag_histogram == {} and loaded.updated == 0.0
    (root / UPLOADER).write_text("not json")
    assert UploaderStatus.load(root) is None


# ----------------------------------------------------------------- isolation, lanes, cost per run


def test_a_poison_run_is_quarantined_in_two_attempts_while_the_runs_behind_it_upload(
    spool: Spool, tiled: FakeTiled, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TiledWriter raises on the oldest run's documents: it backs off alone, is quarantined on the second
    identical failure with the reason, and every run behind it is uploaded."""
    poison = spool.closed_run(first_received=1.0)
    good = [spool.closed_run(first_received=10.0 + n) for n in range(6)]
    real_feed = FakeRunWriter.feed

    def feed(self: FakeRunWriter, name: str, doc: dict[str, object]) -> None:
        if name == "event" and self.uid == poison:
            raise KeyError("Stream Resource det-key2-uid is referenced before being received")
        real_feed(self, name, doc)

    monkeypatch.setattr(FakeRunWriter, "feed", feed)
    uploader = scheduler(spool, monkeypatch)
    uploader.run(until_idle=True)
    assert all(Uploaded.load(spool.dir.run_dir(u)).state == UploadState.UPLOADED for u in good)
    bad = Uploaded.load(spool.dir.run_dir(poison))
    assert bad.state == UploadState.QUARANTINED and bad.attempts == 2
    assert "referenced before being received" in (bad.reason or "")
    assert uploader.status.runs_quarantined == 1 and uploader.status.runs_uploaded == len(good)


def test_a_run_another_writer_holds_in_tiled_is_quarantined_never_deleted(
    spool: Spool, tiled: FakeTiled, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The create answers 409: quarantined with that reason at once, nothing deleted, no run_exists asked."""
    foreign = spool.closed_run()
    tiled.runs[foreign] = {"primary": [7, 8]}
    asked: list[str] = []
    monkeypatch.setattr(run_upload, "run_exists", lambda client, uid: asked.append(uid) or uid in tiled.runs)
    uploader = scheduler(spool, monkeypatch)
    uploader.run(until_idle=True)
    uploaded = Uploaded.load(spool.dir.run_dir(foreign))
    assert uploaded.state == UploadState.QUARANTINED and not uploaded.created
    assert "did not create it" in (uploaded.reason or "")
    assert tiled.runs[foreign] == {"primary": [7, 8]} and tiled.deleted == [] and asked == []


def test_the_open_run_gets_a_slot_at_once_behind_a_backlog_of_closed_runs(
    spool: Spool, tiled: FakeTiled, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Live lane: with 60 older closed runs waiting, the first pass activates the open run."""
    backlog = [spool.closed_run(first_received=float(n)) for n in range(60)]
    uid, docs, _ = scan()
    spool.open(docs, first_received=1000.0)
    uploader = scheduler(spool, monkeypatch)
    uploader.step()
    assert uid in uploader.active
    assert sum(u in uploader.active for u in backlog) <= MAX_ACTIVE_RUNS
    assert tiled.runs[uid] == {"primary": [1, 2, 3]}  # its rows are in Tiled before the backlog drained


def test_drain_rate_and_backlog_eta_over_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """runs/s and rows/s over the samples of the last minute; ETA = backlog / runs/s."""
    now = [100.0]
    monkeypatch.setattr(uploader_module.time, "monotonic", lambda: now[0])
    rate = DrainRate()
    status = UploaderStatus()
    rate.sample(status, backlog=40)
    assert status.runs_per_second is None and status.backlog_runs == 40
    now[0], status.runs_uploaded, status.rows = 110.0, 20, 2000
    rate.sample(status, backlog=20)
    assert (status.runs_per_second, status.rows_per_second, status.backlog_eta_seconds) == (2.0, 200.0, 10.0)


def _plant_pending_runs(spool: SpoolDir, count: int) -> list[str]:
    """`count` closed runs, each a received.json only (no log), written fast (no fsync): a flood."""
    uids = [f"flood-{n:06d}" for n in range(count)]
    template = json.dumps(
        Received(uid="UID", closed=True, stop_received=True, first_received=1.0).fields_as_json()
    )
    for uid in uids:
        directory = spool.runs_dir / uid
        directory.mkdir()
        (directory / "received.json").write_text(template.replace("UID", uid))
    return uids


@pytest.mark.parametrize(
    ("runs", "drain_s"),
    [
        pytest.param(2 * run_index.INDEX_CHUNK + 500, 0.5, id="three-chunks"),
        pytest.param(50_000, 3.0, id="50000", marks=pytest.mark.slow),  # the scale measurement
    ],
)
def test_cost_per_run_not_per_spool(
    spool: Spool,
    tiled: FakeTiled,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    runs: int,
    drain_s: float,
) -> None:
    """`runs` closed runs in the spool (more than two index chunks; 50,000 for the `slow` measurement),
    then a real run: the first pass reads a bounded chunk of the spool (the index is built in chunks while
    runs upload), yet the real run (open, live lane) is in Tiled at once and uploaded when it closes; each
    received.json is read about once for the whole spool, then a bounded number of times per uploaded run
    (no pass over the spool per run); prints the time to the first upload and runs/s over `drain_s`."""
    flood = _plant_pending_runs(spool.dir, runs)
    uid, docs, stop = scan()
    real = spool.open(docs, first_received=10.0)
    loads = [0]
    real_load = Received.load
    monkeypatch.setattr(
        Received, "load", classmethod(lambda cls, d: loads.__setitem__(0, loads[0] + 1) or real_load(d))
    )
    uploader = scheduler(spool, monkeypatch)
    started = time.monotonic()
    uploader.step()
    first_pass = time.monotonic() - started
    assert uid in uploader.active and tiled.runs[uid] == {"primary": [1, 2, 3]}
    assert loads[0] <= run_index.INDEX_CHUNK + 10 and uploader.index.indexing, loads[0]
    first_upload = None
    spool.close(real, stop)
    while Uploaded.load(spool.dir.run_dir(uid)).state != UploadState.UPLOADED:
        uploader.step()
        if first_upload is None and uploader.status.runs_uploaded:
            first_upload = time.monotonic() - started
    to_real = time.monotonic() - started
    drained_from, drained_at = uploader.status.runs_uploaded, time.monotonic()
    while time.monotonic() - drained_at < drain_s:
        uploader.step()
    uploaded = uploader.status.runs_uploaded - drained_from
    rate = uploaded / (time.monotonic() - drained_at)
    assert uploaded > 0 and loads[0] <= len(flood) + 10 * uploader.status.runs_uploaded, loads[0]
    with capsys.disabled():
        print(
            f"\n{runs:,} runs in the spool: first pass {first_pass:.1f} s, first run uploaded {first_upload:.1f} s "
            f"and the real run {to_real:.1f} s after the start, then {rate:.0f} runs/s"
        )


def test_a_closed_run_of_a_batch_or_more_is_uploaded_alone(
    spool: Spool, tiled: FakeTiled, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small closed runs go several at once; one of at least `batch_rows` rows (100 here) waits until
    those in flight are done, then goes alone (one batch in memory), and the runs after it wait for it."""
    small = [spool.closed_run(first_received=1.0 + n) for n in range(2)]
    large = spool.closed_run(events=spool.config.tiled.batch_rows, first_received=5.0)
    after = spool.closed_run(first_received=6.0)
    received = spool.view(large).received
    received.events = {"primary": spool.config.tiled.batch_rows}  # what the receiver's tracker counts
    received.save(spool.dir.run_dir(large))
    uploader = scheduler(spool, monkeypatch)
    uploader.max_active = 4  # [tiled] runs_in_flight = 4 (the default, 1, keeps acquisition order)
    in_flight: list[list[str]] = []
    schedule = uploader._schedule

    def recorded() -> None:
        schedule()
        now = sorted(uid for uid, slot in uploader.active.items() if slot.busy)
        if not in_flight or in_flight[-1] != now:
            in_flight.append(now)

    monkeypatch.setattr(uploader, "_schedule", recorded)
    uploader.run(until_idle=True)
    assert sorted(tiled.runs) == sorted([*small, large, after])
    assert in_flight[0] == sorted(small)
    assert [large] in in_flight and all(large not in now or now == [large] for now in in_flight)
    assert in_flight.index([large]) < next(i for i, now in enumerate(in_flight) if after in now)


# ----------------------------------------------------------------- every outcome is acted on


def failing_feed(monkeypatch: pytest.MonkeyPatch, uid: str, err: Exception, times: int = 1_000) -> None:
    """The fake writer raises `err` on `uid`'s first event, the first `times` times."""
    real_feed, left = FakeRunWriter.feed, [times]

    def feed(self: FakeRunWriter, name: str, doc: dict[str, object]) -> None:
        if name == "event" and self.uid == uid and left[0] > 0:
            left[0] -= 1
            raise err
        real_feed(self, name, doc)

    monkeypatch.setattr(FakeRunWriter, "feed", feed)


class Scenario:
    """Two closed runs, the oldest failing as a test says, uploaded by the real loop (`Uploader.run`)."""

    def __init__(self, spool: Spool, tiled: FakeTiled, monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
        self.failing = spool.closed_run(first_received=1.0)
        self.other = spool.closed_run(first_received=2.0)
        self.spool, self.tiled, self.caplog = spool, tiled, caplog
        self.uploader = scheduler(spool, monkeypatch)
        self.uploader.max_active = 2
        self.uploader.link.busy_backoff = Backoff(0.001, 0.002)
        monkeypatch.setattr(connection, "connect", lambda config: FakeClient())  # reconnecting after a pause
        caplog.set_level(logging.INFO, logger="tiled_writer_sidecar")

    def uploaded(self, uid: str) -> Uploaded:
        return Uploaded.load(self.spool.dir.run_dir(uid))

    def logged(self, text: str) -> bool:
        return any(text in record.getMessage() for record in self.caplog.records)

    def backed_off_alone(self, outcome: Outcome) -> bool:
        return self.logged(f"run {self.failing}: {outcome} (")


def _stop(s: Scenario, monkeypatch: pytest.MonkeyPatch) -> None:
    """STOP: asked to stop mid-request, the loop ends and the run stays as it is; giving up (replay) raises."""
    failing_feed(monkeypatch, s.failing, Stopping())
    s.uploader.run(until_idle=True)
    assert s.uploaded(s.failing).state == UploadState.UPLOADING and s.uploader.status.retries == 0
    later = s.spool.closed_run(first_received=3.0)
    failing_feed(monkeypatch, later, TiledUnavailableError("giving up after 60 s"))
    with pytest.raises(TiledUnavailableError, match="giving up"):
        s.uploader.run(until_idle=True)
    assert s.uploaded(later).state == UploadState.UPLOADING and s.uploader.status.runs_quarantined == 0


def _unauthorized(s: Scenario, monkeypatch: pytest.MonkeyPatch) -> None:
    """UNAUTHORIZED: everyone pauses (state unauthorized, client dropped) without probing, nothing counted."""
    failing_feed(monkeypatch, s.failing, http_error(401), times=1)
    monkeypatch.setattr(s.uploader.link, "reachable", lambda: pytest.fail("probed on a refused key"))
    s.uploader.run(until_idle=True)
    assert s.logged("tiled unauthorized") and s.logged("tiled up again")
    assert not s.backed_off_alone(Outcome.UNAUTHORIZED)
    assert s.uploaded(s.failing).state == UploadState.UPLOADED and s.uploaded(s.failing).attempts == 2


def _tiled_down(s: Scenario, monkeypatch: pytest.MonkeyPatch) -> None:
    """TILED_DOWN: Tiled does not answer, so everyone pauses (state down) and nothing is counted; it answers
    again, everyone goes on."""
    failing_feed(monkeypatch, s.failing, transport(httpx.ConnectError), times=1)
    answers = iter([False, False])  # the scheduler's probe, the link's; then Tiled answers
    monkeypatch.setattr(s.uploader.link, "reachable", lambda: next(answers, True))
    s.uploader.run(until_idle=True)
    assert s.logged("tiled down uri=") and s.logged("tiled up again")
    assert not s.backed_off_alone(Outcome.TILED_DOWN)
    assert s.uploaded(s.failing).state == UploadState.UPLOADED and s.uploaded(s.failing).attempts == 2


def _retry(s: Scenario, monkeypatch: pytest.MonkeyPatch) -> None:
    """RETRY: a 500 on a read-back while Tiled answers is retried in place IN_PLACE_ATTEMPTS times, then the
    run backs off alone (Tiled stays up, the outage backoff untouched) and is rewritten."""
    calls, read = [0], run_upload.read_seq_nums

    def read_seq_nums(client: Any, uid: str, stream: str) -> list[int] | None:
        if uid == s.failing and calls[0] <= IN_PLACE_ATTEMPTS:
            calls[0] += 1
            raise http_error(500, "GET")
        return read(client, uid, stream)

    monkeypatch.setattr(run_upload, "read_seq_nums", read_seq_nums)
    s.uploader.run(until_idle=True)
    assert s.uploader.status.append_retries == IN_PLACE_ATTEMPTS
    assert s.backed_off_alone(Outcome.RETRY) and not s.logged("tiled down")
    assert s.uploader.link.backoff.attempt == 0 and s.uploader.status.tiled == TiledState.UP
    assert s.uploaded(s.failing).state == UploadState.UPLOADED and s.uploaded(s.failing).attempts == 2


def _rewrite(s: Scenario, monkeypatch: pytest.MonkeyPatch) -> None:
    """REWRITE: an append that may have landed: the run backs off alone, then its partial upload is deleted
    and it is rewritten whole."""
    failing_feed(monkeypatch, s.failing, AppendAmbiguous("the table holds 1 row, 0 before"), times=1)
    s.uploader.run(until_idle=True)
    assert s.backed_off_alone(Outcome.REWRITE) and s.failing in s.tiled.deleted
    assert s.uploaded(s.failing).state == UploadState.UPLOADED and s.uploaded(s.failing).attempts == 2


def _rejected(s: Scenario, monkeypatch: pytest.MonkeyPatch) -> None:
    """REJECTED: Tiled refuses the run's documents: rewritten once, then quarantined (2 in a row)."""
    failing_feed(monkeypatch, s.failing, http_error(422))
    s.uploader.run(until_idle=True)
    assert s.backed_off_alone(Outcome.REJECTED)
    uploaded = s.uploaded(s.failing)
    assert uploaded.state == UploadState.QUARANTINED and uploaded.attempts == 2
    assert "failed 2 times the same way" in (uploaded.reason or "")


def _quarantine(s: Scenario, monkeypatch: pytest.MonkeyPatch) -> None:
    """QUARANTINE: the run's own bad content: quarantined on the first attempt, no back-off."""
    failing_feed(monkeypatch, s.failing, UnsafeName("data key '../x'"))
    s.uploader.run(until_idle=True)
    assert not s.backed_off_alone(Outcome.QUARANTINE)
    uploaded = s.uploaded(s.failing)
    assert uploaded.state == UploadState.QUARANTINED and uploaded.attempts == 1


SCENARIOS = {
    Outcome.STOP: _stop,
    Outcome.UNAUTHORIZED: _unauthorized,
    Outcome.TILED_DOWN: _tiled_down,
    Outcome.RETRY: _retry,
    Outcome.REWRITE: _rewrite,
    Outcome.REJECTED: _rejected,
    Outcome.QUARANTINE: _quarantine,
}


@pytest.mark.parametrize("outcome", list(Outcome))
def test_every_outcome_is_acted_on_as_the_table_says(
    outcome: Outcome, spool: Spool, tiled: FakeTiled, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """One run's failure of each outcome, through the real loop: what the scheduler and the link do with
    it (each scenario's docstring); the other run is uploaded, unless the uploader stops."""
    scenario = Scenario(spool, tiled, monkeypatch, caplog)
    SCENARIOS[outcome](scenario, monkeypatch)
    if outcome is not Outcome.STOP:
        assert scenario.uploaded(scenario.other).state == UploadState.UPLOADED
        assert tiled.runs[scenario.other] == {"primary": [1, 2, 3]}
