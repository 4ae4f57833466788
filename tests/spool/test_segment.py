"""Segment logs: rolling, following a live log, torn tails and corruption by segment and offset."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tiled_writer_sidecar.spool import record, segment
from tiled_writer_sidecar.spool.segment import FsyncPolicy, LogReader, LogWriter, list_segments


def _write(directory: Path, payloads: list[bytes], segment_bytes: int = 4096, mode: str = "batch") -> None:
    writer = LogWriter(directory, segment_bytes, FsyncPolicy(mode))
    for p in payloads:
        writer.append(p)
    writer.close()


PAYLOADS = [f"document {i} ".encode() * (i % 7 + 1) for i in range(500)]


def test_rolls_segments_with_fixed_width_names_and_reads_back_in_order(tmp_path: Path) -> None:
    """Many segments are written; their names sort; the reader returns every payload in order."""
    _write(tmp_path, PAYLOADS)
    names = [p.name for p in list_segments(tmp_path)]
    assert len(names) > 5
    assert names == sorted(names) and all(len(n) == len("0000000000.seg") for n in names)
    assert list(LogReader(tmp_path).read()) == PAYLOADS


def test_reader_follows_a_live_log(tmp_path: Path) -> None:
    """A reader sees records as they are appended, across segment rolls, without repeats."""
    writer = LogWriter(tmp_path, 1024, FsyncPolicy("never"))
    reader = LogReader(tmp_path)
    seen: list[bytes] = []
    for chunk in range(0, len(PAYLOADS), 37):
        for p in PAYLOADS[chunk : chunk + 37]:
            writer.append(p)
        seen += list(reader.read())
    writer.close()
    assert seen == PAYLOADS


def test_reader_does_not_return_a_record_being_written(tmp_path: Path) -> None:
    """Half a record at the end of the last segment is not returned until it is whole."""
    _write(tmp_path, PAYLOADS[:3], segment_bytes=1 << 20)
    segment = list_segments(tmp_path)[-1]
    whole = segment.read_bytes()
    segment.write_bytes(whole[:-4])
    reader = LogReader(tmp_path)
    assert list(reader.read()) == PAYLOADS[:2]
    segment.write_bytes(whole)
    assert list(reader.read()) == PAYLOADS[2:3]
    assert reader.damage == []


def test_writer_truncates_a_torn_tail_on_open(tmp_path: Path) -> None:
    """Reopening after a crash cuts the half-written record and appends after the good ones."""
    _write(tmp_path, PAYLOADS[:10], segment_bytes=1 << 20)
    segment = list_segments(tmp_path)[-1]
    segment.write_bytes(segment.read_bytes()[:-5])
    writer = LogWriter(tmp_path, 1 << 20, FsyncPolicy("always"))
    assert writer.truncated_bytes > 0
    writer.append(b"after restart")
    writer.close()
    assert list(LogReader(tmp_path).read()) == [*PAYLOADS[:9], b"after restart"]


def test_corruption_is_reported_with_segment_and_offset(tmp_path: Path) -> None:
    """A flipped byte in an early segment is reported by name and offset; later records survive."""
    _write(tmp_path, PAYLOADS)
    first = list_segments(tmp_path)[0]
    data = bytearray(first.read_bytes())
    data[100] ^= 0xFF
    first.write_bytes(bytes(data))
    reader = LogReader(tmp_path)
    got = list(reader.read())
    assert len(reader.damage) == 1
    assert reader.damage[0].segment == first.name
    assert reader.damage[0].offset <= 100 < reader.damage[0].offset + reader.damage[0].length
    assert len(got) == len(PAYLOADS) - 1
    assert set(got) <= set(PAYLOADS)


def test_torn_tail_of_a_closed_segment_is_damage(tmp_path: Path) -> None:
    """A segment cut short that has a successor is reported, and the next segment is still read."""
    _write(tmp_path, PAYLOADS)
    first = list_segments(tmp_path)[0]
    first.write_bytes(first.read_bytes()[:-3])
    reader = LogReader(tmp_path)
    got = list(reader.read())
    assert len(reader.damage) == 1 and reader.damage[0].segment == first.name
    assert len(got) == len(PAYLOADS) - 1


def test_unread_tail_reports_leftover_bytes(tmp_path: Path) -> None:
    """Once the writer is gone, bytes after the last whole record are reported as damage."""
    _write(tmp_path, PAYLOADS[:5], segment_bytes=1 << 20)
    segment = list_segments(tmp_path)[-1]
    segment.write_bytes(segment.read_bytes()[:-1])
    reader = LogReader(tmp_path)
    assert len(list(reader.read())) == 4
    tail = reader.unread_tail()
    assert tail is not None and tail.length == len(segment.read_bytes()) - reader.position.offset


def test_large_record_bigger_than_read_chunk(tmp_path: Path) -> None:
    """A record larger than the reader's chunk is still read whole."""
    big = bytes(range(256)) * (5 * 2**20 // 256)
    _write(tmp_path, [b"a", big, b"b"], segment_bytes=64 * 2**20)
    assert list(LogReader(tmp_path).read()) == [b"a", big, b"b"]


def _records_of(path: Path) -> list[bytes]:
    """The payloads of one segment file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fmt = segment.detect_format(fd)
        items = segment.scan_segment(fd, fmt, 0, os.fstat(fd).st_size)
        return [item.payload for item in items if not isinstance(item, record.Corruption)]
    finally:
        os.close(fd)


def _fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(segment.os, "fsync", counting)
    return calls


@pytest.mark.parametrize(("mode", "records"), [("batch", 7), ("batch", 10_000), ("always", 1), ("never", 1)])
def test_append_many_leaves_the_log_single_appends_leave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, records: int
) -> None:
    """Batches (of any size) roll segments and fsync exactly where record-by-record appends do."""
    policy = FsyncPolicy(mode, records=records)
    fsyncs = _fsyncs(monkeypatch)
    single = LogWriter(tmp_path / "single", 4096, policy)
    for p in PAYLOADS:
        single.append(p)
    single_fsyncs = len(fsyncs)
    single.close()
    fsyncs.clear()
    batched = LogWriter(tmp_path / "batched", 4096, policy)
    start = 0
    for size in (1, 61, 3, 200, 2, 61, 1000):
        assert batched.append_many(PAYLOADS[start : start + size]).failed == []
        start += size
    assert len(fsyncs) == single_fsyncs
    batched.close()
    # Each segment has its own random salt: compare names, sizes and the records in each.
    single_files = [(p.name, p.stat().st_size, _records_of(p)) for p in list_segments(tmp_path / "single")]
    batched_files = [(p.name, p.stat().st_size, _records_of(p)) for p in list_segments(tmp_path / "batched")]
    assert batched_files == single_files
    assert list(LogReader(tmp_path / "batched").read()) == PAYLOADS


def test_append_many_loses_only_the_records_that_do_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed batch write is rolled back and retried record by record: exactly the refused ones are reported."""
    real_write = os.write

    def full_for_big(fd: int, data: bytes) -> int:
        if b"BIG" in data:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(segment.os, "write", full_for_big)
    writer = LogWriter(tmp_path, 1 << 20, FsyncPolicy("batch"))
    payloads = [b"one", b"BIG two", b"three", b"BIG four", b"five"]
    result = writer.append_many(payloads)
    assert [(index, err.errno) for index, err in result.failed] == [(1, errno.ENOSPC), (3, errno.ENOSPC)]
    writer.close()
    assert list(LogReader(tmp_path).read()) == [b"one", b"three", b"five"]
