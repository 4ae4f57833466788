"""Issue 12, classes 1, 4 and 5, end to end: hostile pickles and container bombs never hurt the daemon.

Everything is real: a RunEngine with `ophyd.sim` devices publishes through
bluesky's `Publisher` to `bluesky-0MQ-proxy`; the hostile frames go out on
that very Publisher socket (`send_raw`) into the running
`tiled-writer-sidecar run` daemon. Then a scan: it must arrive in Tiled row
for row, the daemon's pid never changed, its receiver's peak RSS (VmHWM)
stayed under 1 GiB, its log holds only printable ASCII rejection lines, and
each hostile frame is counted under its reason in ``/metrics``.

- class 1: a numpy dtype rebuilt through BUILD with a field offset beyond its
  item size (a large offset made numpy read far outside its buffer while the
  validation error was formatted: SIGSEGV; a small one printed heap bytes).
- class 4: a void scalar of 256 MiB without data, an object array of shape
  (2**40, 0) (``tolist()`` raised MemoryError out of the loop), 16 MiB
  msgpack and JSON payloads of empty lists (2.4 GiB in the receiver).
- class 5: BUILD on a global the decoder hands out (``__defaults__`` of its
  own scalar function), inside an otherwise valid start document.
"""

from __future__ import annotations

import pickle
import re
import struct
from pathlib import Path

import bluesky.plans as bp
from ophyd.sim import det, motor

from tests.support.daemon import make_sidecar, rejected_counts
from tests.support.framing import new_uid, raw_frame
from tests.support.hostile_pickles import (
    FakeScalar,
    build_on_global_pickle,
    object_array,
    outside_field_dtype,
    void_scalar_without_data,
)
from tiled_writer_sidecar.testing import (
    Acquisition,
    TiledContainer,
    ZmqProxy,
    wait_until,
)
from tiled_writer_sidecar.testing.acquisition import expected_rows
from tiled_writer_sidecar.testing.tiled_readback import frame_rows, read_stream

RSS_LIMIT = 2**30


def outside_field_start(offset: int) -> bytes:
    """A start whose time is a void scalar whose one field starts `offset` bytes into 8."""
    scalar = FakeScalar(outside_field_dtype(offset), b"\x00" * 8)
    return raw_frame("start", pickle.dumps({"uid": new_uid(), "time": scalar}))


def void_scalar_start(size: int) -> bytes:
    return raw_frame(
        "start", pickle.dumps({"uid": new_uid(), "time": 1.0, "x": void_scalar_without_data(size)})
    )


def object_array_start(shape: tuple[int, ...]) -> bytes:
    return raw_frame("start", pickle.dumps({"uid": new_uid(), "time": 1.0, "x": object_array(shape)}))


def empty_lists_msgpack(size: int) -> bytes:
    """A valid start (uid, time) whose `x` is `size` bytes of empty msgpack arrays."""
    uid = new_uid().encode()
    head = b"\x83\xa3uid\xd9" + bytes([len(uid)]) + uid + b"\xa4time\xcb" + struct.pack(">d", 1.0)
    return raw_frame("start", head + b"\xa1x\xdd" + struct.pack(">I", size) + b"\x90" * size)


def empty_lists_json(size: int) -> bytes:
    return raw_frame(
        "start", b'{"uid": "%s", "time": 1.0, "x": [' % new_uid().encode() + b"[]," * (size // 3) + b"[]]}"
    )


def build_on_global_start() -> bytes:
    """A valid start whose pickle first does BUILD on the scalar global: setattr __defaults__."""
    return raw_frame("start", build_on_global_pickle({"uid": new_uid(), "time": 1.0}))


def peak_rss(pid: int) -> int:
    """VmHWM (peak resident set) of process `pid`, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match[1]) * 1024


def test_hostile_numpy_pickles_and_container_bombs_are_rejected_and_the_next_scan_arrives(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """Classes 1, 4, 5 through the real proxy: each frame counted under its reason, no run made of
    any, the daemon never restarted (same pid), its peak RSS < 1 GiB, no heap bytes in its log, and
    the scan right after is in Tiled row for row."""
    hostile = [
        ("garbage", outside_field_start(2**28)),  # class 1: SIGSEGV (2**40: OverflowError in numpy)
        ("garbage", outside_field_start(64)),  # class 1: heap bytes in the log line
        ("garbage", void_scalar_start(2**28)),  # class 4: 256 MiB from ~150 bytes
        ("too-complex", object_array_start((2**40, 0))),  # class 4: tolist() -> MemoryError
        ("too-complex", empty_lists_msgpack(16 * 2**20)),  # class 4: 16 MiB -> 2.4 GiB
        ("too-complex", empty_lists_json(16 * 2**20)),
        ("pickle-forbidden-global", build_on_global_start()),  # class 5
    ]
    with make_sidecar(tmp_path, proxy, tiled_container) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        pid = sidecar.process.pid
        assert pid is not None
        baseline = rejected_counts(sidecar)
        assert acquisition.publisher is not None
        for _, message in hostile:
            acquisition.publisher.send_raw(message)

        expected = {
            reason: baseline.get(reason, 0) + sum(r == reason for r, _ in hostile) for reason, _ in hostile
        }

        def all_counted() -> bool:
            assert sidecar.process.running and sidecar.process.pid == pid, sidecar.log_tail()
            counts = rejected_counts(sidecar)
            return all(counts.get(reason, 0) >= n for reason, n in expected.items())

        wait_until(all_counted, 120, interval=0.5, what="every hostile frame counted")
        counts = rejected_counts(sidecar)
        assert {reason: counts.get(reason, 0) for reason in expected} == expected

        (uid,) = acquisition.run(bp.scan([det], motor, -1, 1, 7))
        status = sidecar.wait_drained([uid], 120)
        runs = {run["uid"]: run for run in status["runs"]}
        assert list(runs) == [uid], "a hostile frame made a run of its own"
        assert runs[uid]["state"] == "uploaded" and runs[uid]["gaps"] == {}
        rows = expected_rows(acquisition.documents, "primary", run_uid=uid)
        assert len(rows) == 7
        assert frame_rows(read_stream(tiled_container.client(), uid, "primary")) == rows

        assert sidecar.process.running and sidecar.process.pid == pid
        assert sidecar.health()["status"] == "ok"
        assert peak_rss(pid) < RSS_LIMIT, peak_rss(pid)
        log = sidecar.log_tail(100_000)
        assert "Traceback" not in log
        lines = [line for line in log.splitlines() if "message rejected" in line]
        assert lines and all(line.isascii() and line.isprintable() for line in lines), lines
        assert any("outside its item size" in line for line in lines), lines
