"""Issue 12's fuzz campaign, end to end: 100,000 mutated frames never stop or bloat the daemon.

Everything is real: a RunEngine (`ophyd.sim` det, motor and an image
detector) publishes through bluesky's `Publisher` to `bluesky-0MQ-proxy`
and the `tiled-writer-sidecar run` daemon spools and uploads its runs. Its
documents, serialized as the Publisher would (pickle protocols 4, 2 and 5,
msgpack_numpy, JSON), seed a campaign of at least `FRAMES` frames sent on
the Publisher's own socket: pickles mutated opcode by opcode (dropped,
doubled, arguments rewritten, globals, BUILD, REDUCE, memo and container
opcodes inserted), truncations, bit flips, random bytes, headers claiming
huge lengths (msgpack, pickle FRAME/BINBYTES8, JSON nesting). Start
documents are only ever truncated (a mutated start is often a valid new
run, which would only test the uploader). Frames are sent in batches, each
after the daemon counted all but `IN_FLIGHT` of the previous ones (the
proxy drops beyond its 1,000-message high-water mark), and what arrived is
read from ``/healthz``. Then a scan must arrive in Tiled row for row, the
daemon's pid never changed, it is healthy, and its receiver's peak RSS
(VmHWM) stayed under `RSS_LIMIT`.
"""

from __future__ import annotations

import pickletools
import random
import re
from pathlib import Path
from typing import Any

import bluesky.plans as bp
from ophyd.sim import det, hw, motor

from tests.support.daemon import make_sidecar
from tests.support.framing import SERIALIZERS, raw_frame
from tiled_writer_sidecar.testing import (
    Acquisition,
    TiledContainer,
    ZmqProxy,
    wait_until,
)
from tiled_writer_sidecar.testing.acquisition import expected_rows
from tiled_writer_sidecar.testing.tiled_readback import frame_rows, read_stream

FRAMES = 100_000
BATCH = 500
IN_FLIGHT = 300
RSS_LIMIT = 1024 * 2**20
SEED = 12

SNIPPETS = [
    b"b",
    b"R",
    b"0",
    b"2",
    b"\x94",
    b"h\x00",
    b"r\xff\xff\xff\x7f",
    b"]",
    b"}",
    b"(",
    b"e",
    b"u",
    b"\x85",
    b"N",
    b"\x95\xff\xff\xff\xff\x00\x00\x00\x00",
    b"\x8e\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"\x8c\x05numpy\x8c\x05dtype\x93",
    b"\x8c\x05numpy\x8c\x07ndarray\x93",
    b"\x8c\x16numpy._core.multiarray\x8c\x06scalar\x93",
    b"\x8c\x16numpy._core.multiarray\x8c\x0c_reconstruct\x93",
    b"\x8c\x13numpy._core.numeric\x8c\x0b_frombuffer\x93",
    b"\x8c\x06_codecs\x8c\x06encode\x93",
    b"\x8c\x02os\x8c\x06system\x93",
    b"\x8c\x02V9\x88\x88\x87",
    b"K\x03\x8c\x01|NNNJ\x00\x00\x00@K\x01K\x00t",
]
HUGE_HEADERS = [
    b"\xdd\xff\xff\xff\xff",
    b"\xdf\x7f\xff\xff\xff",
    b"\xdb\xff\xff\xff\xff",
    b"\xc6\xff\xff\xff\xff",
    b"\x80\x04\x95\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"\x80\x05\x96\xff\xff\xff\xff\xff\xff\xff\x7f",
    b'{"a": ' + b"[" * 5000,
]


class Campaign:
    """Mutated frames from seed documents (deterministic for one `seed`)."""

    def __init__(self, documents: list[tuple[str, dict[str, Any]]], seed: int) -> None:
        self.random = random.Random(seed)
        self.seeds: list[tuple[str, str, bytes]] = [
            (label, name, serialize(doc))
            for name, doc in documents
            for label, serialize in SERIALIZERS.items()
        ]
        self.opcodes: dict[bytes, list[tuple[int, int]]] = {}

    def _ops(self, payload: bytes) -> list[tuple[int, int]]:
        ops = self.opcodes.get(payload)
        if ops is None:
            starts = [pos for _, _, pos in pickletools.genops(payload)]
            ops = self.opcodes[payload] = list(zip(starts, [*starts[1:], len(payload)], strict=True))
        return ops

    def frame(self) -> bytes:
        rnd = self.random
        label, name, payload = rnd.choice(self.seeds)
        kind = rnd.random()
        data = bytearray(payload)
        if name == "start" or kind < 0.1:  # truncation
            del data[rnd.randrange(len(data)) :]
        elif kind < 0.5 and label.startswith("pickle"):
            for _ in range(rnd.randint(1, 3)):
                ops = self._ops(payload) if data == payload else [(i, i + 1) for i in range(len(data))]
                start, end = rnd.choice(ops)
                action = rnd.randrange(4)
                if action == 0:
                    del data[start:end]
                elif action == 1:
                    data[start:start] = data[start:end]
                elif action == 2 and end - start > 1:
                    data[start + 1 : end] = rnd.randbytes(end - start - 1)
                else:
                    data[start:start] = rnd.choice(SNIPPETS)
        elif kind < 0.75:  # bit flips
            for _ in range(rnd.randint(1, 4)):
                data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
        elif kind < 0.85:  # a header claiming a huge length, spliced in
            where = rnd.randrange(len(data))
            data[where:where] = rnd.choice(HUGE_HEADERS)
        elif kind < 0.95:  # random bytes with a format's first byte
            data = bytearray(
                rnd.choice([b"\x80\x04", b"\x81", b"{", b"(", b"}", b"\xde"]) + rnd.randbytes(40)
            )
        else:  # random bytes in place of the whole frame
            return rnd.randbytes(rnd.randint(0, 64))
        return raw_frame(name, bytes(data))


def peak_rss(pid: int) -> int:
    """VmHWM (peak resident set) of process `pid`, in bytes."""
    match = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    assert match
    return int(match[1]) * 1024


def test_a_hundred_thousand_mutated_frames_leave_the_daemon_running_and_the_next_scan_intact(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """>= 100,000 mutated frames through the real proxy: every one reaches the daemon (counted), the
    daemon keeps its pid and health, its peak RSS stays < 1 GiB, and the scan after is in Tiled."""
    with make_sidecar(tmp_path, proxy, tiled_container, spool={"quarantine_max_bytes": 4 * 2**20}) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        pid = sidecar.process.pid
        assert pid is not None
        devices = hw()
        acquisition.run(bp.count([det], 3))
        acquisition.run(bp.scan([det], motor, -1, 1, 3))
        acquisition.run(bp.count([devices.direct_img, det], 2))
        campaign = Campaign(acquisition.documents, SEED)
        assert acquisition.publisher is not None
        send = acquisition.publisher.send_raw
        start = sidecar.messages_seen()
        sent = 0
        while sent < FRAMES:
            for _ in range(BATCH):
                send(campaign.frame())
            sent += BATCH

            def caught_up(target: int = start + sent - IN_FLIGHT) -> bool:
                assert sidecar.process.running and sidecar.process.pid == pid, sidecar.log_tail()
                return sidecar.messages_seen() >= target

            wait_until(caught_up, 60, interval=0.01, what=f"the daemon to read {sent} frames")
        wait_until(lambda: sidecar.messages_seen() >= start + sent, 60, what="the last frames")
        arrived = sidecar.messages_seen() - start
        assert arrived >= FRAMES

        (uid,) = acquisition.run(bp.scan([det], motor, -1, 1, 9))
        sidecar.wait_drained([uid], 180)
        rows = expected_rows(acquisition.documents, "primary", run_uid=uid)
        assert len(rows) == 9
        assert frame_rows(read_stream(tiled_container.client(), uid, "primary")) == rows
        status = {run["uid"]: run for run in sidecar.status()["runs"]}
        assert status[uid]["state"] == "uploaded" and status[uid]["gaps"] == {}

        assert sidecar.process.running and sidecar.process.pid == pid
        assert sidecar.health()["status"] == "ok"
        rss = peak_rss(pid)
        print(f"fuzz campaign: {arrived} frames arrived, receiver VmHWM {rss / 2**20:.0f} MiB")
        assert rss < RSS_LIMIT
        assert "Traceback" not in sidecar.log_tail(100_000)
