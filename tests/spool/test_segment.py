"""Segment logs: rolling, following a live log, torn tails and corruption by segment and offset."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from tiled_writer_sidecar.spool import record, segment
from tiled_writer_sidecar.spool.segment import (
    FsyncPolicy,
    LogReader,
    LogWriter,
    list_segments,
)


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


def test_has_unread_says_whether_the_writer_appended_since_the_last_read(tmp_path: Path) -> None:
    """A reader that reached the end knows, from a stat and no read, whether records followed: in the
    same segment, or in the next one the writer rolled to."""
    writer = LogWriter(tmp_path, 1024, FsyncPolicy("never"))
    reader = LogReader(tmp_path)
    assert reader.has_unread()  # nothing read yet
    writer.append(PAYLOADS[0])
    assert list(reader.read()) == PAYLOADS[:1]
    assert not reader.has_unread()
    writer.append(PAYLOADS[1])
    assert reader.has_unread()
    assert list(reader.read()) == PAYLOADS[1:2] and not reader.has_unread()
    segments = len(list_segments(tmp_path))
    for p in PAYLOADS[2:]:
        writer.append(p)
        if len(list_segments(tmp_path)) > segments:
            break
    assert reader.has_unread()
    read = list(reader.read())
    assert read and not reader.has_unread()
    writer.close()


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


def _hiding(size: int) -> bytes:
    """A payload of about `size` bytes that embeds encoded records (v2 default salt, v1) throughout."""
    hidden = record.encode(b"injected ../../evil start") + record.encode_v1(
        b"injected unknown-descriptor event"
    )
    return (b"x" * 7 + hidden) * (size // (len(hidden) + 7))


@pytest.mark.parametrize("chunk", [4096, segment.READ_CHUNK])
def test_records_that_cross_read_chunks_are_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """Records larger than, and straddling, the read chunk come back whole; what their payloads
    embed never surfaces as a record, from the start or when following the log."""
    monkeypatch.setattr(record, "READ_CHUNK", chunk)
    payloads = [b"a", _hiding(chunk * 3 // 2), b"b" * (chunk // 2), _hiding(chunk + 17), b"c"]
    writer = LogWriter(tmp_path, 64 * 2**20, FsyncPolicy("never"))
    follower = LogReader(tmp_path)
    followed: list[bytes] = []
    for p in payloads:
        writer.append(p)
        followed += follower.read()
    writer.close()
    reader = LogReader(tmp_path)
    assert list(reader.read()) == payloads == followed
    assert reader.damage == [] and follower.damage == []


def test_a_payload_full_of_fake_headers_reads_in_linear_time(tmp_path: Path) -> None:
    """A 16 MiB payload made of (v2 and v1) record headers reads back as one record in well under
    a second: it is skipped by its length, never searched."""
    fake = record.encode(b"") + record.encode_v1(b"")
    big = fake * (16 * 2**20 // len(fake))
    _write(tmp_path, [b"before", big, b"after"], segment_bytes=64 * 2**20)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        got = list(LogReader(tmp_path).read())
        best = min(best, time.perf_counter() - start)
    assert got == [b"before", big, b"after"]
    assert best < 1.0, f"{best:.2f} s"


def test_reader_reports_a_symlinked_segment_and_never_reads_it(tmp_path: Path) -> None:
    """A segment that is a symlink (to a log of records) is damage: its records are not returned."""
    _write(tmp_path / "other", [b"planted record"], segment_bytes=1 << 20)
    run = tmp_path / "run"
    writer = LogWriter(run, 1 << 20, FsyncPolicy("never"))
    writer.append(b"mine")
    writer.close()
    (run / segment.segment_name(1)).symlink_to(list_segments(tmp_path / "other")[0])
    writer = LogWriter(run, 1 << 20, FsyncPolicy("never"))  # rolls past the link
    writer.append(b"mine too")
    writer.close()
    reader = LogReader(run)
    assert list(reader.read()) == [b"mine", b"mine too"]
    assert [d.segment for d in reader.damage] == [segment.segment_name(1)]


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_writer_never_writes_through_a_link(tmp_path: Path, link: str) -> None:
    """A last segment that is a symlink or has another link (with a torn tail) is neither
    truncated nor appended to: the writer starts a new segment and the target is unchanged."""
    target = tmp_path / "target"
    target.write_bytes(b"precious bytes that look like nothing")
    run = tmp_path / "run"
    run.mkdir()
    name = run / segment.segment_name(0)
    if link == "symlink":
        name.symlink_to(target)
    else:
        os.link(target, name)
    writer = LogWriter(run, 1 << 20, FsyncPolicy("always"))
    writer.append(b"new record")
    writer.close()
    assert target.read_bytes() == b"precious bytes that look like nothing"
    assert [p.name for p in list_segments(run)] == [segment.segment_name(0), segment.segment_name(1)]
    with pytest.raises(segment.NotRegularFile):
        segment.truncate_torn_tail(name)
    assert target.read_bytes() == b"precious bytes that look like nothing"


def test_writer_refuses_a_symlinked_run_directory(tmp_path: Path) -> None:
    """A run directory that is a symlink is never written into."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        LogWriter(tmp_path / "run", 1 << 20, FsyncPolicy("never"))
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_failed_roll_is_retried_and_loses_only_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the new segment's file header cannot be written (disk full), that record is reported
    lost; the next append rolls again and the log reads back without damage."""
    writer = LogWriter(tmp_path, 4096, FsyncPolicy("never"))
    writer.append(b"x" * 5000)
    real_write = os.write
    monkeypatch.setattr(
        segment.os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
    )
    with pytest.raises(OSError):
        writer.append(b"lost")
    monkeypatch.setattr(segment.os, "write", real_write)
    writer.append(b"kept")
    writer.close()
    reader = LogReader(tmp_path)
    assert list(reader.read()) == [b"x" * 5000, b"kept"]
    assert reader.damage == [] and reader.unread_tail() is None


def test_a_damaged_last_record_is_kept_and_reported_never_cut(tmp_path: Path) -> None:
    """A whole last record whose header was damaged (a follower may have read it) is not taken for
    a torn write: reopening keeps it, new records follow it, and readers report it as damage."""
    _write(tmp_path, [b"one", b"two", b"three"], segment_bytes=1 << 20)
    path = list_segments(tmp_path)[-1]
    data = bytearray(path.read_bytes())
    last = len(data) - record.HEADER_SIZE - len(b"three")
    data[last + 5] ^= 0x10
    path.write_bytes(bytes(data))
    writer = LogWriter(tmp_path, 1 << 20, FsyncPolicy("always"))
    assert writer.truncated_bytes == 0
    writer.append(b"four")
    writer.close()
    reader = LogReader(tmp_path)
    assert list(reader.read()) == [b"one", b"two", b"four"]
    assert [(d.offset, d.length) for d in reader.damage] == [(last, record.HEADER_SIZE + len(b"three"))]
