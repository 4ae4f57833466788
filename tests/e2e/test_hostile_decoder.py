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
import uuid
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import httpx
import numpy as np
from ophyd.sim import det, motor

from tiled_writer_sidecar.testing import Acquisition, TiledContainer, ZmqProxy, wait_until
from tiled_writer_sidecar.testing.acquisition import expected_rows
from tiled_writer_sidecar.testing.sidecar import SidecarProcess
from tiled_writer_sidecar.testing.tiled_readback import frame_rows, read_stream

REJECTED = "tiled_writer_sidecar_messages_rejected_total"
RSS_LIMIT = 2**30
PLAIN_STATE = (3, "<", None, None, None, -1, -1, 0)


class FakeDtype:
    """Pickles exactly like a numpy dtype (``numpy.dtype`` + BUILD), with any state."""

    def __init__(self, typecode: str, state: tuple[Any, ...]) -> None:
        self.typecode = typecode
        self.state = state

    def __reduce__(self) -> tuple[Any, ...]:
        return (np.dtype, (self.typecode, False, True), self.state)


class FakeScalar:
    """Pickles like a numpy scalar: ``numpy._core.multiarray.scalar(dtype[, data])``."""

    def __init__(self, dtype: FakeDtype, *data: bytes) -> None:
        self.args = (dtype, *data)

    def __reduce__(self) -> tuple[Any, ...]:
        return (np._core.multiarray.scalar, self.args)


class FakeArray:
    """Pickles like an ndarray: ``_reconstruct(ndarray, (0,), b"b")`` + BUILD with any state."""

    def __init__(self, state: tuple[Any, ...]) -> None:
        self.state = state

    def __reduce__(self) -> tuple[Any, ...]:
        return (np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"), self.state)


def new_uid() -> str:
    return str(uuid.uuid4())


def frame(name: str, payload: bytes) -> bytes:
    return b" ".join([b"", name.encode(), payload])


def outside_field_start(offset: int) -> bytes:
    """A start whose time is a void scalar whose one field starts `offset` bytes into 8."""
    field = FakeDtype("f8", PLAIN_STATE)
    dtype = FakeDtype("V8", (3, "|", None, ("x",), {"x": (field, offset)}, 8, 1, 16))
    return frame("start", pickle.dumps({"uid": new_uid(), "time": FakeScalar(dtype, b"\x00" * 8)}))


def void_scalar_start(size: int) -> bytes:
    scalar = FakeScalar(FakeDtype(f"V{size}", (3, "|", None, None, None, size, 1, 0)))
    return frame("start", pickle.dumps({"uid": new_uid(), "time": 1.0, "x": scalar}))


def object_array_start(shape: tuple[int, ...]) -> bytes:
    objects = FakeDtype("O8", (3, "|", None, None, None, -1, -1, 63))
    array = FakeArray((1, shape, objects, False, []))
    return frame("start", pickle.dumps({"uid": new_uid(), "time": 1.0, "x": array}))


def empty_lists_msgpack(size: int) -> bytes:
    """A valid start (uid, time) whose `x` is `size` bytes of empty msgpack arrays."""
    uid = new_uid().encode()
    head = b"\x83\xa3uid\xd9" + bytes([len(uid)]) + uid + b"\xa4time\xcb" + struct.pack(">d", 1.0)
    return frame("start", head + b"\xa1x\xdd" + struct.pack(">I", size) + b"\x90" * size)


def empty_lists_json(size: int) -> bytes:
    return frame(
        "start", b'{"uid": "%s", "time": 1.0, "x": [' % new_uid().encode() + b"[]," * (size // 3) + b"[]]}"
    )


def build_on_global_start() -> bytes:
    """A valid start whose pickle first does BUILD on the scalar global: setattr __defaults__."""
    pickled = pickle.dumps({"uid": new_uid(), "time": 1.0}, protocol=4)
    attack = b"\x8c\x16numpy._core.multiarray\x8c\x06scalar\x93" + b"N}\x8c\x0c__defaults__C\x01x\x85s\x86b0"
    return frame("start", pickled[:2] + attack + pickled[2:])


def rejected_counts(sidecar: SidecarProcess) -> dict[str, float]:
    text = httpx.get(sidecar.metrics_url, timeout=10).text
    return {m[1]: float(m[2]) for m in re.finditer(REJECTED + r'\{reason="([^"]+)"\} ([0-9.e+]+)', text)}


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
    with SidecarProcess(
        tmp_path / "sidecar",
        zmq_address=proxy.out_address,
        tiled_uri=tiled_container.uri,
        api_key=tiled_container.api_key,
    ) as sidecar:
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
