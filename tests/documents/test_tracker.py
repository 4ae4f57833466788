"""RunTracker: routing, first-claim ownership and the one definition of gaps, in milliseconds.

Documents are made with event_model's own `compose_run`, as a RunEngine
would make them; the tracker is fed directly (no socket, no spool).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import event_model
import numpy as np
import pytest

from tiled_writer_sidecar.coerce import MAX_NAME, as_counts, as_int
from tiled_writer_sidecar.documents.tracker import (
    CLOSED_RUN_MEMORY,
    MAX_SEQ_NUM,
    ORPHAN_STREAM,
    RunTracker,
    TrackedRun,
    received_from_start,
)
from tiled_writer_sidecar.errors import ValidationError

DATA_KEYS: dict[str, Any] = {"det": {"dtype": "number", "shape": [], "source": "SIM:det"}}


class Run:
    """One composed run: its start, a `primary` descriptor, events on demand, a resource."""

    def __init__(self, **metadata: Any) -> None:
        self.bundle = event_model.compose_run(metadata=metadata or None)
        self.start = dict(self.bundle.start_doc)
        self.desc = self.bundle.compose_descriptor(name="primary", data_keys=DATA_KEYS)
        self.descriptor = dict(self.desc.descriptor_doc)
        self._stop: dict[str, Any] | None = None

    def event(self, seq: Any) -> dict[str, Any]:
        doc = dict(self.desc.compose_event(data={"det": 1.0}, timestamps={"det": 0.0}, seq_num=1))
        doc["seq_num"] = seq
        return doc

    def page(self, seqs: list[int]) -> dict[str, Any]:
        return dict(event_model.pack_event_page(*(self.event(s) for s in seqs)))  # type: ignore[arg-type]

    def stop(self, **num_events: Any) -> dict[str, Any]:
        if self._stop is None:
            self._stop = dict(self.bundle.compose_stop())
        doc = dict(self._stop)
        doc["num_events"] = num_events
        return doc


def opened(tracker: RunTracker, run: Run) -> TrackedRun:
    tracked = tracker.route("start", run.start)
    tracker.route("descriptor", run.descriptor)
    return tracked


def rejected(tracker: RunTracker, name: str, doc: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        tracker.route(name, doc)
    return info.value.reason


def test_documents_are_routed_to_their_run_by_run_start_descriptor_and_resource() -> None:
    """Two interleaved runs: each document lands in its own run, events counted per stream."""
    tracker = RunTracker()
    a, b = Run(), Run()
    ta, tb = opened(tracker, a), opened(tracker, b)
    assert tracker.route("event", a.event(1)) is ta
    assert tracker.route("event", b.event(1)) is tb
    assert tracker.route("event_page", a.page([2, 3])) is ta
    resource = {"uid": "res-a", "run_start": a.start["uid"], "spec": "X", "root": "/", "resource_path": "f"}
    resource.update(resource_kwargs={}, path_semantics="posix")
    assert tracker.route("resource", resource) is ta
    datum = {"datum_id": "res-a/0", "resource": "res-a", "datum_kwargs": {}}
    assert tracker.route("datum", datum) is ta
    assert ta.received.events == {"primary": 3}
    assert tb.received.events == {"primary": 1}
    assert tracker.route("stop", a.stop(primary=3)) is ta
    assert ta.received.stop_received and ta.received.expected_events == {"primary": 3}


def test_a_seq_num_hole_is_a_gap_reported_once_with_its_range() -> None:
    """seq_num 1, 2, 5: missing 2 in primary, the handler told 3..4; the stop's count adds no more."""
    seen: list[tuple[str, int, int]] = []
    tracker = RunTracker(on_gap=lambda run, stream, first, last: seen.append((stream, first, last)))
    run = Run()
    tracked = opened(tracker, run)
    for seq in (1, 2, 5):
        tracker.route("event", run.event(seq))
    tracker.route("stop", run.stop(primary=5))
    assert tracked.received.missing == {"primary": 2}
    assert seen == [("primary", 3, 4)]
    assert tracked.received.gaps() == {"primary": 2}


def test_events_missing_at_the_end_are_a_shortfall_against_stop_num_events() -> None:
    """3 events of 5 announced by the stop: a gap of 2 (no hole in the seq_nums)."""
    tracker = RunTracker()
    run = Run()
    tracked = opened(tracker, run)
    for seq in (1, 2, 3):
        tracker.route("event", run.event(seq))
    tracker.route("stop", run.stop(primary=5))
    assert tracked.received.missing == {}
    assert tracked.received.gaps() == {"primary": 2}


def test_without_reject_duplicates_a_copy_counts_as_an_event_and_a_late_seq_num_fills_its_hole() -> None:
    """The monitor's mode, 1, 2, 2, 3, 5, 4: six events; 4 came late and filled the hole (no gap)."""
    tracker = RunTracker()
    run = Run()
    tracked = opened(tracker, run)
    for seq in (1, 2, 2, 3, 5, 4):
        tracker.route("event", run.event(seq))
    assert tracked.received.events == {"primary": 6}
    assert tracked.received.missing == {}
    assert tracked.received.out_of_order == {"primary": 1}


def test_the_receivers_rule_rejects_a_copy_and_keeps_a_late_new_seq_num() -> None:
    """reject_duplicates: 1, 2, 5, then 2 again (duplicate-seq-num, nothing changed), then 3 (late: kept,
    out of order, its hole filled), then a page repeating 3 (rejected whole); 4 is still missing."""
    repeats: list[int] = []
    tracker = RunTracker(reject_duplicates=True, on_repeat=lambda run, stream, seq: repeats.append(seq))
    run = Run()
    tracked = opened(tracker, run)
    for seq in (1, 2, 5):
        tracker.route("event", run.event(seq))
    before = json.dumps(asdict(tracked.received))
    assert rejected(tracker, "event", run.event(2)) == "duplicate-seq-num"
    assert rejected(tracker, "event_page", run.page([6, 6])) == "duplicate-seq-num"
    assert json.dumps(asdict(tracked.received)) == before
    tracker.route("event", run.event(3))
    assert rejected(tracker, "event_page", run.page([3, 6])) == "duplicate-seq-num"
    assert tracked.received.events == {"primary": 4}
    assert tracked.received.missing == {"primary": 1}
    assert tracked.received.out_of_order == {"primary": 1}
    assert repeats == [2, 6, 3]
    tracker.route("event_page", run.page([4, 6]))
    assert tracked.received.missing == {} and tracked.received.events == {"primary": 6}


@pytest.mark.parametrize(
    "seq",
    [0, -1, MAX_SEQ_NUM + 1, 10**5000, 1.5, "1", None, True, 1j],
    ids=["0", "-1", "2**53+1", "5000-digits", "1.5", "str", "None", "True", "complex"],
)
def test_a_seq_num_that_is_not_an_integer_in_range_is_rejected_and_changes_nothing(seq: Any) -> None:
    """Out of 1..2**53 or not an integer: bad-seq-num; the run's counters stay as they were."""
    tracker = RunTracker()
    run = Run()
    tracked = opened(tracker, run)
    tracker.route("event", run.event(1))
    before = json.dumps(asdict(tracked.received))
    assert rejected(tracker, "event", run.event(seq)) == "bad-seq-num"
    assert rejected(tracker, "event_page", run.page([2]) | {"seq_num": [2, seq]}) == "bad-seq-num"
    assert json.dumps(asdict(tracked.received)) == before


def test_integral_seq_nums_of_other_types_are_counted_as_plain_ints() -> None:
    """numpy int64 and an integral float count like 2 and 3; the state stays JSON-writable."""
    tracker = RunTracker()
    run = Run()
    tracked = opened(tracker, run)
    for seq in (1, np.int64(2), 3.0):
        tracker.route("event", run.event(seq))
    assert tracked.received.events == {"primary": 3} and tracked.received.missing == {}
    assert all(type(v) is int for v in tracked.last_seq.values())


def test_a_second_run_cannot_claim_a_live_runs_descriptor_or_resource() -> None:
    """Run B declares run A's descriptor and resource: both rejected; A keeps its events, B gets none."""
    tracker = RunTracker()
    a, b = Run(), Run()
    ta = opened(tracker, a)
    tb = tracker.route("start", b.start)
    resource = {"uid": "res-1", "run_start": a.start["uid"], "spec": "X", "root": "/", "resource_path": "f"}
    tracker.route("resource", resource)
    claim = {**a.descriptor, "run_start": b.start["uid"]}
    assert rejected(tracker, "descriptor", claim) == "descriptor-claimed"
    assert rejected(tracker, "resource", {**resource, "run_start": b.start["uid"]}) == "resource-claimed"
    assert rejected(tracker, "stream_resource", {"uid": "res-1", "run_start": b.start["uid"]}) == (
        "resource-claimed"
    )
    assert tracker.route("event", a.event(1)) is ta
    assert tb.streams == {} and tb.resources == []
    assert tracker.route("descriptor", a.descriptor) is ta  # the owner may repeat its own


def test_a_closed_runs_uids_are_free_for_the_next_run_and_its_late_documents_are_after_stop() -> None:
    """After A's stop: A's late event and stop are after-stop; B may declare A's descriptor and resource
    (claims belong to open runs), and then an event of that descriptor is B's."""
    tracker = RunTracker()
    a, b = Run(), Run()
    ta = opened(tracker, a)
    resource = {
        "uid": "det-key2-uid",
        "run_start": a.start["uid"],
        "spec": "X",
        "root": "/",
        "resource_path": "f",
    }
    tracker.route("stream_resource", resource)
    tracker.route("stop", a.stop(primary=0))
    tracker.close(ta)
    tb = tracker.route("start", b.start)
    assert rejected(tracker, "event", a.event(1)) == "after-stop"
    assert rejected(tracker, "stop", a.stop()) == "after-stop"
    assert rejected(tracker, "start", a.start) == "repeated-start"
    assert tracker.closed_run_of("event", a.event(1)) == a.start["uid"]
    assert tracker.route("stream_resource", {**resource, "run_start": b.start["uid"]}) is tb
    assert tracker.route("descriptor", {**a.descriptor, "run_start": b.start["uid"]}) is tb
    assert tracker.route("event", a.event(1)) is tb
    assert tracker.closed_run_of("event", a.event(1)) is None


def test_documents_of_a_run_whose_start_is_missing_go_to_an_orphan_keyed_by_what_they_name() -> None:
    """With may_orphan: events of an unknown descriptor go to an orphan keyed by the descriptor; its
    descriptor and stop to one keyed by run_start; the gate can refuse a new orphan."""
    allowed = {"run_start", "descriptor"}
    tracker = RunTracker(may_orphan=lambda kind, uid: kind in allowed)
    run = Run()
    by_descriptor = tracker.route("event", run.event(1))
    assert by_descriptor.orphan == "descriptor" and by_descriptor.uid == run.descriptor["uid"]
    assert by_descriptor.received.start_missing and by_descriptor.received.events == {ORPHAN_STREAM: 1}
    orphan = tracker.route("descriptor", run.descriptor)  # takes the claim over: that orphan is released
    assert tracker.orphan("descriptor", run.descriptor["uid"]) is None
    assert orphan.orphan == "run_start" and orphan.uid == run.start["uid"] and orphan.key != orphan.uid
    assert tracker.route("event", run.event(2)) is orphan
    assert tracker.route("stop", run.stop(primary=2)) is orphan
    assert tracker.orphan("run_start", run.start["uid"]) is orphan and tracker.runs == {}
    allowed.clear()
    assert rejected(tracker, "event", Run().event(1)) == "event-before-descriptor"
    assert rejected(tracker, "descriptor", Run().descriptor) == "descriptor-for-unknown-run"


def test_documents_that_cannot_be_placed_get_their_reason() -> None:
    """Unknown descriptor / resource / run, an unsafe uid, a document kind nobody routes."""
    tracker = RunTracker()
    run = Run()
    event = run.event(1)
    assert rejected(tracker, "event", event) == "event-before-descriptor"
    assert rejected(tracker, "event_page", run.page([1])) == "event_page-before-descriptor"
    assert rejected(tracker, "descriptor", run.descriptor) == "descriptor-for-unknown-run"
    assert rejected(tracker, "datum", {"datum_id": "r/0", "resource": "r", "datum_kwargs": {}}) == (
        "datum-before-resource"
    )
    assert rejected(tracker, "start", {**run.start, "uid": "../../x"}) == "unsafe-uid"
    assert rejected(tracker, "bulk_events", {}) == "unknown-document"
    assert tracker.runs == {}


def test_only_plain_bounded_values_reach_received() -> None:
    """numpy scalars, a 5,000-digit scan_id, a complex time, a long plan name: all JSON-writable."""
    start = {
        "uid": "u1",
        "time": complex(1, 1),
        "scan_id": 10**5000,
        "plan_name": np.str_("p" * 10_000),
    }
    received = received_from_start(start)
    assert received.scan_id is None and received.start_time is None
    assert received.plan_name == "p" * MAX_NAME and type(received.plan_name) is str
    assert as_int(np.int64(7), 0, 10) == 7
    assert as_counts({"primary": np.int64(3), "bad": 10**5000, 5: 1}) == {"primary": 3}
    json.dumps(asdict(received))


def test_the_run_idle_for_the_longest_is_found_and_closed_runs_are_remembered_within_bounds() -> None:
    """idlest() is the run with the oldest last document; closed runs beyond the memory are forgotten."""
    tracker = RunTracker()
    runs = [opened(tracker, Run()) for _ in range(3)]
    for n, run in enumerate(runs):
        run.received.last_received = 100.0 - n
    assert tracker.idlest() is runs[2]
    for _ in range(CLOSED_RUN_MEMORY + 5):
        tracker.close(tracker.route("start", Run().start))
    assert len(tracker.closed_runs) == CLOSED_RUN_MEMORY


def test_the_tracker_is_an_event_model_document_router() -> None:
    """Called as a DocumentRouter (``tracker(name, doc)``), it routes the same way and returns the document."""
    tracker = RunTracker()
    run = Run()
    assert isinstance(tracker, event_model.DocumentRouter)
    assert tracker("start", run.start) == ("start", run.start)
    tracker("descriptor", run.descriptor)
    tracker("event", run.event(1))
    assert tracker.runs[run.start["uid"]].received.events == {"primary": 1}


def test_replay_routes_a_logged_run_again_with_the_same_rules() -> None:
    """A run's logged documents replayed into a fresh tracker give the counters the live one had."""
    live = RunTracker()
    run = Run()
    documents = [("start", run.start), ("descriptor", run.descriptor)]
    documents += [("event", run.event(seq)) for seq in (1, 2, 4)]
    for name, doc in documents:
        live.route(name, doc)
    before = live.runs[run.start["uid"]].received
    replayed = RunTracker().replay(received_from_start(run.start), documents)
    assert replayed.received.events == before.events == {"primary": 3}
    assert replayed.received.missing == before.missing == {"primary": 1}
    assert replayed.last_seq == live.runs[run.start["uid"]].last_seq


def test_replay_of_a_log_holding_another_start_or_an_orphan_event_raises() -> None:
    """A second start, or an event of a descriptor the log never declared: the rule's reason."""
    run, other = Run(), Run()
    for documents, reason in [
        ([("start", run.start), ("start", other.start)], "repeated-start"),
        ([("start", run.start), ("event", run.event(1))], "event-before-descriptor"),
    ]:
        with pytest.raises(ValidationError) as info:
            RunTracker().replay(received_from_start(run.start), documents)
        assert info.value.reason == reason


def test_resources_are_bounded_across_open_runs_not_only_per_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many open runs each under the per-run cap still cannot hold more than MAX_RESOURCES_OPEN together."""
    import tiled_writer_sidecar.documents.tracker as tracker_module

    monkeypatch.setattr(tracker_module, "MAX_RESOURCES_OPEN", 5)
    tracker = RunTracker()
    runs = [Run(), Run(), Run()]
    for run in runs:
        opened(tracker, run)

    def resource(run: Run, n: int) -> dict[str, Any]:
        uid = f"{run.start['uid']}-res-{n}"
        return {"uid": uid, "run_start": run.start["uid"], "spec": "X", "root": "/", "resource_path": "f"}

    for n in range(5):
        tracker.route("resource", resource(runs[n % 3], n))
    assert rejected(tracker, "resource", resource(runs[2], 99)) == "too-many-resources"
    tracker.close(tracker.runs[runs[0].start["uid"]])
    assert tracker.route("resource", resource(runs[2], 100)).uid == runs[2].start["uid"]


def test_rows_covered_by_stream_datums_count_against_stop_num_events() -> None:
    """A stream with no events, only stream_datums covering seq_nums 1..3, and a stop saying 3: no gap
    (bluesky-tiled-plugins' external_assets_single_key example); a stop saying 5: 2 missing."""
    tracker = RunTracker()
    run = Run()
    tracked = opened(tracker, run)
    tracker.route("stream_resource", {"uid": "sr", "run_start": run.start["uid"]})
    for start in (1, 2, 3):
        datum = {"uid": f"sr/{start}", "stream_resource": "sr", "descriptor": run.descriptor["uid"]}
        datum.update(
            indices={"start": start - 1, "stop": start}, seq_nums={"start": start, "stop": start + 1}
        )
        tracker.route("stream_datum", datum)
    tracker.route("stop", run.stop(primary=3))
    assert tracked.received.gaps() == {} and tracked.received.events == {}
    tracked.received.expected_events = {"primary": 5}
    assert tracked.received.gaps() == {"primary": 2}


def test_a_start_is_checked_by_new_run_and_routes_nothing_until_opened() -> None:
    """`new_run` raises what `start` raises and opens nothing; once `open`, the run gets its documents."""
    tracker = RunTracker()
    run = Run()
    tracked = tracker.new_run(run.start)
    assert (
        tracker.runs == {} and rejected(tracker, "descriptor", run.descriptor) == "descriptor-for-unknown-run"
    )
    assert tracker.open(tracked) is tracked and tracker.route("descriptor", run.descriptor) is tracked
    with pytest.raises(ValidationError, match="repeated-start"):
        tracker.new_run(run.start)
    with pytest.raises(ValidationError, match="unsafe-uid"):
        tracker.new_run({**Run().start, "uid": "../x"})


@dataclass(eq=False, slots=True)
class KeptRun(TrackedRun):
    kept: int = 0


def test_runs_and_orphans_are_made_as_the_run_type_given() -> None:
    """A caller that keeps more per run (the receiver's `OpenRun`) gets its own type for every run."""
    tracker: RunTracker[KeptRun] = RunTracker(run_type=KeptRun, may_orphan=lambda kind, uid: True)
    run = Run()
    started = tracker.route("start", run.start)
    orphan = tracker.route("event", Run().event(1))
    assert type(started) is KeptRun and type(orphan) is KeptRun and orphan.orphan == "descriptor"
    assert type(tracker.resume(received_from_start(Run().start))) is KeptRun
