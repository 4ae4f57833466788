"""The spool log against a simple model, under random sequences of actions (hypothesis stateful).

Actions: append (one or a batch; payload sizes from empty to several read
chunks, payloads that embed encoded records or are full of fake headers),
roll, crash leaving a torn tail, bit flips (record header, payload, one copy
of a segment's file header), disk full (all writes, or some records of a
batch), reopen (a new LogWriter), and reads (from the start, and a follower
reading incrementally). The model is the list of records appended, where
each landed, and whether a flip damaged it. After every read: the reader
returns exactly the intact records, in order; a damaged record is never
returned (nor anything found inside it); reported damage never covers an
intact record; a damaged record is reported, unless it is the damaged-header
tail of the last segment (then `unread_tail` covers it); reopening cuts only
what a crash left, never a written record.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from tests.support.strength import examples
from tiled_writer_sidecar.spool import record, segment
from tiled_writer_sidecar.spool.record import FILE_HEADER_SIZE, HEADER_SIZE
from tiled_writer_sidecar.spool.segment import (
    Damage,
    FsyncPolicy,
    LogReader,
    LogWriter,
)

SEGMENT_BYTES = 2048
READ_CHUNK = 1024  # small, so records cross read chunks all the time
FULL = b"DISK-FULL-FOR-THIS-ONE"


def _embedding(size: int) -> bytes:
    hidden = (
        record.encode(b"injected ../../evil") + record.encode(b"x", b"12345678") + record.encode_v1(b"v1")
    )
    return (hidden * (size // len(hidden) + 1))[:size]


def _fake_headers(size: int) -> bytes:
    fake = record.HEADER.pack(record.MAGIC, 4, 0, 0) + record.MAGIC1
    return (fake * (size // len(fake) + 1))[:size]


payloads = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=100, max_size=1500),
    st.integers(0, 3 * READ_CHUNK).map(_embedding),
    st.integers(0, 5 * READ_CHUNK).map(_fake_headers),
)


@dataclass
class Rec:
    payload: bytes
    segment: int
    offset: int
    state: str = "ok"  # ok | header (damaged) | payload (damaged)

    @property
    def end(self) -> int:
        return self.offset + HEADER_SIZE + len(self.payload)


class SpoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spool-sm-"))
        self._chunk = record.READ_CHUNK
        record.READ_CHUNK = READ_CHUNK  # type: ignore[misc]
        self.writer: LogWriter | None = LogWriter(self.dir, SEGMENT_BYTES, FsyncPolicy("never"))
        self.records: list[Rec] = []
        self.flipped_file_headers: set[int] = set()
        self.follower = LogReader(self.dir)
        self.followed = -1  # index in self.records of the last record the follower returned
        self._sync_position()

    def teardown(self) -> None:
        record.READ_CHUNK = self._chunk  # type: ignore[misc]
        if self.writer is not None:
            self.writer.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ----------------------------------------------------------- helpers
    def _sync_position(self) -> None:
        assert self.writer is not None
        self.index, self.size, self.closed_fd = self.writer._index, self.writer._size, self.writer._fd < 0

    def _place(self, payload: bytes, written: bool) -> None:
        """Where the writer puts a record (a roll first if the segment is full), as the model sees it."""
        if self.closed_fd or self.size >= SEGMENT_BYTES:
            self.index += 0 if self.closed_fd else 1
            self.size, self.closed_fd = FILE_HEADER_SIZE, False
        if written:
            self.records.append(Rec(payload, self.index, self.size))
            self.size += HEADER_SIZE + len(payload)

    def _ensure_writer(self) -> LogWriter:
        if self.writer is None:
            self.reopen()
        assert self.writer is not None
        return self.writer

    def _path(self, index: int) -> Path:
        return self.dir / segment.segment_name(index)

    def _flip(self, path: Path, offset: int, bit: int) -> None:
        with path.open("r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ (1 << bit)]))

    # ------------------------------------------------------------- rules
    @rule(payload=payloads)
    def append(self, payload: bytes) -> None:
        writer = self._ensure_writer()
        writer.append(payload)
        self._place(payload, written=True)
        assert (writer._index, writer._size) == (self.index, self.size)

    @rule(batch=st.lists(st.tuples(payloads, st.booleans()), max_size=8))
    def append_many_with_some_refused(self, batch: list[tuple[bytes, bool]]) -> None:
        """Records marked to fail meet a full disk; exactly those are reported lost."""
        writer = self._ensure_writer()
        items = [FULL + p if refuse else p for p, refuse in batch]
        real_write = os.write

        def write(fd: int, data: Any) -> int:
            if FULL in bytes(data):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        segment.os.write = write  # type: ignore[assignment]
        try:
            result = writer.append_many(items)
        finally:
            segment.os.write = real_write
        assert [i for i, _ in result.failed] == [i for i, (_, refuse) in enumerate(batch) if refuse]
        for payload, (_, refuse) in zip(items, batch, strict=True):
            self._place(payload, written=not refuse)
        assert (writer._index, writer._size) == (self.index, self.size)

    @rule(payload=payloads)
    def disk_full(self, payload: bytes) -> None:
        """Every write fails: the append raises, nothing is added, the log is unchanged."""
        writer = self._ensure_writer()
        real_write = os.write

        def write(fd: int, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        segment.os.write = write  # type: ignore[assignment]
        try:
            try:
                writer.append(payload)
            except OSError as err:
                assert err.errno == errno.ENOSPC
            else:
                raise AssertionError("append on a full disk did not fail")
        finally:
            segment.os.write = real_write
        self._sync_position()

    @rule()
    def roll(self) -> None:
        writer = self._ensure_writer()
        writer._roll()
        self._sync_position()

    @rule(cut=st.floats(0, 1, exclude_max=True), payload=payloads)
    def crash_with_torn_tail(self, cut: float, payload: bytes) -> None:
        """The receiver dies in the middle of writing a record: part of it is on disk."""
        writer = self._ensure_writer()
        if writer._fd >= 0:
            frame = record.frame(payload, writer._seed)
            os.write(writer._fd, frame[: max(1, int(len(frame) * cut))])
            os.close(writer._fd)
            writer._fd = -1
        self.writer = None

    @rule()
    def reopen(self) -> None:
        """A new writer (after a crash, or a clean close): cuts the tail of the last segment."""
        if self.writer is not None:
            self.writer.close()
        self.writer = LogWriter(self.dir, SEGMENT_BYTES, FsyncPolicy("never"))
        last = segment.list_segments(self.dir)
        if last:
            index, size = int(last[-1].stem), last[-1].stat().st_size
            for rec in self.records:
                assert rec.segment != index or rec.end <= size, f"reopen cut a written record: {rec}"
        self._sync_position()

    @precondition(lambda self: any(r.state == "ok" for r in self.records))
    @rule(data=st.data(), in_header=st.booleans())
    def bit_flip(self, data: st.DataObject, in_header: bool) -> None:
        intact = [r for r in self.records if r.state == "ok"]
        rec = data.draw(st.sampled_from(intact))
        if in_header or not rec.payload:
            where, length, rec.state = rec.offset, HEADER_SIZE, "header"
        else:
            where, length, rec.state = rec.offset + HEADER_SIZE, len(rec.payload), "payload"
        bit = data.draw(st.integers(0, length * 8 - 1))
        self._flip(self._path(rec.segment), where + bit // 8, bit % 8)

    @rule(data=st.data())
    def flip_one_file_header_copy(self, data: st.DataObject) -> None:
        """One copy of a segment's file header damaged: the other one still reads the segment."""
        candidates = [
            int(p.stem)
            for p in segment.list_segments(self.dir)
            if int(p.stem) not in self.flipped_file_headers and p.stat().st_size >= FILE_HEADER_SIZE
        ]
        if not candidates:
            return
        index = data.draw(st.sampled_from(candidates))
        bit = data.draw(st.integers(0, FILE_HEADER_SIZE * 8 - 1))
        self._flip(self._path(index), bit // 8, bit % 8)
        self.flipped_file_headers.add(index)

    @rule()
    def read_from_start(self) -> None:
        reader = LogReader(self.dir)
        got = list(reader.read())
        assert got == [r.payload for r in self.records if r.state == "ok"]
        self._check_damage(reader.damage + ([t] if (t := reader.unread_tail()) else []))

    @rule(steps=st.integers(1, 20))
    def read_incrementally(self, steps: int) -> None:
        """The follower gets the next intact record each time, never one out of order or damaged."""
        for _ in range(steps):
            got = list(self.follower.read(max_records=1))
            if not got:
                later = [r for r in self.records[self.followed + 1 :] if r.state == "ok"]
                assert later == [], f"follower stopped before {later[0]}"
                return
            position = self.follower.position
            index = next(
                i
                for i, r in enumerate(self.records)
                if (r.segment, r.end) == (position.segment, position.offset)
            )
            skipped = self.records[self.followed + 1 : index]
            assert all(r.state != "ok" for r in skipped), "follower skipped an intact record"
            assert self.records[index].state == "ok" and got == [self.records[index].payload]
            self.followed = index

    def _check_damage(self, damage: list[Damage]) -> None:
        ranges = {(int(d.segment[:10]), d.offset, d.offset + d.length) for d in damage}
        for rec in self.records:
            covered = any(s == rec.segment and a <= rec.offset and rec.end <= b for s, a, b in ranges)
            overlaps = any(s == rec.segment and a < rec.end and rec.offset < b for s, a, b in ranges)
            if rec.state == "ok":
                assert not overlaps, f"damage reported over an intact record {rec}"
            elif rec.state == "payload":
                assert covered, f"damaged payload not reported: {rec}"
            elif rec.state == "header":
                assert covered or self._is_tail(rec), f"damaged header not reported: {rec}"

    def _is_tail(self, rec: Rec) -> bool:
        """A damaged header with no verified header after it in the last segment: a tail."""
        last = max(r.segment for r in self.records)
        later = [r for r in self.records if r.segment == rec.segment and r.offset > rec.offset]
        return rec.segment == last and all(r.state == "header" for r in later)


SpoolMachine.TestCase.settings = settings(
    max_examples=examples(60),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_spool_state_machine = SpoolMachine.TestCase
