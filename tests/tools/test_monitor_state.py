"""MonitorState: the pure model behind `monitor`, fed with (name, doc) pairs.

Documents come from a real RunEngine with ophyd.sim devices (no proxy: the
`Acquisition` records them in process) or, for malformed or hand-shaped
cases, are written out here. Clocks are injected, so rates and ages are exact.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator
from typing import Any

import bluesky.plans as bp
import bluesky.preprocessors as bpp
import numpy
import pytest
from ophyd.sim import det, det1, det2, motor, motor1

from tiled_writer_sidecar.documents.tracker import RunTracker
from tiled_writer_sidecar.testing import Acquisition
from tiled_writer_sidecar.tools.monitor.state import (
    MAX_RUNS,
    MonitorState,
    RateMeter,
    default_plot_key,
)

Document = tuple[str, dict[str, Any]]


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def local_re() -> Iterator[Acquisition]:
    """A RunEngine that records its documents (no Publisher)."""
    with Acquisition(None, md={"scan_id": 99}) as acq:
        yield acq


def feed(state: MonitorState, docs: Iterable[Document]) -> None:
    for name, doc in docs:
        state.feed(name, doc)


def test_counts_events_per_stream_scan_id_uid_and_exit_status(local_re: Acquisition) -> None:
    """A scan with a baseline: events per stream, identity and exit status as the RunEngine emitted."""
    with_baseline = bpp.baseline_wrapper(bp.scan([det1, det2], motor, -1, 1, 7), [motor1])  # type: ignore[no-untyped-call]
    (uid,) = local_re.run(with_baseline)
    state = MonitorState()
    feed(state, local_re.documents)
    run = state.snapshot()["run"]
    assert run["uid"] == uid
    assert run["scan_id"] == 100
    assert run["plan_name"] == "scan"
    assert run["events"] == {"baseline": 2, "primary": 7}
    assert run["state"] == run["exit_status"] == "success"
    assert run["gaps"] == {}
    assert run["documents"] == len(local_re.documents)


def test_event_pages_count_one_event_per_row() -> None:
    """An event_page of 5 rows counts 5 events and keeps the last row's values."""
    state = MonitorState()
    state.feed("start", {"uid": "r1", "time": 1.0, "scan_id": 1, "detectors": ["det"]})
    state.feed(
        "descriptor",
        {
            "uid": "d1",
            "run_start": "r1",
            "name": "primary",
            "data_keys": {"det": {"dtype": "number", "shape": [], "source": "sim"}},
        },
    )
    state.feed(
        "event_page",
        {
            "descriptor": "d1",
            "seq_num": [1, 2, 3, 4, 5],
            "time": [1.0] * 5,
            "uid": list("abcde"),
            "data": {"det": [1.0, 2.0, 3.0, 4.0, 5.0]},
            "timestamps": {"det": [1.0] * 5},
        },
    )
    snap = state.snapshot()
    assert snap["run"]["events"] == {"primary": 5}
    assert snap["run"]["streams"]["primary"]["latest"] == {"det": 5.0}
    assert snap["plot"]["values"] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_seq_num_holes_are_gaps_of_their_stream(local_re: Acquisition) -> None:
    """Events 3 and 4 of 10 lost on the way: 2 missing in primary, as a hole and at stop."""
    local_re.run(bp.count([det], 10))
    docs = [
        (name, doc) for name, doc in local_re.documents if not (name == "event" and doc["seq_num"] in (3, 4))
    ]
    state = MonitorState()
    feed(state, docs)
    snap = state.snapshot()
    assert snap["run"]["events"] == {"primary": 8}
    assert snap["run"]["gaps"] == {"primary": 2}
    assert snap["gaps"] == 2


def test_a_lost_tail_is_a_gap_found_by_stop_num_events(local_re: Acquisition) -> None:
    """The last 3 events never came (no hole to see): stop.num_events reveals them."""
    local_re.run(bp.count([det], 10))
    docs = [(name, doc) for name, doc in local_re.documents if not (name == "event" and doc["seq_num"] > 7)]
    state = MonitorState()
    feed(state, docs)
    assert state.snapshot()["run"]["gaps"] == {"primary": 3}


def test_a_repeated_event_is_a_duplicate_not_a_gap(local_re: Acquisition) -> None:
    """The same event twice is shown as a duplicate and, by the tracker's rule, counted as a
    received event (5 of 4), never as a gap."""
    local_re.run(bp.count([det], 4))
    docs = local_re.documents
    event = next(doc for name, doc in docs if name == "event" and doc["seq_num"] == 2)
    stop_at = next(i for i, (name, _) in enumerate(docs) if name == "stop")
    docs.insert(stop_at, ("event", copy.deepcopy(event)))
    state = MonitorState()
    feed(state, docs)
    stream = state.snapshot()["run"]["streams"]["primary"]
    assert stream["duplicates"] == 1
    assert stream["events"] == 5
    assert stream["gaps"] == 0


@pytest.mark.parametrize(
    "lost, repeated",
    [((5,), (2,)), ((4,), (2,)), ((3,), (2, 2)), ((2, 5), (4,)), ((), (1, 3)), ((1, 2, 3), ())],
)
def test_gaps_are_the_receivers_tracker_gaps(
    local_re: Acquisition, lost: tuple[int, ...], repeated: tuple[int, ...]
) -> None:
    """Events lost and events repeated (late): the monitor shows exactly the gaps the receiver's
    RunTracker counts for the same documents. (Before issue 14 the monitor subtracted duplicates
    at stop, so a lost last event beside a repeated one was 1 gap here and 0 in the sidecar.)"""
    local_re.run(bp.count([det], 5))
    docs = [d for d in local_re.documents if not (d[0] == "event" and d[1]["seq_num"] in lost)]
    stop_at = next(i for i, (name, _) in enumerate(docs) if name == "stop")
    for seq in repeated:
        event = next(doc for name, doc in local_re.documents if name == "event" and doc["seq_num"] == seq)
        docs.insert(stop_at, ("event", copy.deepcopy(event)))
    state = MonitorState()
    feed(state, docs)
    tracker = RunTracker()
    for name, doc in docs:
        tracker.route(name, doc)
    (tracked,) = tracker.runs.values()
    snap = state.snapshot()
    assert snap["run"]["gaps"] == tracked.received.gaps()
    assert snap["gaps"] == sum(tracked.received.gaps().values())
    assert snap["run"]["events"] == tracked.received.events
    assert snap["run"]["streams"]["primary"]["duplicates"] == len(repeated)


def test_default_plot_key_is_the_first_detectors_hinted_field(local_re: Acquisition) -> None:
    """scan([det2, det1], motor): the plot follows det2 (first detector), not the motor."""
    local_re.run(bp.scan([det2, det1], motor, 0, 1, 5))
    docs = local_re.documents
    state = MonitorState()
    feed(state, docs)
    plot = state.snapshot()["plot"]
    assert plot["key"] == "det2"
    expected = [doc["data"]["det2"] for name, doc in docs if name == "event"]
    assert plot["values"] == pytest.approx(expected)
    assert plot["count"] == 5


def test_default_plot_key_falls_back_to_any_numeric_key() -> None:
    """Without detectors or hints, the first scalar numeric key; arrays and strings are skipped."""
    descriptor = {
        "data_keys": {
            "label": {"dtype": "string", "shape": []},
            "image": {"dtype": "array", "shape": [4, 4]},
            "temperature": {"dtype": "number", "shape": []},
        }
    }
    assert default_plot_key({}, descriptor) == "temperature"
    assert default_plot_key({}, {"data_keys": {"image": {"dtype": "array", "shape": [2]}}}) is None


def test_plot_key_can_be_chosen(local_re: Acquisition) -> None:
    """--plot motor: the motor's readback is plotted instead of the detector."""
    local_re.run(bp.scan([det], motor, -1, 1, 3))
    state = MonitorState(plot_key="motor")
    feed(state, local_re.documents)
    plot = state.snapshot()["plot"]
    assert (plot["key"], plot["stream"]) == ("motor", "primary")
    assert plot["values"] == pytest.approx([-1.0, 0.0, 1.0])


def test_latest_values_keep_scalars_only() -> None:
    """Arrays and external keys are not 'latest values'; numpy scalars become plain numbers."""
    state = MonitorState()
    state.feed("start", {"uid": "r1", "time": 1.0})
    state.feed(
        "descriptor",
        {
            "uid": "d1",
            "run_start": "r1",
            "name": "primary",
            "data_keys": {
                "x": {"dtype": "number", "shape": []},
                "n": {"dtype": "integer", "shape": []},
                "spectrum": {"dtype": "array", "shape": [3]},
                "img": {"dtype": "array", "shape": [], "external": "FILESTORE:"},
            },
        },
    )
    state.feed(
        "event",
        {
            "descriptor": "d1",
            "seq_num": 1,
            "data": {"x": numpy.float64(1.5), "n": numpy.int32(7), "spectrum": numpy.arange(3), "img": "id"},
        },
    )
    snap = state.snapshot()
    latest = snap["run"]["streams"]["primary"]["latest"]
    assert latest == {"x": 1.5, "n": 7}
    assert type(latest["n"]) is int
    json.dumps(snap)  # JSON-able as it is


def test_rate_meter_counts_the_recent_window_only() -> None:
    """10 events/s for 10 s, then silence: the rate is 10/s, then 0 once the window has passed."""
    meter = RateMeter(window=5.0, resolution=0.5)
    t = 100.0
    for _ in range(100):
        meter.add(1, t)
        t += 0.1
    assert meter.rate(t) == pytest.approx(10.0, rel=0.1)
    assert meter.rate(t + 6.0) == 0.0


def test_stream_rate_uses_the_injected_clock() -> None:
    """Events arriving 20 per second show as 20/s."""
    clock = FakeClock()
    state = MonitorState(clock=clock)
    state.feed("start", {"uid": "r1", "time": 1.0})
    state.feed("descriptor", {"uid": "d1", "run_start": "r1", "name": "primary", "data_keys": {}})
    for seq in range(1, 61):
        state.feed("event", {"descriptor": "d1", "seq_num": seq, "data": {}})
        clock.now += 0.05
    stream = state.snapshot()["run"]["streams"]["primary"]
    assert stream["rate"] == pytest.approx(20.0, rel=0.15)
    assert stream["mean_rate"] == pytest.approx(20.0, rel=0.05)


def test_elapsed_runs_on_wall_clock_until_stop() -> None:
    """A running run's elapsed time grows with the wall clock; a stopped one is stop - start."""
    wall = FakeClock(5000.0)
    state = MonitorState(wall=wall)
    state.feed("start", {"uid": "r1", "time": 4990.0})
    assert state.snapshot()["run"]["elapsed_seconds"] == 10.0
    wall.now = 5030.0
    assert state.snapshot()["run"]["elapsed_seconds"] == 40.0
    state.feed("stop", {"run_start": "r1", "time": 5000.0, "exit_status": "abort", "reason": "user"})
    wall.now = 6000.0
    run = state.snapshot()["run"]
    assert (run["elapsed_seconds"], run["state"], run["reason"]) == (10.0, "abort", "user")


def test_last_runs_are_bounded_and_newest_first() -> None:
    """After many runs only the last MAX_RUNS finished ones are kept, newest first."""
    state = MonitorState()
    for i in range(MAX_RUNS + 15):
        state.feed("start", {"uid": f"r{i}", "time": float(i), "scan_id": i})
        state.feed("stop", {"run_start": f"r{i}", "time": i + 0.5, "exit_status": "success"})
    runs = state.snapshot()["runs"]
    assert len(runs) == MAX_RUNS
    assert runs[0]["scan_id"] == MAX_RUNS + 14
    assert runs[-1]["scan_id"] == 15


def test_documents_of_a_run_started_before_the_monitor_are_orphans(local_re: Acquisition) -> None:
    """Joining mid-run: documents whose start was missed are counted, not attributed to a run."""
    local_re.run(bp.count([det], 5))
    docs = local_re.documents
    state = MonitorState()
    feed(state, docs[3:])  # start, descriptor and the first event were missed
    snap = state.snapshot()
    assert snap["run"] is None
    assert snap["zmq"]["orphans"] == len(docs) - 3


def test_resources_and_datums_are_routed_but_not_counted_as_run_documents() -> None:
    """Resources and datums go through the tracker (a datum of an unknown resource is refused, not
    attributed) but, as before, neither count among a run's documents nor as orphans."""
    state = MonitorState()
    state.feed("start", {"uid": "r1", "time": 1.0})
    state.feed("descriptor", {"uid": "d1", "run_start": "r1", "name": "primary", "data_keys": {}})
    state.feed("resource", {"uid": "res1", "run_start": "r1", "spec": "X", "root": "/", "resource_path": "a"})
    state.feed("datum", {"datum_id": "res1/0", "resource": "res1", "datum_kwargs": {}})
    state.feed("datum", {"datum_id": "other/0", "resource": "other", "datum_kwargs": {}})
    state.feed("event", {"descriptor": "d1", "seq_num": 1, "data": {}})
    state.feed(
        "stop", {"run_start": "r1", "time": 2.0, "exit_status": "success", "num_events": {"primary": 1}}
    )
    snap = state.snapshot()
    assert snap["run"]["documents"] == 4
    assert snap["zmq"]["orphans"] == 0
    assert snap["zmq"]["documents"] == {
        "start": 1,
        "descriptor": 1,
        "resource": 1,
        "datum": 2,
        "event": 1,
        "stop": 1,
    }
    assert snap["zmq"]["rejected"] == {}
    assert state.tracker.closed_owner["res1"] == "r1"


def test_a_malformed_document_is_counted_and_does_not_raise() -> None:
    """An event with a non-integer seq_num or a descriptor without uid never raises out of feed()."""
    state = MonitorState()
    state.feed("start", {"uid": "r1", "time": 1.0})
    state.feed("descriptor", {"run_start": "r1"})  # no uid
    state.feed("descriptor", {"uid": "d1", "run_start": "r1", "data_keys": "nonsense"})
    state.feed("event", {"descriptor": "d1", "seq_num": "x", "data": {}})
    state.feed("event", {"descriptor": "d1", "seq_num": 1, "data": {}})
    snap = state.snapshot()
    assert snap["zmq"]["rejected"] == {"monitor-malformed": 2}
    assert snap["run"]["events"] == {"primary": 1}


def test_connection_since_changes_only_on_a_transition() -> None:
    """'connected since' keeps its time when the same state is reported again; connects are counted."""
    wall = FakeClock(100.0)
    state = MonitorState(wall=wall)
    state.set_connection("connected")
    wall.now = 200.0
    state.set_connection("connected")
    assert state.snapshot()["zmq"]["since"] == 100.0
    state.set_connection("disconnected", "proxy went away")
    assert state.snapshot()["zmq"]["since"] == 200.0
    assert state.snapshot()["zmq"]["connects"] == 2


def test_sidecar_health_up_unhealthy_down_and_upload_rate() -> None:
    """Upload rate comes from successive /healthz bodies; a failed poll is 'down' with its reason."""
    clock, wall = FakeClock(), FakeClock(50.0)
    state = MonitorState(clock=clock, wall=wall)
    assert state.snapshot()["sidecar"]["state"] == "unknown"
    state.set_health({"status": "ok", "upload": {"rows": 100, "documents": 10}})
    clock.now += 2.0
    state.set_health({"status": "ok", "upload": {"rows": 500, "documents": 30}})
    side = state.snapshot()["sidecar"]
    assert side["state"] == "up"
    assert side["upload_rows_per_second"] == 200.0
    assert side["upload_documents_per_second"] == 10.0
    state.set_health({"status": "unhealthy", "reasons": ["spool is not writable"]})
    assert state.snapshot()["sidecar"]["state"] == "unhealthy"
    wall.now = 60.0
    state.set_health(None, "nothing listens there")
    side = state.snapshot()["sidecar"]
    assert (side["state"], side["error"], side["since"], side["health"]) == (
        "down",
        "nothing listens there",
        60.0,
        None,
    )
    assert side["upload_rows_per_second"] is None


def test_snapshot_is_json_with_numpy_and_odd_values(local_re: Acquisition) -> None:
    """Whatever the documents hold (numpy scalars, NaN), the snapshot serializes to JSON."""
    local_re.run(bp.count([det], 2))
    state = MonitorState()
    feed(state, local_re.documents)
    state.feed("start", {"uid": "r2", "time": 1.0, "scan_id": numpy.int64(5), "plan_name": "x" * 500})
    state.feed(
        "descriptor",
        {"uid": "d2", "run_start": "r2", "data_keys": {"v": {"dtype": "number", "shape": []}}},
    )
    state.feed("event", {"descriptor": "d2", "seq_num": 1, "data": {"v": float("nan")}})
    text = json.dumps(state.snapshot(), allow_nan=False)
    snap = json.loads(text)
    assert snap["run"]["scan_id"] == 5
    assert len(snap["run"]["plan_name"]) == 80
    assert snap["run"]["streams"]["primary"]["latest"] == {"v": "nan"}


# ------------------------------------------------------------ hostile text
HOSTILE = "[/bold]\x1b[2J\x1b]52;c;aGk=\x07\r\u202e\u2028"


def all_strings(value: Any) -> Iterator[str]:
    """Every string in a JSON-like value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from all_strings(k)
            yield from all_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from all_strings(v)


def hostile_run(uid: str = "r-hostile\n") -> list[Document]:
    """A run whose every text field is hostile (markup, ESC, OSC 52, CR, bidi, U+2028, newlines)."""
    return [
        (
            "start",
            {"uid": uid, "time": 1.0, "scan_id": HOSTILE, "plan_name": HOSTILE, "detectors": [HOSTILE]},
        ),
        (
            "descriptor",
            {
                "uid": "d-hostile",
                "run_start": uid,
                "name": "[/y]\n",
                "data_keys": {
                    HOSTILE: {"dtype": "string", "shape": []},
                    "x\n": {"dtype": "number", "shape": []},
                },
                "hints": {HOSTILE: {"fields": ["x\n"]}},
            },
        ),
        ("event", {"descriptor": "d-hostile", "seq_num": 1, "data": {HOSTILE: HOSTILE * 50, "x\n": 1.5}}),
        (
            "stop",
            {
                "run_start": uid,
                "time": 2.0,
                "exit_status": HOSTILE,
                "reason": HOSTILE,
                "num_events": {"[/y]\n": 3},
            },
        ),
    ]


def test_every_text_in_the_snapshot_is_escaped_and_bounded() -> None:
    """Hostile names and values (uid ending in a newline, stream '[/y]\\n', markup and escape
    sequences everywhere): the snapshot holds no control character, names are escaped the same way
    in every place (so the stop's num_events still finds its stream), values are bounded."""
    state = MonitorState(plot_key="x\n")
    feed(state, hostile_run())
    state.error("decode thread: ValueError: " + HOSTILE)
    state.set_connection("disconnected", HOSTILE)
    state.set_health(None, HOSTILE)
    snap = state.snapshot()
    for text in all_strings(json.loads(json.dumps(snap))):
        assert not any(c in text for c in "\x1b\x07\r\n\u202e\u2028"), repr(text)
    run = snap["run"]
    assert run["uid"] == "r-hostile\\n"
    assert run["plan_name"].startswith("[/bold]\\x1b[2J\\x1b]52;c;aGk=\\x07\\r\\u202e\\u2028")
    assert run["events"] == {"[/y]\\n": 1}
    assert run["gaps"] == {"[/y]\\n": 2}  # num_events said 3: matched to the same (escaped) stream
    latest = run["streams"]["[/y]\\n"]["latest"]
    assert len(latest[plain_key(HOSTILE)]) <= 80
    assert snap["plot"]["key"] == "x\\n" and snap["plot"]["values"] == [1.5]
    assert snap["zmq"]["rejected"] == {}


def plain_key(text: str) -> str:
    from tiled_writer_sidecar.text import clean

    return clean(text, 80)


def test_out_of_range_numbers_and_odd_shapes_are_malformed_never_raised() -> None:
    """seq_num beyond 2**63, an infinite time, a ragged event_page, num_events of 10**5000, a
    uid of a megabyte: each document is counted as monitor-malformed (or its time ignored); feed()
    never raises and the snapshot stays JSON."""
    state = MonitorState()
    state.feed("start", {"uid": "r1", "time": float("inf"), "scan_id": 10**5000})
    state.feed("start", {"uid": "u" * 2**20, "time": 1.0})
    state.feed("descriptor", {"uid": "d1", "run_start": "r1", "data_keys": {}})
    state.feed("event", {"descriptor": "d1", "seq_num": 2**70, "data": {}})
    state.feed("event", {"descriptor": "d1", "seq_num": float("nan"), "data": {}})
    state.feed("event_page", {"descriptor": "d1", "seq_num": [1, 2], "data": {"v": [1.0]}})
    state.feed("event", {"descriptor": "d1", "seq_num": 1, "data": {}})
    state.feed("stop", {"run_start": "r1", "time": 1e300, "num_events": {"primary": 10**5000}})
    snap = json.loads(json.dumps(state.snapshot(), allow_nan=False))
    assert snap["zmq"]["rejected"] == {"monitor-malformed": 5}
    run = snap["run"]
    assert run["uid"] == "r1" and run["start_time"] is None and run["elapsed_seconds"] is None
    assert run["scan_id"] == "<int>"
    assert run["events"] == {"primary": 1}
    assert all(len(s) <= 300 for s in all_strings(snap))
