"""Segment files: one append-only log of records per run.

A run's log is a sequence of files ``0000000000.seg``, ``0000000001.seg``, …
(fixed-width names, so a directory listing sorts them). Only the receiver
writes (`LogWriter`); it appends each record with one unbuffered ``write``,
so readers in other processes see whole records as soon as they are written,
and it rolls to a new segment at ``segment_bytes``. Durability follows the
fsync policy: ``always`` (fsync after every record), ``batch`` (group commit:
at most ``fsync_records`` records or ``fsync_interval_ms`` between fsyncs —
that is the window a power loss can take) or ``never`` (the OS decides).

`LogWriter.append_many` writes a batch of records with one ``write`` per
segment and per fsync window (the receiver hands it what one wake of its
loop received): whole records still reach readers at once, and the fsync
policy is kept record for record (a roll, ``fsync_records`` and ``always``
cut the batch where single appends would have fsynced or rolled).

On open, the writer truncates a torn tail (a record cut short by a crash).
A failed write (disk full) is rolled back with ``ftruncate`` so the log never
holds half a record; a failed batch is retried record by record, so exactly
the records that do not fit are lost, as with single appends. `LogReader` follows a log from a position and reports
corruption with its segment and offset; a torn tail of the *last* segment is
a record still being written and is simply not returned yet.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import record
from .record import HEADER_SIZE

SUFFIX = ".seg"
READ_CHUNK = 4 * 2**20


def segment_name(index: int) -> str:
    return f"{index:010d}{SUFFIX}"


def list_segments(directory: Path) -> list[Path]:
    """The segment files of a log, in order."""
    return sorted(p for p in directory.glob(f"*{SUFFIX}") if p.stem.isdigit())


def log_bytes(directory: Path) -> int:
    total = 0
    for path in list_segments(directory):
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total


@dataclass
class Appended:
    """What `LogWriter.append_many` could not do: ``(index, error)`` per record lost, a failed fsync."""

    failed: list[tuple[int, OSError]] = field(default_factory=list)
    sync_error: OSError | None = None


@dataclass(frozen=True)
class FsyncPolicy:
    mode: str = "batch"
    interval_s: float = 0.2
    records: int = 10_000


def truncate_torn_tail(path: Path) -> int:
    """Cut a record left half-written by a crash off the end of `path`.

    Returns the number of bytes removed. Corruption in the middle is left in
    place for readers to report.
    """
    data = path.read_bytes()
    end = 0
    for item in record.scan(data):
        end = item.end
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
        return len(data) - end
    return 0


class LogWriter:
    """Appends records to a run's log; see the module docstring."""

    def __init__(self, directory: Path, segment_bytes: int, fsync: FsyncPolicy) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.policy = fsync
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        segments = list_segments(directory)
        self.truncated_bytes = truncate_torn_tail(segments[-1]) if segments else 0
        self._index = int(segments[-1].stem) if segments else 0
        self._fd = self._open(self._index)
        self._size = os.fstat(self._fd).st_size
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def _open(self, index: int) -> int:
        path = self.directory / segment_name(index)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        if index > 0 or self.policy.mode != "never":
            _fsync_dir(self.directory)
        return fd

    def append(self, payload: bytes) -> int:
        """Append one record; return its size on disk. Raises OSError (e.g. ENOSPC)."""
        result = self.append_many([payload])
        if result.failed:
            raise result.failed[0][1]
        if result.sync_error is not None:
            raise result.sync_error
        return HEADER_SIZE + len(payload)

    def append_many(self, payloads: list[bytes]) -> Appended:
        """Append records in order; report those that could not be written, and a failed fsync.

        Records are grouped into one ``write`` up to a segment roll or an
        fsync the policy requires, so the log on disk (segments, fsyncs) is
        the one single appends would have left. A failed fsync does not
        stop the batch (the records are written; the OS may still flush them).
        """
        result = Appended()
        start = 0
        while start < len(payloads):
            if self._size >= self.segment_bytes:
                try:
                    self._roll()
                except OSError as err:
                    result.failed.append((start, err))
                    start += 1
                    continue
            end, frames = self._group(payloads, start)
            result.failed += self._write_group(frames, start)
            start = end
            if self.policy.mode == "always" or (
                self.policy.mode == "batch" and self._unsynced >= self.policy.records
            ):
                try:
                    self.sync()
                except OSError as err:
                    result.sync_error = err
        return result

    def _group(self, payloads: list[bytes], start: int) -> tuple[int, list[bytes]]:
        """Frames of ``payloads[start:end]``: up to the segment's end or the next due fsync."""
        room = self.segment_bytes - self._size
        records = 1 if self.policy.mode == "always" else self.policy.records - self._unsynced
        if self.policy.mode == "never":
            records = len(payloads)
        frames: list[bytes] = []
        size = 0
        encode = record.encode
        end = start
        for payload in payloads[start : start + max(1, records)]:
            frame = encode(payload)
            frames.append(frame)
            size += len(frame)
            end += 1
            if size >= room:
                break
        return end, frames

    def _write_group(self, frames: list[bytes], first: int) -> list[tuple[int, OSError]]:
        """Write `frames` with one write, or record by record if that fails; return the failures."""
        failures: list[tuple[int, OSError]] = []
        try:
            self._write(b"".join(frames) if len(frames) > 1 else frames[0])
            written = len(frames)
        except OSError as err:
            if len(frames) == 1:
                return [(first, err)]
            written = 0
            for i, frame in enumerate(frames):
                try:
                    self._write(frame)
                    written += 1
                except OSError as one:
                    failures.append((first + i, one))
        self._unsynced += written
        return failures

    def _write(self, data: bytes) -> None:
        """One unbuffered write of whole records, or none of it (ftruncate) and OSError."""
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(28, "short write")
        except OSError:
            os.ftruncate(self._fd, self._size)
            raise
        self._size += len(data)

    def maybe_sync(self) -> None:
        """Group commit: fsync if the batch window has passed (call periodically)."""
        if (
            self.policy.mode == "batch"
            and self._unsynced
            and time.monotonic() - self._last_sync >= self.policy.interval_s
        ):
            self.sync()

    def sync(self) -> None:
        if self._unsynced:
            os.fsync(self._fd)
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def _roll(self) -> None:
        self.sync()
        os.close(self._fd)
        self._index += 1
        self._fd = self._open(self._index)
        self._size = 0

    def close(self) -> None:
        if self._fd >= 0:
            if self.policy.mode != "never":
                self.sync()
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True)
class Position:
    segment: int = 0
    offset: int = 0


@dataclass(frozen=True)
class Damage:
    """A corrupt byte range found while reading."""

    segment: str
    offset: int
    length: int

    def __str__(self) -> str:
        return f"{self.length} corrupt bytes in {self.segment} at offset {self.offset}"


class LogReader:
    """Follows a run's log from a position, yielding payloads in order."""

    def __init__(self, directory: Path, position: Position = Position()) -> None:
        self.directory = directory
        self.position = position
        self.damage: list[Damage] = []

    def read(self, max_records: int | None = None) -> Iterator[bytes]:
        """Yield the payloads of complete records written since the last call.

        Corrupt ranges are skipped and appended to `self.damage`. A torn tail
        in a segment that has a successor is damage too (the writer moved on).
        """
        count = 0
        chunk = READ_CHUNK
        while True:
            path = self.directory / segment_name(self.position.segment)
            # Checked before reading: if a successor exists now, this segment is complete.
            has_next = (self.directory / segment_name(self.position.segment + 1)).exists()
            start = self.position.offset
            try:
                with path.open("rb") as f:
                    f.seek(start)
                    data = f.read(chunk)
            except FileNotFoundError:
                if not has_next:
                    return
                self.position = Position(self.position.segment + 1, 0)
                continue
            for item in record.scan(data, base=start):
                if isinstance(item, record.Corruption):
                    self.damage.append(Damage(path.name, item.offset, item.length))
                else:
                    yield item.payload
                    count += 1
                self.position = Position(self.position.segment, item.end)
                if max_records is not None and count >= max_records:
                    return
            if len(data) == chunk:
                # The chunk was full: more of this segment follows. If not even
                # one record fitted, it is a large one: read a bigger chunk.
                chunk = READ_CHUNK if self.position.offset > start else chunk * 2
                continue
            if not has_next:
                return
            if self.position.offset < start + len(data):
                tail = start + len(data) - self.position.offset
                self.damage.append(Damage(path.name, self.position.offset, tail))
            self.position = Position(self.position.segment + 1, 0)
            chunk = READ_CHUNK

    def unread_tail(self) -> Damage | None:
        """Bytes left after the last complete record: damage, once the log is closed."""
        path = self.directory / segment_name(self.position.segment)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        if size <= self.position.offset:
            return None
        return Damage(path.name, self.position.offset, size - self.position.offset)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
