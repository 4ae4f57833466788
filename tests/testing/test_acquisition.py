"""Acquisition: a real RunEngine publishing through the proxy, and expected rows."""

from __future__ import annotations

from typing import Any

import bluesky.plans as bp
import pytest
import zmq
from ophyd.sim import det, motor

from tiled_writer_sidecar.testing import (
    Acquisition,
    expected_rows,
    is_probe,
    run_uids,
)


def test_run_records_deep_copies_and_wall_time(acquisition: Acquisition) -> None:
    """run() returns the uid, records every document, and measures the plan."""
    seen: list[tuple[str, dict[str, Any]]] = []
    acquisition.subscribe(lambda name, doc: seen.append((name, doc)))

    (uid,) = acquisition.run(bp.count([det], 5))

    names = [name for name, _ in acquisition.documents]
    assert names == ["start", "descriptor"] + ["event"] * 5 + ["stop"]
    assert run_uids(acquisition.documents) == [uid]
    assert acquisition.documents == seen
    assert all(a is not b for (_, a), (_, b) in zip(acquisition.documents, seen, strict=True))
    assert len(acquisition.durations) == 1
    assert 0 < acquisition.last_duration < 60


def test_expected_rows_from_a_real_scan(acquisition: Acquisition) -> None:
    """One row per event: seq_num, time, every data key and its ts_ column."""
    (uid,) = acquisition.run(bp.scan([det], motor, -1, 1, 4))
    rows = expected_rows(acquisition.documents)
    events = [doc for name, doc in acquisition.documents if name == "event"]
    assert [row["seq_num"] for row in rows] == [1, 2, 3, 4]
    assert [row["time"] for row in rows] == [event["time"] for event in events]
    assert set(rows[0]) == {
        "seq_num",
        "time",
        "det",
        "motor",
        "motor_setpoint",
        "ts_det",
        "ts_motor",
        "ts_motor_setpoint",
    }
    assert expected_rows(acquisition.documents, "baseline", run_uid=uid) == []


def test_wait_subscribers_means_the_first_document_is_not_lost(
    acquisition: Acquisition,
) -> None:
    """Once ready() saw a probe at the subscriber, its first document is `start`."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        assert acquisition.out_address is not None
        sub.connect(acquisition.out_address)

        def saw_probe() -> bool:
            seen = False
            while sub.poll(timeout=0):
                seen = is_probe(sub.recv()) or seen
            return seen

        assert acquisition.wait_subscribers(saw_probe) >= 1
        acquisition.run(bp.count([det], 1))
        frames: list[list[bytes]] = []
        while not frames or frames[-1][1] != b"stop":
            assert sub.poll(timeout=10_000)
            message = sub.recv()
            if not is_probe(message):
                frames.append(message.split(b" ", 2))
        assert [name for _, name, _ in frames] == [b"start", b"descriptor", b"event", b"stop"]
    finally:
        context.destroy(linger=0)


def test_wait_subscribers_times_out_naming_ready(acquisition: Acquisition) -> None:
    """A ready() that never holds ends in TimeoutError, not a hang."""
    with pytest.raises(TimeoutError, match=r"ready\(\)"):
        acquisition.wait_subscribers(lambda: False, timeout=1.0)


def test_close_stops_the_run_engine_loop() -> None:
    """close() stops the RunEngine's event-loop thread (no thread leak per test)."""
    acq = Acquisition(None)
    acq.run(bp.count([det], 1))
    acq.close()
    assert not acq.RE._th.is_alive()
    acq.close()  # idempotent


def _doc_stream() -> list[tuple[str, dict[str, Any]]]:
    data_keys = {
        "a": {"dtype": "number", "shape": [], "source": "s"},
        "img": {"dtype": "array", "shape": [2], "source": "s", "external": "FILESTORE:"},
        "time": {"dtype": "number", "shape": [], "source": "s"},
    }
    return [
        ("start", {"uid": "r1", "time": 0.0}),
        ("descriptor", {"uid": "d1", "run_start": "r1", "name": "primary", "data_keys": data_keys}),
        ("descriptor", {"uid": "d2", "run_start": "r1", "name": "other", "data_keys": {}}),
        (
            "event",
            {
                "descriptor": "d1",
                "seq_num": 1,
                "time": 1.0,
                "data": {"a": 1.5, "img": "datum-1", "time": 7.0},
                "timestamps": {"a": 1.1, "img": 1.2, "time": 1.3},
                "filled": {"img": False},
            },
        ),
        (
            "event_page",
            {
                "descriptor": "d1",
                "seq_num": [2, 3],
                "time": [2.0, 3.0],
                "uid": ["e2", "e3"],
                "data": {"a": [2.5, 3.5], "img": [[1, 2], [3, 4]], "time": [8.0, 9.0]},
                "timestamps": {"a": [2.1, 3.1], "img": [2.2, 3.2], "time": [2.3, 3.3]},
                "filled": {"img": [True, True]},
            },
        ),
        ("event", {"descriptor": "d2", "seq_num": 1, "time": 1.0, "data": {}, "timestamps": {}}),
        ("stop", {"uid": "s1", "run_start": "r1", "time": 4.0}),
        ("start", {"uid": "r2", "time": 5.0}),
    ]


def test_expected_rows_follows_tiled_writer_rules() -> None:
    """External keys only when filled, pages unpacked, `time` renamed `time_`."""
    rows = expected_rows(_doc_stream(), "primary", run_uid="r1")
    assert rows == [
        {"seq_num": 1, "time": 1.0, "a": 1.5, "time_": 7.0, "ts_a": 1.1, "ts_time_": 1.3},
        {
            "seq_num": 2,
            "time": 2.0,
            "a": 2.5,
            "img": [1, 2],
            "time_": 8.0,
            "ts_a": 2.1,
            "ts_img": 2.2,
            "ts_time_": 2.3,
        },
        {
            "seq_num": 3,
            "time": 3.0,
            "a": 3.5,
            "img": [3, 4],
            "time_": 9.0,
            "ts_a": 3.1,
            "ts_img": 3.2,
            "ts_time_": 3.3,
        },
    ]


def test_expected_rows_needs_run_uid_when_ambiguous() -> None:
    """With two runs in the documents the caller must say which one."""
    with pytest.raises(ValueError, match="2 runs"):
        expected_rows(_doc_stream())
