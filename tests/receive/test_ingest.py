"""Ingest in process: orphans kept and adopted, the seq_num rule at receipt, losses counted per run.

Documents are composed with event_model as a RunEngine would make them and
fed to `Ingest.accept`; the spool is real (tmp_path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import event_model
import pytest

import tiled_writer_sidecar.receive.ingest as ingest_module
from tiled_writer_sidecar.config import SpoolConfig
from tiled_writer_sidecar.errors import RejectedMessage
from tiled_writer_sidecar.receive.counters import ReceiverStats
from tiled_writer_sidecar.receive.ingest import Ingest, OpenRun
from tiled_writer_sidecar.spool.codec import unpack_document
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.orphans import orphan_dir, orphan_report
from tiled_writer_sidecar.spool.segment import LogReader
from tiled_writer_sidecar.spool.state_files import Received

DATA_KEYS: dict[str, Any] = {"det": {"dtype": "number", "shape": [], "source": "SIM:det"}}
Docs = list[tuple[str, dict[str, Any]]]


def composed(n_events: int) -> Docs:
    """start, descriptor, `n_events` events, stop."""
    bundle = event_model.compose_run()
    desc = bundle.compose_descriptor(name="primary", data_keys=DATA_KEYS)
    docs: Docs = [("start", dict(bundle.start_doc)), ("descriptor", dict(desc.descriptor_doc))]
    for seq in range(1, n_events + 1):
        event = desc.compose_event(data={"det": float(seq)}, timestamps={"det": 0.0}, seq_num=seq)
        docs.append(("event", dict(event)))
    docs.append(("stop", dict(bundle.compose_stop())))
    return docs


def make_ingest(tmp_path: Path) -> Ingest:
    root = tmp_path / "spool"
    return Ingest(SpoolConfig(dir=str(root)), SpoolDir(root), ReceiverStats())


def feed(ingest: Ingest, docs: Docs) -> list[str]:
    """Accept each document; the reasons of those rejected."""
    reasons = []
    for name, doc in docs:
        try:
            ingest.accept(name, doc)
        except RejectedMessage as err:
            reasons.append(err.reason)
    return reasons


def logged(ingest: Ingest, uid: str) -> Docs:
    return [unpack_document(p) for p in LogReader(ingest.spool.run_dir(uid)).read()]


def saved(ingest: Ingest, uid: str) -> Received:
    received = Received.load(ingest.spool.run_dir(uid))
    assert received is not None
    return received


@pytest.fixture
def ingest(tmp_path: Path) -> Ingest:
    return make_ingest(tmp_path)


def test_documents_of_a_run_whose_start_is_lost_are_kept_in_an_orphan_and_counted(ingest: Ingest) -> None:
    """No start: descriptor, 3 events and stop are spooled into an orphan keyed by the run_start they
    name, not rejected; status lists it as start missing with its counts; nothing is in runs/."""
    docs = composed(3)
    uid = docs[0][1]["uid"]
    assert feed(ingest, docs[1:]) == []
    ingest.upkeep()
    assert list(ingest.spool.runs_dir.iterdir()) == []
    report = orphan_report(ingest.spool)
    assert report["start_missing_runs"] == 1 and report["start_missing_documents"] == 5
    (orphan,) = report["runs"]
    assert orphan["uid"] == uid and orphan["keyed_by"] == "run_start" and orphan["state"] == "start-missing"
    assert orphan["events"] == {"primary": 3} and orphan["stop_received"]
    stats = ingest.stats
    assert (stats.orphan_runs, stats.orphan_runs_total, stats.orphan_documents) == (1, 1, 5)
    assert stats.rejected == {}


def test_a_late_start_adopts_the_orphan_the_run_is_complete_and_in_order(ingest: Ingest) -> None:
    """The start arrives after the rest of its run: the run's log is start, descriptor, events, stop in
    that order, it is closed complete, and the orphan is gone."""
    docs = composed(3)
    uid = docs[0][1]["uid"]
    feed(ingest, docs[1:])
    assert feed(ingest, docs[:1]) == []
    assert logged(ingest, uid) == docs
    received = saved(ingest, uid)
    assert received.closed and received.close_reason == "stop" and received.problems() == []
    assert not orphan_dir(ingest.spool, "run_start", uid).exists()
    assert orphan_report(ingest.spool)["start_missing_runs"] == 0 and ingest.stats.orphan_runs == 0


def test_events_whose_descriptor_is_unknown_wait_for_it_keyed_by_descriptor(ingest: Ingest) -> None:
    """Start, then events whose descriptor comes late: the events wait in an orphan keyed by the
    descriptor and follow it into the run when it arrives; the run is complete."""
    docs = composed(2)
    uid = docs[0][1]["uid"]
    start, descriptor, events, stop = docs[0], docs[1], docs[2:4], docs[4]
    assert feed(ingest, [start, *events]) == []
    assert orphan_report(ingest.spool)["runs"][0]["keyed_by"] == "descriptor"
    assert feed(ingest, [descriptor, stop]) == []
    assert logged(ingest, uid) == [start, descriptor, *events, stop]
    assert saved(ingest, uid).problems() == []
    assert orphan_report(ingest.spool)["start_missing_runs"] == 0


def test_orphans_survive_a_restart_and_are_adopted_by_the_next_receiver(tmp_path: Path) -> None:
    """An orphan written by one receiver is taken over by the next; the late start completes the run."""
    first = make_ingest(tmp_path)
    docs = composed(2)
    feed(first, docs[1:4])
    first.shutdown()
    second = make_ingest(tmp_path)
    second.recover()
    assert second.stats.orphan_runs == 1
    assert feed(second, [docs[4], docs[0]]) == []
    uid = docs[0][1]["uid"]
    assert logged(second, uid) == [docs[0], *docs[1:4], docs[4]]
    assert saved(second, uid).problems() == []


def test_orphans_are_bounded_in_number_and_bytes(ingest: Ingest, monkeypatch: pytest.MonkeyPatch) -> None:
    """At most MAX_ORPHANS orphans and ORPHAN_MAX_BYTES: beyond, documents are rejected and counted."""
    monkeypatch.setattr(ingest_module, "MAX_ORPHANS", 2)
    runs = [composed(1) for _ in range(3)]
    assert feed(ingest, [run[1] for run in runs]) == ["descriptor-for-unknown-run"]
    monkeypatch.setattr(ingest_module, "ORPHAN_MAX_BYTES", ingest.stats.orphan_bytes + 10)
    assert feed(ingest, [runs[0][2]]) == ["orphans-full"]
    assert ingest.stats.orphan_runs == 2


def test_a_copy_of_a_received_seq_num_is_rejected_and_a_late_new_one_is_kept(ingest: Ingest) -> None:
    """1, 2, 4, 2 (copy: duplicate-seq-num, counted on the run), 3 (late: kept, out of order): the run
    has 4 events, no gap, 1 duplicate, 1 out of order."""
    docs = composed(4)
    uid = docs[0][1]["uid"]
    start, descriptor, e1, e2, e3, e4, stop = docs
    assert feed(ingest, [start, descriptor, e1, e2, e4, e2, e3, stop]) == ["duplicate-seq-num"]
    received = saved(ingest, uid)
    assert received.events == {"primary": 4} and received.gaps() == {} and received.problems() == []
    assert received.duplicates == 1 and received.out_of_order == {"primary": 1}
    assert [doc["seq_num"] for name, doc in logged(ingest, uid) if name == "event"] == [1, 2, 4, 3]


def test_every_loss_is_counted_once_the_run_closes(ingest: Ingest) -> None:
    """Event 2 lost, stop says 4 of which 4 was lost too, a second run closed without its stop: 2 events
    missing in gaps, one stop missing."""
    docs = composed(4)
    feed(ingest, [d for d in docs if d[0] != "event" or d[1]["seq_num"] not in (2, 4)])
    other = composed(1)
    feed(ingest, other[:3])
    ingest.close_all("shutdown")
    assert ingest.stats.gaps == 2 and ingest.stats.runs_stop_missing == 1
    assert saved(ingest, docs[0][1]["uid"]).gaps() == {"primary": 2}


def test_each_open_run_is_one_object_holding_its_log(ingest: Ingest) -> None:
    """An open run is one `OpenRun` in the tracker's table, its log in it; its stop closes both."""
    docs = composed(1)
    uid = docs[0][1]["uid"]
    assert feed(ingest, docs[:3]) == []
    run = ingest.tracker.runs[uid]
    assert isinstance(run, OpenRun) and run.log is not None and run.log.directory == ingest.spool.run_dir(uid)
    assert run.log.received is run.received and run.received.documents == 3
    assert feed(ingest, docs[3:]) == []
    assert ingest.tracker.runs == {} and run.log.writer is None and saved(ingest, uid).closed


def test_a_start_whose_log_cannot_be_created_opens_no_run(
    ingest: Ingest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk refuses the run's log: the start is dropped (counted), no run is open, nothing is
    remembered of it; the same run sent again once the disk works is spooled whole."""
    docs = composed(1)
    uid = docs[0][1]["uid"]
    real = ingest.spooler.open

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ingest.spooler, "open", full)
    assert feed(ingest, docs[:1]) == []
    assert ingest.tracker.runs == {} and ingest.stats.dropped == 1 and not ingest.stats.spool_writable
    monkeypatch.setattr(ingest.spooler, "open", real)
    assert feed(ingest, docs) == []
    assert logged(ingest, uid) == docs and saved(ingest, uid).problems() == []


def test_a_descriptor_rejected_leaves_the_orphan_its_events_opened(
    ingest: Ingest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events wait for their descriptor; the descriptor is first rejected (its run unknown, no room for
    an orphan): the events still wait, and follow it into its run when it comes again after the start."""
    docs = composed(2)
    uid = docs[0][1]["uid"]
    start, descriptor, events, stop = docs[0], docs[1], docs[2:4], docs[4]
    assert feed(ingest, events) == []
    monkeypatch.setattr(ingest_module, "MAX_ORPHANS", 1)
    assert feed(ingest, [descriptor]) == ["descriptor-for-unknown-run"]
    waiting = ingest.tracker.orphan("descriptor", descriptor[1]["uid"])
    assert waiting is not None and waiting.received.events == {"(descriptor unknown)": 2}
    assert feed(ingest, [start, descriptor, stop]) == []
    assert logged(ingest, uid) == [start, descriptor, *events, stop]
    assert saved(ingest, uid).problems() == [] and ingest.stats.orphan_runs == 0
