"""RunSpooler: the writes of open runs, one append-only log each (see docs/design.md, "The spool").

- `open` creates a run's log (OSError if it cannot: nothing of it is kept);
  `resume` reopens one left open (a torn tail is truncated). A run's
  directory is its run directory, or an orphan's (`spool/orphans.py`). The
  caller holds each `SpooledRun` (`Ingest`: one per open run, in its
  `OpenRun`) and hands them to `upkeep` and `shutdown`.
- At most ``max_open_runs`` logs are open (a cap on files, not on runs): the
  least recently written is closed (`park`) and reopened by its next write.
- `stage` counts a document as spooled at once and keeps its record until
  `flush` writes the run's staged records in one ``write`` (by itself at
  `STAGE_RECORDS` / `STAGE_BYTES`); a record the disk refuses is uncounted
  and counted dropped; over ``max_bytes`` only `CONTROL_DOCUMENTS` are kept.
- ``received.json`` never counts a record that is not in the log (`save`
  flushes first); at most one file descriptor per open run.
- Disk trouble never raises out of here: it is counted (``dropped``) and said
  once per episode (``spool_writable``).
"""

from __future__ import annotations

import errno
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tiled_writer_sidecar.config import SpoolConfig
from tiled_writer_sidecar.receive.counters import ReceiverStats
from tiled_writer_sidecar.spool.codec import unpack_document
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.record import HEADER_SIZE
from tiled_writer_sidecar.spool.segment import FsyncPolicy, LogReader, LogWriter
from tiled_writer_sidecar.spool.state_files import Received

log = logging.getLogger(__name__)

STAGE_RECORDS = 500  # write a run's staged records at this many ...
STAGE_BYTES = 2**18  # ... or this many bytes, whatever the loop is doing
# Documents small and vital enough to be kept even over the spool size limit.
CONTROL_DOCUMENTS = frozenset({"start", "descriptor", "stop", "resource", "stream_resource"})


@dataclass(eq=False, slots=True)
class SpooledRun:
    """One open run's log and what is staged for it."""

    received: Received
    writer: LogWriter | None
    directory: Path
    key: str  # TrackedRun.key: the uid, or an orphan's "<kind>:<uid>"
    dirty: bool = True
    staged: list[bytes] = field(default_factory=list)  # payloads counted but not yet written
    staged_names: list[str] = field(default_factory=list)
    staged_bytes: int = 0


class RunSpooler:
    """Stages and writes the documents of open runs; see the module docstring."""

    def __init__(self, config: SpoolConfig, spool: SpoolDir, stats: ReceiverStats) -> None:
        self.config = config
        self.spool = spool
        self.stats = stats
        self.fsync = FsyncPolicy(config.fsync, config.fsync_interval_ms / 1000, config.fsync_records)
        self.open_files: OrderedDict[str, SpooledRun] = OrderedDict()  # runs with an open log, LRU first
        self.reopened = 0  # logs reopened after `park` (for tests and benchmarks)
        self.unsaved_closed: list[SpooledRun] = []  # closed, but received.json not yet saved
        self._stage_now = config.fsync == "always"
        self._max_bytes = config.max_bytes

    def open(self, received: Received, directory: Path | None = None, key: str | None = None) -> SpooledRun:
        """Create a new run's log and ``received.json``; OSError if the spool cannot."""
        run_dir = directory or self.spool.run_dir(received.uid)
        run = SpooledRun(received, None, run_dir, key or received.uid, dirty=False)
        self._open_log(run)
        try:
            received.save(run_dir)
        except OSError:
            self._close_log(run)
            raise
        return run

    def resume(self, received: Received, directory: Path | None = None, key: str | None = None) -> SpooledRun:
        """Go on appending to a run left open (its counters already replayed); its log opens on its next write."""
        return SpooledRun(received, None, directory or self.spool.run_dir(received.uid), key or received.uid)

    def _open_log(self, run: SpooledRun) -> None:
        """Open a run's log for appending, closing the least recently written ones beyond the cap."""
        while len(self.open_files) >= max(1, self.config.max_open_runs):
            self.park(next(iter(self.open_files.values())))
        try:
            writer = LogWriter(run.directory, self.config.segment_bytes, self.fsync)
        except OSError as err:
            if err.errno not in (errno.EMFILE, errno.ENFILE) or not self.open_files:
                raise
            self.park(next(iter(self.open_files.values())))  # out of descriptors: one more log closes
            writer = LogWriter(run.directory, self.config.segment_bytes, self.fsync)
        if writer.truncated_bytes:
            log.warning(
                "run %s: truncated a torn tail of %d bytes left by a crash", run.key, writer.truncated_bytes
            )
        run.writer = writer
        self.open_files[run.key] = run

    def park(self, run: SpooledRun) -> None:
        """Write what is staged and close a run's log (the run stays open: its next write reopens it)."""
        self.flush(run)
        self._close_log(run)
        self.save(run)

    def read_back(
        self, received: Received, directory: Path | None = None
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """The documents of a run's log, counted anew into `received` (documents, bytes) as read."""
        for payload in self._recount(received, directory):
            yield unpack_document(payload)

    def _recount(self, received: Received, directory: Path | None = None) -> Iterator[bytes]:
        """The records of a run's log, counted anew into `received` as read."""
        return received.recount(LogReader(directory or self.spool.run_dir(received.uid)).read(), HEADER_SIZE)

    def close_unopened(self, received: Received, reason: str) -> None:
        """Mark a run that was never (re)opened closed, with the reason and its records counted; never raises."""
        received.close(reason)
        try:
            for _ in self._recount(received):
                pass
            received.save(self.spool.run_dir(received.uid))
        except Exception as err:  # noqa: BLE001  # the uploader will find the run as it is
            log.error("cannot save the state of run %s (%s)", received.uid, type(err).__name__)

    def stage(self, run: SpooledRun, name: str, payload: bytes) -> None:
        """Count one document as spooled and stage its record (see `flush` for a failed write)."""
        stats = self.stats
        size = HEADER_SIZE + len(payload)
        limit = self._max_bytes
        if limit and name not in CONTROL_DOCUMENTS and stats.spool_bytes + len(payload) > limit:
            self.drop(run, f"spool is at its max_bytes limit ({limit} bytes)")
            return
        run.staged.append(payload)
        run.staged_names.append(name)
        run.staged_bytes += size
        run.received.note_spooled(size, time.time())
        run.dirty = True
        stats.documents[name] += 1
        stats.spool_bytes += size
        if self._stage_now or len(run.staged) >= STAGE_RECORDS or run.staged_bytes >= STAGE_BYTES:
            self.flush(run)

    def flush(self, run: SpooledRun) -> None:
        """Write a run's staged records (reopening its log if it was parked); uncount and drop those the
        disk refused."""
        if not run.staged:
            return
        if run.writer is None:
            try:
                self._open_log(run)
                self.reopened += 1
            except OSError as failure:
                for payload, name in zip(run.staged, run.staged_names, strict=True):
                    self._uncount(run, name, HEADER_SIZE + len(payload))
                    self.drop(run, f"cannot reopen its log: {failure.strerror}")
                run.staged, run.staged_names, run.staged_bytes = [], [], 0
                return
        else:
            self.open_files.move_to_end(run.key)
        assert run.writer is not None
        payloads, names = run.staged, run.staged_names
        run.staged, run.staged_names, run.staged_bytes = [], [], 0
        result = run.writer.append_many(payloads)
        for index, err in result.failed:
            self._uncount(run, names[index], HEADER_SIZE + len(payloads[index]))
            self.drop(run, f"spool write failed: {err.strerror}")
        if result.sync_error is not None:
            self.trouble(f"fsync failed: {result.sync_error.strerror}")
        limit = self._max_bytes
        if (
            not result.failed
            and not self.stats.spool_writable
            and not (limit and self.stats.spool_bytes >= limit)
            and run.directory.parent == self.spool.runs_dir  # an orphan's write does not prove runs/ works
        ):
            self.stats.spool_writable = True
            log.warning("spool writable again; spooling resumed")

    def _uncount(self, run: SpooledRun, name: str, size: int) -> None:
        """Undo `stage`'s counting for a staged document that could not be written."""
        run.received.note_unwritten(size)
        self.stats.documents[name] -= 1
        self.stats.spool_bytes -= size

    def drop(self, run: SpooledRun, why: str) -> None:
        run.received.note_dropped()
        run.dirty = True
        self.stats.dropped += 1
        self.trouble(f"dropping documents of run {run.received.uid}: {why}")

    def trouble(self, why: str) -> None:
        """Say loudly, once per episode, that documents are being lost."""
        if self.stats.spool_writable:
            self.stats.spool_writable = False
            log.error("SPOOL NOT WRITABLE: %s; free space or fix the spool, spooling resumes by itself", why)

    def save(self, run: SpooledRun) -> None:
        """Write what is staged, then ``received.json`` if it changed."""
        self.flush(run)  # received.json never counts a record that is not in the log
        if not run.dirty:
            return
        try:
            run.received.save(run.directory)
            run.dirty = False
        except OSError as err:
            self.trouble(f"cannot save the state of run {run.received.uid}: {err.strerror}")

    def close(self, run: SpooledRun) -> None:
        """Write, fsync and close a run's log (its descriptor is released) and save its state."""
        run.dirty = True  # closing changes the state, whatever was saved before
        self.flush(run)
        self._close_log(run)
        self.save(run)
        if run.dirty:
            self.unsaved_closed.append(run)  # retried by upkeep() until the disk has room

    def _close_log(self, run: SpooledRun) -> None:
        """fsync and close a run's log, releasing its descriptor; a failed fsync is said, not raised."""
        if run.writer is not None:
            try:
                run.writer.close()
            except OSError as err:
                self.trouble(f"cannot fsync run {run.received.uid}: {err.strerror}")
            run.writer = None
        if self.open_files.get(run.key) is run:
            del self.open_files[run.key]

    def upkeep(self, runs: Iterable[SpooledRun], save: bool) -> None:
        """Write what `runs` (the open ones) staged, fsync when the policy says so; with `save`, save
        those changed."""
        runs = list(runs)
        for run in runs:
            if run.staged:
                self.flush(run)
        for run in list(self.open_files.values()):
            if run.writer is not None:
                try:
                    run.writer.maybe_sync()
                except OSError as err:
                    self.trouble(f"fsync failed: {err.strerror}")
        if save:
            for run in runs:
                if run.dirty or run.staged:
                    self.save(run)
            for run in list(self.unsaved_closed):
                self.save(run)
                if not run.dirty:
                    self.unsaved_closed.remove(run)

    def shutdown(self, runs: Iterable[SpooledRun]) -> None:
        """Write and save `runs` (the open ones) and every closed one, close every log (the runs stay
        open for the next receiver)."""
        for run in [*runs, *self.unsaved_closed]:
            self.save(run)
            self._close_log(run)
