"""Segment files: one append-only log of records per run.

A run's log is ``0000000000.seg``, ``0000000001.seg``, … (fixed-width names,
so a listing sorts them), each starting with the v2 file header (record.py).
Only the receiver writes (`LogWriter`): a record, or a batch
(`append_many`), reaches the file with one unbuffered ``write`` per segment
and fsync window, so readers in other processes see whole records at once.
It rolls at ``segment_bytes`` and fsyncs per policy, record for record even
within a batch: ``always``, ``batch`` (at most ``fsync_records`` records or
``fsync_interval_ms`` between fsyncs) or ``never``.

Invariants: the log never holds half a record (a failed write, e.g. disk
full, is rolled back with ``ftruncate``; a failed batch is retried record by
record, so exactly the records that do not fit are lost). On open the
writer truncates a torn tail but keeps a damaged last record
(`tail_is_torn`), and rolls past a segment it cannot append to safely (v1,
a damaged file header, a symlink, not a regular file, more than one link).
`LogReader` follows a log from a position and reports corruption with its
segment and offset; no read is sized beyond `LIMITS` (the configured segment
and record sizes), whatever a file's size or headers say; a torn tail of the *last* segment is a record still
being written and is not returned yet. Every file, and the run directory,
is opened relative to the directory's descriptor with ``O_NOFOLLOW``: a
symlink is never followed or written through; readers report it as damage.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tiled_writer_sidecar.spool import record
from tiled_writer_sidecar.spool.record import FILE_HEADER_SIZE, HEADER_SIZE

SUFFIX = ".seg"
READ_CHUNK = record.READ_CHUNK
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def segment_name(index: int) -> str:
    return f"{index:010d}{SUFFIX}"


def list_segments(directory: Path) -> list[Path]:
    """The segment files of a log, in order."""
    return sorted(p for p in directory.glob(f"*{SUFFIX}") if p.stem.isdigit())


def log_bytes(directory: Path) -> int:
    total = 0
    for path in list_segments(directory):
        try:
            total += path.lstat().st_size
        except FileNotFoundError:
            pass
    return total


class NotRegularFile(OSError):
    """A segment that is a symlink, not a regular file, or (for writing) has other links."""


def open_in(directory: Path, name: str, flags: int, *, write: bool = False) -> int:
    """Open `name` in `directory` without following a symlink (neither the file nor the directory).

    Raises `NotRegularFile` for anything but a regular file (with one link, for
    writing) and FileNotFoundError if it does not exist.
    """
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotRegularFile(errno.ELOOP, "a symlink or not a directory", str(directory)) from None
        raise
    try:
        fd = os.open(name, flags | _NOFOLLOW, 0o600, dir_fd=dir_fd)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENXIO, errno.ENOTDIR):
            raise NotRegularFile(errno.ELOOP, "a symlink or not a regular file", name) from None
        raise
    finally:
        os.close(dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (write and st.st_nlink != 1):
        os.close(fd)
        raise NotRegularFile(errno.ELOOP, "not a regular file with one link", name)
    return fd


@dataclass
class ReadLimits:
    """The largest record and v1 segment a reader reads: what the writer can have written.

    The daemon and the uploader set them from the config (`bound_reads`); the
    defaults fit the default config. A record header claiming more does not
    verify; a larger v1 segment is reported as damage, never read.
    """

    record: int = 512 * 2**20  # wire.budget_for(max_message_bytes): what one document can encode to
    segment: int = 64 * 2**20 + 512 * 2**20  # segment_bytes, plus the record that crossed it


LIMITS = ReadLimits()


def bound_reads(segment_bytes: int, record_bytes: int) -> None:
    """Set `LIMITS` for this process (call once at start-up, from the config)."""
    LIMITS.record = min(record_bytes, record.MAX_PAYLOAD)
    LIMITS.segment = segment_bytes + LIMITS.record + FILE_HEADER_SIZE


@dataclass(frozen=True)
class SegmentFormat:
    """What the start of a segment says: ``v2`` (with its header seed), ``v1``, ``empty`` or ``damaged``.

    ``empty`` is also a v2 file header cut short (nothing was written after it).
    `recovered`: v2 whose file header copies are both damaged, its seed
    recovered from a record (record.py); never appended to.
    """

    kind: str
    seed: int = 0
    recovered: bool = False

    @property
    def first_record(self) -> int:
        return FILE_HEADER_SIZE if self.kind == "v2" else 0


def detect_format(fd: int) -> SegmentFormat:
    head = os.pread(fd, FILE_HEADER_SIZE, 0)
    if not head:
        return SegmentFormat("empty")
    salt = record.read_file_header(head)
    if salt is not None:
        return SegmentFormat("v2", record.seed(salt))
    magic = record.SEGMENT_MAGIC
    if len(head) < FILE_HEADER_SIZE and (magic.startswith(head[: len(magic)])):
        return SegmentFormat("empty")
    if head.startswith(record.MAGIC1):
        return SegmentFormat("v1")
    found = record.recover_seed(os.pread(fd, READ_CHUNK, FILE_HEADER_SIZE))
    if found is not None:
        return SegmentFormat("v2", found[1], recovered=True)
    return SegmentFormat("damaged")


def scan_segment(
    fd: int, fmt: SegmentFormat, start: int, size: int
) -> Iterator[record.Record | record.RecordV1 | record.Corruption]:
    """Records and damage of an open segment from `start` (a record boundary) to `size`; stops at a tail."""
    if fmt.kind == "v2":
        yield from record.scan_v2(
            record.fd_reader(fd), max(start, FILE_HEADER_SIZE), size, fmt.seed, LIMITS.record
        )
    elif fmt.kind == "v1" and size > LIMITS.segment:  # more than the writer could have written
        yield record.Corruption(start, size - start)
    elif fmt.kind == "v1" and size > start:
        yield from record.scan_v1(os.pread(fd, size - start, start), base=start)


def scan_end(fd: int, fmt: SegmentFormat, size: int) -> int:
    """Where the last whole record (or damaged range) of a segment ends: what follows is a tail."""
    end = fmt.first_record
    for item in scan_segment(fd, fmt, end, size):
        end = item.end
    return end


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
    place for readers to report. Raises `NotRegularFile` for a symlink or a
    file with other links (nothing is written through one).
    """
    fd = open_in(path.parent, path.name, os.O_RDWR, write=True)
    try:
        return truncate_tail_fd(fd)
    finally:
        os.close(fd)


def truncate_tail_fd(fd: int) -> int:
    """`truncate_torn_tail` on an open segment."""
    size = os.fstat(fd).st_size
    fmt = detect_format(fd)
    if fmt.kind == "damaged":
        return 0
    end = scan_end(fd, fmt, size)
    if end < size and tail_is_torn(fd, fmt, end, size):
        os.ftruncate(fd, end)
        os.fsync(fd)
        return size - end
    return 0


def tail_is_torn(fd: int, fmt: SegmentFormat, end: int, size: int) -> bool:
    """Whether the bytes from `end` (after the last record or damaged range) are a write cut short.

    In v2 that is less than a header, a verified header whose payload runs
    past the end, or zeros (a file extended by a crash): safe to cut. Anything
    else is a record whose header was damaged after it was written (a reader
    may have read it already): it is kept and reported, never cut, so no
    offset is ever reused. v1 tails are cut as v1 did.
    """
    if fmt.kind != "v2" or size - end < HEADER_SIZE:
        return True
    if record.verify_header(os.pread(fd, HEADER_SIZE, end), fmt.seed):
        return True
    offset = end
    while offset < size:
        chunk = os.pread(fd, min(READ_CHUNK, size - offset), offset)
        if not chunk or chunk.count(0) != len(chunk):
            return False
        offset += len(chunk)
    return True


class LogWriter:
    """Appends records to a run's log; see the module docstring."""

    def __init__(self, directory: Path, segment_bytes: int, fsync: FsyncPolicy) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.policy = fsync
        if directory.is_symlink():
            raise NotRegularFile(errno.ELOOP, "run directory is a symlink", str(directory))
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        segments = list_segments(directory)
        self.truncated_bytes = 0
        self._fd = -1
        self._seed = 0
        self._size = 0
        self._index = int(segments[-1].stem) if segments else 0
        if not segments or not self._reopen_last(segments[-1].name):
            self._index += 1 if segments else 0
            self._open_new(self._index)
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def _reopen_last(self, name: str) -> bool:
        """Append to the last segment if it is ours and v2 (after cutting a torn tail); else False."""
        try:
            fd = open_in(self.directory, name, os.O_RDWR | os.O_APPEND, write=True)
        except NotRegularFile:
            return False
        try:
            fmt = detect_format(fd)
            if fmt.kind in ("v1", "empty"):  # v1 is never appended to: cut its tail, roll
                self.truncated_bytes = truncate_tail_fd(fd)
            if fmt.kind == "empty":
                os.ftruncate(fd, 0)
                self._fd, self._size = fd, 0
                self._write_file_header()
                return True
            if fmt.kind != "v2" or fmt.recovered:  # a damaged file header: a new segment instead
                os.close(fd)
                return False
            self.truncated_bytes = truncate_tail_fd(fd)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._seed, self._size = fd, fmt.seed, os.fstat(fd).st_size
        return True

    def _open_new(self, index: int) -> None:
        fd = open_in(self.directory, segment_name(index), os.O_RDWR | os.O_CREAT | os.O_APPEND, write=True)
        if os.fstat(fd).st_size:
            os.close(fd)
            raise FileExistsError(errno.EEXIST, "segment already exists", segment_name(index))
        self._fd, self._size = fd, 0
        try:
            self._write_file_header()
        except OSError:
            os.close(fd)
            self._fd = -1
            raise
        if index > 0 or self.policy.mode != "never":
            _fsync_dir(self.directory)

    def _write_file_header(self) -> None:
        salt = record.new_salt()
        self._write(record.file_header(salt))
        self._seed = record.seed(salt)

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
            if self._size >= self.segment_bytes or self._fd < 0:
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
        frame = record.frame
        header_seed = self._seed
        end = start
        for payload in payloads[start : start + max(1, records)]:
            framed = frame(payload, header_seed)
            frames.append(framed)
            size += len(framed)
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
                raise OSError(errno.ENOSPC, "short write")
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
        if self._unsynced and self._fd >= 0:
            os.fsync(self._fd)
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def _roll(self) -> None:
        """Close the current segment (if any) and start the next; on failure, the next call retries."""
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1
            self._index += 1
        self._open_new(self._index)

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
    """A corrupt byte range (or a segment that could not be read) found while reading."""

    segment: str
    offset: int
    length: int
    reason: str = ""

    def __str__(self) -> str:
        if self.reason:
            return f"{self.segment}: {self.reason}"
        return f"{self.length} corrupt bytes in {self.segment} at offset {self.offset}"


class LogReader:
    """Follows a run's log from a position, yielding payloads in order."""

    def __init__(self, directory: Path, position: Position = Position()) -> None:
        self.directory = directory
        self.position = position
        self.damage: list[Damage] = []
        self._seen: tuple[int, int] | None = None  # (segment, size) the last read ended at

    def read(self, max_records: int | None = None) -> Iterator[bytes]:
        """Yield the payloads of complete records written since the last call.

        Corrupt ranges are skipped and appended to `self.damage`. A torn tail
        in a segment that has a successor is damage too (the writer moved on).
        A segment that is a symlink (or not a regular file) is damage, never read.
        """
        count = 0
        while True:
            name = segment_name(self.position.segment)
            # Checked before reading: if a successor exists now, this segment is complete.
            has_next = os.path.lexists(self.directory / segment_name(self.position.segment + 1))
            try:
                fd = open_in(self.directory, name, os.O_RDONLY)
            except FileNotFoundError:
                if not has_next:
                    return
                self._next_segment()
                continue
            except NotRegularFile:
                self.damage.append(Damage(name, 0, 0, "a symlink or not a regular file: not read"))
                if not has_next:
                    self._next_segment()
                    return
                self._next_segment()
                continue
            try:
                size = os.fstat(fd).st_size
                fmt = detect_format(fd)
                if fmt.kind == "damaged":
                    if not has_next:
                        return
                    self.damage.append(Damage(name, 0, size, "file header damaged: segment unreadable"))
                    self._next_segment()
                    continue
                if self.position.offset < fmt.first_record:
                    self.position = Position(self.position.segment, fmt.first_record)
                for item in scan_segment(fd, fmt, self.position.offset, size):
                    if isinstance(item, record.Corruption):
                        self.damage.append(Damage(name, item.offset, item.length))
                    else:
                        yield item.payload
                        count += 1
                    self.position = Position(self.position.segment, item.end)
                    if max_records is not None and count >= max_records:
                        return
            finally:
                os.close(fd)
            if not has_next:
                self._seen = (self.position.segment, size)
                return
            if self.position.offset < size:
                self.damage.append(Damage(name, self.position.offset, size - self.position.offset))
            self._next_segment()

    def _next_segment(self) -> None:
        self.position = Position(self.position.segment + 1, 0)

    def has_unread(self) -> bool:
        """Whether the writer may have appended since the last `read` reached the end: the segment it
        ended in changed size, or a next one exists (at most two stats, no read)."""
        if self._seen is None or self._seen[0] != self.position.segment:
            return True
        try:
            size = os.lstat(self.directory / segment_name(self.position.segment)).st_size
        except FileNotFoundError:
            size = -1
        return size != self._seen[1] or os.path.lexists(
            self.directory / segment_name(self.position.segment + 1)
        )

    def unread_tail(self) -> Damage | None:
        """Bytes left after the last complete record: damage, once the log is closed."""
        name = segment_name(self.position.segment)
        try:
            fd = open_in(self.directory, name, os.O_RDONLY)
        except (FileNotFoundError, NotRegularFile):
            return None
        try:
            size = os.fstat(fd).st_size
            offset = max(self.position.offset, detect_format(fd).first_record)
        finally:
            os.close(fd)
        if size <= offset:
            return None
        return Damage(name, offset, size - offset)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
