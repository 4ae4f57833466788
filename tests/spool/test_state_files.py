"""Index files: written whatever a schema-valid document held, read back whatever a file holds,
and never through a symlink."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiled_writer_sidecar.coerce import MAX_ITEMS, MAX_NAME
from tiled_writer_sidecar.spool import state_files
from tiled_writer_sidecar.spool.state_files import (
    Received,
    Uploaded,
    UploaderStatus,
    UploadState,
    atomic_write_json,
    read_json,
)

HOSTILE_VALUES: list[Any] = [
    np.int64(7),
    np.float32(1.5),
    np.uint64(2**64 - 1),
    complex(1, 2),
    10**5000,
    -(10**30),
    float("nan"),
    float("inf"),
    np.array([1, 2]),
    b"bytes",
    "x" * 100_000,
    {"nested": [1, 2]},
    None,
]


@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=lambda v: type(v).__name__)
def test_received_with_any_value_saves_and_loads(tmp_path: Path, value: Any) -> None:
    """Every field the receiver fills from a document takes any value: the file is plain JSON,
    loads again, and numbers that fit come back as plain numbers."""
    received = Received(
        uid="run-1",
        scan_id=value,
        plan_name=value,
        start_time=value,
        expected_events={"primary": value, "x" * 5000: 1},
        exit_status=value,
        close_reason=value,
        events={"primary": value},
    )
    received.save(tmp_path)
    raw = json.loads((tmp_path / state_files.RECEIVED).read_text())
    loaded = Received.load(tmp_path)
    assert loaded is not None and loaded.uid == "run-1"
    assert loaded.scan_id is None or type(loaded.scan_id) is int
    assert loaded.start_time is None or type(loaded.start_time) is float
    assert loaded.plan_name is None or len(loaded.plan_name) <= MAX_NAME
    assert all(type(v) is int and len(k) <= MAX_NAME for k, v in (loaded.expected_events or {}).items())
    assert raw["scan_id"] == loaded.scan_id
    if isinstance(value, np.int64):
        assert loaded.scan_id == 7 and loaded.expected_events == {"primary": 7, "x" * MAX_NAME: 1}
    loaded.problems()  # derived values compute


def test_uploaded_bounds_lists_and_dicts(tmp_path: Path) -> None:
    """Uploaded keeps at most MAX_ITEMS damage lines and row counts."""
    Uploaded(
        state="uploaded", damage=["d"] * (MAX_ITEMS * 2), rows={str(i): i for i in range(MAX_ITEMS * 2)}
    ).save(tmp_path)
    loaded = Uploaded.load(tmp_path)
    assert loaded.state == "uploaded"
    assert len(loaded.damage) == MAX_ITEMS and len(loaded.rows) == MAX_ITEMS


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.sampled_from([f.name for f in fields(Received)] + ["other"]), json_values))
def test_load_never_raises_on_any_json(content: dict[str, Any]) -> None:
    """received.json and uploaded.json with any JSON content load without raising."""
    with tempfile.TemporaryDirectory() as directory:
        run = Path(directory)
        for name in (state_files.RECEIVED, state_files.UPLOADED):
            (run / name).write_text(json.dumps(content))
        received = Received.load(run)
        if received is not None:
            received.gaps()
            received.problems()
            received.save(run)
        Uploaded.load(run).save(run)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\xff\xfe garbage",
        b"[" * 200_000,
        b"1" * 5000,
        b'"text"',
        b"{" + b" " * (state_files.MAX_JSON_BYTES + 10) + b"}",
    ],
    ids=["empty", "garbage", "deep", "huge-int", "not-an-object", "too-big"],
)
def test_load_of_a_broken_file_is_none_or_defaults(tmp_path: Path, content: bytes) -> None:
    """Unparseable, deeply nested, oversized or non-object files read as missing."""
    (tmp_path / state_files.RECEIVED).write_bytes(content)
    (tmp_path / state_files.UPLOADED).write_bytes(content)
    assert Received.load(tmp_path) is None
    assert Uploaded.load(tmp_path).state == "pending"


def test_atomic_write_never_follows_a_planted_temporary_symlink(tmp_path: Path) -> None:
    """A symlink planted at the temporary name the previous release used (predictable: pid) is
    left alone, and its target is not written."""
    target = tmp_path / "victim"
    target.write_bytes(b"do not touch")
    path = tmp_path / state_files.RECEIVED
    (tmp_path / f".{path.name}.{os.getpid()}.tmp").symlink_to(target)
    atomic_write_json(path, {"uid": "run-1"})
    assert target.read_bytes() == b"do not touch"
    assert read_json(path) == {"uid": "run-1"}
    assert not path.is_symlink()


def test_atomic_write_of_values_json_cannot_write(tmp_path: Path) -> None:
    """atomic_write_json (used for uploader.json too) writes NaN, numpy and huge ints as plain values."""
    atomic_write_json(tmp_path / "x.json", {"a": float("nan"), "b": np.int64(3), "c": 10**5000, 1: "key"})
    assert read_json(tmp_path / "x.json") == {"a": None, "b": 3, "c": None, "1": "key"}


def test_read_json_never_follows_a_symlink(tmp_path: Path) -> None:
    """An index file that is a symlink reads as missing."""
    (tmp_path / "real.json").write_text('{"uid": "other-run"}')
    (tmp_path / state_files.RECEIVED).symlink_to(tmp_path / "real.json")
    assert read_json(tmp_path / state_files.RECEIVED) is None
    assert Received.load(tmp_path) is None


def test_received_changes_through_its_methods_and_saves_the_same_fields(tmp_path: Path) -> None:
    """Each change the receiver makes is one method; the file holds exactly the fields it always held."""
    received = Received(uid="run-1")
    received.note_spooled(100, 5.0)
    received.note_spooled(50, 6.0)
    received.note_events("primary", 3)
    received.note_hole("primary", 2)
    received.note_late("primary")
    received.note_datum_rows("primary", 4)
    received.note_datum_rows("primary", 2)
    received.note_duplicate()
    received.note_unwritten(50)
    received.note_dropped()
    received.note_stop("success", {"primary": 5})
    received.close("stop")
    assert (received.documents, received.bytes, received.last_received) == (1, 100, 6.0)
    assert received.missing == {"primary": 1} and received.out_of_order == {"primary": 1}
    assert received.datum_rows == {"primary": 4} and received.duplicates == 1 and received.dropped == 1
    assert received.gaps() == {"primary": 1}
    received.save(tmp_path)
    raw = json.loads((tmp_path / state_files.RECEIVED).read_text())
    assert sorted(raw) == sorted(f.name for f in fields(Received))
    assert Received.load(tmp_path) == received
    received.note_late("primary")
    assert received.missing == {} and received.out_of_order == {"primary": 2}
    assert list(received.recount([b"ab", b"c"], header=10)) == [b"ab", b"c"]
    assert (received.documents, received.bytes) == (2, 23)
    received.resume()
    assert received.events == received.missing == {} and not received.stop_received
    assert received.exit_status is None and received.expected_events is None


def test_uploader_status_changes_through_its_methods(tmp_path: Path) -> None:
    """Tiled's state changes once per change, retries and errors are counted, the lag list keeps the
    last 1,000, the backlog's ETA follows the measured rate; the file holds the fields it always held."""
    status = UploaderStatus()
    assert status.note_tiled("connecting") is None
    previous = status.note_tiled("down", "ConnectError: refused")
    assert (
        previous is not None and previous[0] == "connecting" and status.last_error == "ConnectError: refused"
    )
    status.note_retry()
    status.note_retry("append failed", append=True)
    assert (status.retries, status.append_retries, status.last_error) == (2, 1, "append failed")
    for n in range(1005):
        status.note_flush(2, float(n), {"count": n + 1})
    status.note_flush(3, None, None)
    assert status.flushes == 1006 and status.rows == 2013 and len(status.lag_seconds) == 1000
    assert status.last_lag_seconds == 1004.0 and status.lag_histogram == {"count": 1005}
    status.note_uploaded(8, 7)
    status.note_quarantined("run x quarantined: bad")
    status.note_rewrite()
    assert (status.runs_uploaded, status.documents, status.rows, status.runs_quarantined) == (1, 8, 2020, 1)
    status.note_backlog(10)
    assert status.backlog_runs == 10 and status.backlog_eta_seconds is None
    status.note_backlog(10, (2.0, 50.0))
    assert (status.runs_per_second, status.rows_per_second, status.backlog_eta_seconds) == (2.0, 50.0, 5.0)
    status.save(tmp_path)
    raw = json.loads((tmp_path / state_files.UPLOADER).read_text())
    assert sorted(raw) == sorted(f.name for f in fields(UploaderStatus))
    loaded = UploaderStatus.load(tmp_path)
    assert loaded is not None and loaded.rewrites == 1 and loaded.tiled == "down"


def test_uploaded_changes_through_its_methods_and_reads_back(tmp_path: Path) -> None:
    """A run's upload record: creating before the create, a new attempt from nothing, progress, a wait
    with its reason, the end with rows per stream, quarantine; what is saved is what loads back."""
    uploaded = Uploaded(documents=9, damage=["seg 0 at 12"], reason="attempt 1 failed")
    uploaded.note_creating(True)
    assert uploaded.creating and not uploaded.created
    uploaded.start_attempt()
    assert (uploaded.state, uploaded.created, uploaded.creating, uploaded.attempts) == (
        UploadState.UPLOADING,
        True,
        False,
        1,
    )
    assert (uploaded.documents, uploaded.damage, uploaded.reason) == (0, [], None)
    uploaded.note_documents(40)
    uploaded.note_waiting("attempt 1 failed, retried in 2 s: boom")
    uploaded.save(tmp_path)
    loaded = Uploaded.load(tmp_path)
    assert (loaded.documents, loaded.reason, loaded.created) == (
        40,
        "attempt 1 failed, retried in 2 s: boom",
        True,
    )
    loaded.finish(55, {"primary": 50})
    loaded.save(tmp_path)
    done = Uploaded.load(tmp_path)
    assert (done.state, done.documents, done.rows) == (UploadState.UPLOADED, 55, {"primary": 50})
    done.quarantine("a document not of this run")
    assert (done.state, done.reason) == (UploadState.QUARANTINED, "a document not of this run")
    assert sorted(json.loads((tmp_path / state_files.UPLOADED).read_text())) == sorted(
        f.name for f in fields(Uploaded)
    )
