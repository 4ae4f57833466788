"""One run's upload: its log read back, fed to TiledWriter, flushed, verified, finished.

- A partial upload of the run in Tiled is deleted (closed for subscribers
  first) just before the start is fed again, only if this spool created it
  (``uploaded.created``) or `UploadContext.overwrite_foreign` says so
  (`RunUpload.start` asks Tiled; no request otherwise), with a placeholder
  holding Tiled's highest node id meanwhile (`tiled_calls.ids_not_reused`).
  Feeding the start creates the run
  in Tiled: ``uploaded.json`` records ``creating`` first; Tiled answers 409
  if another writer has the run (`ForeignRun`: the run is quarantined, nothing
  deleted); once created, ``uploaded.json`` records ``uploading`` and
  ``created`` in one write. A 409 after an upload cut between the create and
  that write (``creating`` left set) on a run whose start in Tiled is this
  spool's start is this spool's own: it is deleted and created again. `pump` feeds what is new in the
  log (at most `RECORDS_PER_PUMP`), flushes when a batch is due, and finishes
  the run once it is closed and read to its end.
- Everything read back is untrusted: `feed` refuses a document that is not
  of this run and names that could address another Tiled node
  (`BadRunDocument`, `UnsafeName`: the run is quarantined, by `quarantine`).
- `finish` verifies each stream against what was fed, then records
  ``uploaded`` and releases the run's segments. A stream whose every append
  Tiled acknowledged at its first attempt, as many rows as fed
  (`TiledRun.acknowledged_rows`), is verified by that count; any other (an
  append retried, a table widened or split) has its ``seq_num`` column read
  back: the values fed, in the order fed or in ``seq_num`` order (how Tiled
  reads the table back), or `VerificationFailed`.
- Runs are uploaded from several worker threads at once: the counters in
  `UploadContext.status` are changed under `UploadContext.lock`; runs send their
  appends one at a time (`UploadContext.tables_lock`), an open run's first (`TablesLock`);
  while backlog runs drain, an open run appends at most every `LIVE_PACE_S`;
  ``uploaded.json`` is written at the start, at most every
  `PROGRESS_INTERVAL_S` while rows flow, and at the end.
- A failure leaves ``uploaded.json`` at ``uploading``: the scheduler forgets
  the run (`abandon`) and the next `start` rewrites it whole.
- ``received.json`` is read again only when it changed on disk.

Its `Phase`, set by each `pump` pass from what it read (a failure raises
instead: the scheduler drops the object)::

    READING --pass reads RECORDS_PER_PUMP--> READING     (a backlog: holds an upload slot)
            --pass reads fewer, or rows stay buffered--> CAUGHT_UP (no slot; rows flush on time)
            --pass reads nothing, nothing buffered--> WAITING   (no pass until received.json changes)
    any     --pass reads nothing, received.json closed--> DONE  (verified, ``uploaded``: forgotten)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import httpx

from tiled_writer_sidecar.config import Config
from tiled_writer_sidecar.errors import BadRunDocument
from tiled_writer_sidecar.spool.codec import unpack_document
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.lag import LagHistogram
from tiled_writer_sidecar.spool.segment import LogReader
from tiled_writer_sidecar.spool.state_files import (
    RECEIVED,
    Received,
    RunView,
    UploaderStatus,
)
from tiled_writer_sidecar.text import clean
from tiled_writer_sidecar.upload.connection import InPlaceRetry, TiledLink
from tiled_writer_sidecar.upload.policy import (
    ForeignRun,
    VerificationFailed,
    one_line,
    retryable,
)
from tiled_writer_sidecar.upload.run_writer import BACKLOG_RECENT_S, TablesLock, TiledRun
from tiled_writer_sidecar.upload.tiled_calls import (
    check_key,
    check_uid,
    delete_run,
    ids_not_reused,
    read_seq_nums,
    run_exists,
)

log = logging.getLogger(__name__)

RECORDS_PER_PUMP = 5000
PROGRESS_INTERVAL_S = 1.0  # uploaded.json's document count, while nothing is buffered
#: While backlog runs drain, a live run appends at most this often (rows coalesce meanwhile): each
#: request costs Tiled about the same CPU whatever its rows, so ten appends a second from a 10 Hz
#: scan would take a third of it from the drain. Without a backlog, rows go as soon as they can.
LIVE_PACE_S = 0.5
_UNSEEN = (-1, -1, -1)


@dataclass
class SeqNums:
    """A stream's ``seq_num`` values in order, as runs of consecutive numbers (O(1) for a normal scan)."""

    ranges: list[list[int]] = field(default_factory=list)  # [first, last] of each run of +1 steps
    count: int = 0

    @classmethod
    def of(cls, values: list[int]) -> SeqNums:
        seq = cls()
        for value in values:
            seq.add(value)
        return seq

    def add(self, value: int) -> None:
        if self.ranges and self.ranges[-1][1] + 1 == value:
            self.ranges[-1][1] = value
        else:
            self.ranges.append([value, value])
        self.count += 1

    def describe_difference(self, tiled: list[int]) -> str:
        """Why `tiled` (read back) is not these values in this order."""
        duplicated = len(tiled) - len(set(tiled))
        if len(tiled) != self.count or duplicated:
            return f"Tiled holds {len(tiled)} rows ({duplicated} duplicated), expected {self.count}"
        first = next((i for i, (a, b) in enumerate(zip(tiled, self.values(), strict=True)) if a != b), 0)
        return f"Tiled's rows are out of order (row {first} holds seq_num {tiled[first]})"

    def values(self) -> list[int]:
        return [v for first, last in self.ranges for v in range(first, last + 1)]

    def matches(self, tiled: list[int]) -> bool:
        """Whether `tiled` holds these values in the order fed, or in ``seq_num`` order (a late copy)."""
        return SeqNums.of(tiled) == self or (len(tiled) == self.count and tiled == sorted(self.values()))


class Phase(Enum):
    """Where a run's upload stands after its last `RunUpload.pump` pass (the module docstring's diagram)."""

    READING = "reading"  # a backlog to read (or no pass yet): it holds an upload slot
    CAUGHT_UP = "caught_up"  # its last pass read less than RECORDS_PER_PUMP: no backlog, no slot
    WAITING = "waiting"  # open, its log read to the end, nothing buffered: no work until more documents come
    DONE = "done"  # closed, read to its end, verified and recorded ``uploaded``: the scheduler forgets it


@dataclass
class UploadContext:
    """The uploader as every run's upload sees it: settings, the spool, the Tiled link, the status
    counters and the locks that guard them and Tiled's tables."""

    config: Config
    spool: SpoolDir
    link: TiledLink
    status: UploaderStatus
    lag: LagHistogram = field(default_factory=LagHistogram)
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards `status` and `lag`
    overwrite_foreign: bool = False  # replay --overwrite-foreign: delete a run this spool did not create
    #: Held around each append to or read of a table (`TiledRun`'s `serial`), open runs first.
    tables_lock: TablesLock = field(default_factory=TablesLock)


class RunUpload:
    """One run in flight; see the module docstring."""

    def __init__(
        self,
        view: RunView,
        tiled: TiledRun,
        context: UploadContext,
        retry: InPlaceRetry | None = None,
        *,
        replace: bool = False,
    ) -> None:
        self.view = view
        self.tiled = tiled
        self.retry = retry or InPlaceRetry(context.link)  # this run's bounded in-place retries
        self.context = context
        self.reader = LogReader(view.directory)
        self.received = view.received
        self._received_key: tuple[int, int, int] | None = _UNSEEN
        self.fed = 0
        self.rows_counted = 0
        self.first_buffered: float | None = None
        self.last_flush = -LIVE_PACE_S  # time.monotonic() of its last flush
        self.last_progress_save = 0.0
        self.started = time.monotonic()
        self.phase = Phase.READING
        self.last_read = time.monotonic()  # when its last pass read a document
        # An upload before this one was cut between creating the run and recording it.
        self.cut_while_creating = view.uploaded.creating and not view.uploaded.created
        self.replace = replace  # the run in Tiled is deleted before its start is fed (`start`)
        self.streams: dict[str, str] = {}  # descriptor uid -> stream name, as fed
        self.seq_nums: dict[str, SeqNums] = {}  # stream -> seq_num fed, in order

    @property
    def uid(self) -> str:
        return self.view.uid

    @property
    def busy(self) -> bool:
        """It has a backlog: it holds an upload slot."""
        return self.phase is Phase.READING

    @property
    def caught_up(self) -> bool:
        """Its last pass read less than RECORDS_PER_PUMP (it may hold rows)."""
        return self.phase in (Phase.CAUGHT_UP, Phase.WAITING)

    @property
    def waiting(self) -> bool:
        return self.phase is Phase.WAITING

    @property
    def finished(self) -> bool:
        return self.phase is Phase.DONE

    @property
    def idle(self) -> bool:
        """Caught up with its log and holding no rows: it can be parked."""
        return self.caught_up and not self.tiled.buffered_rows()

    # ------------------------------------------------------------- start
    @classmethod
    def start(cls, view: RunView, context: UploadContext) -> RunUpload:
        """Make the run ready to feed: a partial upload this spool created is replaced (module docstring)."""
        client = context.link.client
        uid = check_uid(view.directory.name)
        if view.received.uid != uid:
            raise BadRunDocument(f"received.json names run {clean(view.received.uid, 80)!r}, not {uid}")
        uploaded = view.uploaded
        replace = bool((uploaded.created or context.overwrite_foreign) and run_exists(client, uid))
        if replace and uploaded.created:
            log.info("run %s: deleting the partial upload before rewriting it", uid)
        elif replace:
            log.warning("run %s: deleting a run this spool did not create (--overwrite-foreign)", uid)
        retry = InPlaceRetry(context.link)
        serial = context.tables_lock.lane(live=not view.received.closed)  # the live lane goes first
        tiled_config = context.config.tiled
        tiled = TiledRun(
            client, tiled_config.batch_rows, retry, serial=serial, close_streams=tiled_config.close_streams
        )
        return cls(view, tiled, context, retry, replace=replace)

    def _create(self, doc: dict[str, Any]) -> None:
        """Feed the start, which creates the run in Tiled, recording ``creating`` first (module docstring)."""
        uploaded = self.view.uploaded
        client = self.context.link.client
        if not uploaded.created:
            uploaded.note_creating(True)
            uploaded.save(self.view.directory)
        try:
            if self.replace:
                self._create_again(doc)
            else:
                self.tiled.feed("start", doc)  # creates the run in Tiled: atomic against other writers
        except httpx.HTTPStatusError as err:
            ours = err.response.status_code == 409 and self.cut_while_creating and _holds_start(client, doc)
            if not ours:
                self._not_created(foreign=err.response.status_code == 409)
                if err.response.status_code == 409:
                    raise ForeignRun(
                        "a run with this uid is already in Tiled and this spool did not create it"
                        " (another writer, or an upload cut before it was recorded);"
                        " `replay --overwrite-foreign UID` replaces it"
                    ) from None
                raise
            log.info(
                "run %s: an upload cut before recording its create left the run in Tiled; rewriting it",
                self.uid,
            )
            self._create_again(doc)
        except httpx.ConnectError:
            self._not_created(foreign=False)
            raise
        self._created()

    def _create_again(self, doc: dict[str, Any]) -> None:
        """Close and delete the run in Tiled, then feed its start: the new run's nodes get ids of their own."""
        client = self.context.link.client
        with ids_not_reused(client, self.uid):
            _close_for_subscribers(client, self.uid)
            delete_run(client, self.uid)
            with self.context.lock:
                self.context.status.note_rewrite()
            self.tiled.feed("start", doc)

    def _not_created(self, *, foreign: bool) -> None:
        """Tiled answered (or was never reached): this create did not land, so ``creating`` is cleared,
        unless an earlier, cut create may have landed (then only a 409 on another start clears it)."""
        uploaded = self.view.uploaded
        if uploaded.creating and (foreign or not self.cut_while_creating):
            uploaded.note_creating(False)
            uploaded.save(self.view.directory)

    def _created(self) -> None:
        """The start is in Tiled, created by this spool: record ``uploading`` (one write)."""
        uploaded = self.view.uploaded
        uploaded.start_attempt()
        uploaded.save(self.view.directory)
        self.last_progress_save = time.monotonic()
        log.info("run %s: upload started (attempt %d)", self.uid, uploaded.attempts)

    # ------------------------------------------------------------- one pass
    def pump(self) -> bool:
        """Feed what is new in the run's log; flush on time; finish when closed. True if it progressed."""
        received = self.latest_received()
        count = 0
        damage_before = len(self.reader.damage)
        for payload in self.reader.read(max_records=RECORDS_PER_PUMP):
            name, doc = unpack_document(payload)
            self.feed(name, doc, first=self.fed + count == 0)
            count += 1
        self.fed += count
        for damage in self.reader.damage[damage_before:]:
            log.error("run %s: %s; skipped", self.uid, damage)
            self.view.uploaded.damage.append(str(damage))
        now = time.monotonic()
        if self.tiled.buffered_rows():
            if self.first_buffered is None:
                self.first_buffered = now
            caught_up = count < RECORDS_PER_PUMP
            ready = self.tiled.ready_to_flush(caught_up=caught_up) and not self._yields(now)
            if ready or self._batch_due(now, caught_up=caught_up):
                self.flush()
        else:
            self.first_buffered = None
        if count == 0 and received.closed:
            self.finish(received)
            return True
        if count == RECORDS_PER_PUMP:
            self.phase = Phase.READING
        elif count or self.tiled.buffered_rows():
            self.phase = Phase.CAUGHT_UP
        else:
            self.phase = Phase.WAITING
        if count:
            self.last_read = now
            if now - self.last_progress_save >= PROGRESS_INTERVAL_S and not self.tiled.buffered_rows():
                self._save_progress()
        return count > 0

    def _received_stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.view.directory / RECEIVED, follow_symlinks=False)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def has_news(self) -> bool:
        """Whether a pass may do anything: not waiting, or its log grew (the receiver appends within a
        few ms of receiving), or its received.json changed (saved about once a second, and when the
        run closes)."""
        return not self.waiting or self.reader.has_unread() or self._received_stat() != self._received_key

    def latest_received(self) -> Received:
        """The run's ``received.json``, read again only if the file changed (inode, mtime, size)."""
        key = self._received_stat()
        if key != self._received_key:
            self._received_key = key
            self.received = Received.load(self.view.directory) or self.view.received
        return self.received

    def _batch_due(self, now: float, *, caught_up: bool) -> bool:
        """`batch_seconds` passed since the uploader first held a row, or since its event time.

        The event time counts only once the run's log is read to its end
        (not while draining a backlog, where rows are old and batches should
        be full): rows then reach Tiled within `batch_seconds` of being
        acquired, however late they reached the uploader.
        """
        seconds = self.context.config.tiled.batch_seconds
        held = self.first_buffered
        if held is not None and now - held >= seconds:
            return True
        age = self.tiled.buffered_age()
        return caught_up and age is not None and age >= seconds

    def _yields(self, now: float) -> bool:
        """A run being acquired yields to a draining backlog: its last append was less than
        `LIVE_PACE_S` ago and backlog runs are using Tiled's tables."""
        return now - self.last_flush < LIVE_PACE_S and self.context.tables_lock.recently(
            live=False, seconds=BACKLOG_RECENT_S
        )

    def flush(self) -> None:
        """Write the buffered rows to Tiled, count them and their lag, record the progress."""
        context = self.context
        rows = self.tiled.buffered_rows()
        lag = self.tiled.flush()
        self.last_flush = time.monotonic()
        self.first_buffered = None
        self.rows_counted += rows
        with context.lock:
            histogram = None
            if lag is not None:
                context.lag.observe(lag)
                histogram = context.lag.as_status()
            context.status.note_flush(rows, lag, histogram)
        if time.monotonic() - self.last_progress_save >= PROGRESS_INTERVAL_S:
            self._save_progress()

    def _save_progress(self) -> None:
        """Record how many documents Tiled holds (everything fed, once flushed)."""
        self.view.uploaded.note_documents(self.fed)
        self.view.uploaded.save(self.view.directory)
        self.last_progress_save = time.monotonic()

    # ------------------------------------------------------------- untrusted documents
    def feed(self, name: str, doc: dict[str, Any], *, first: bool) -> None:
        """Check that a document read back from the spool belongs to this run (`first`: the first fed,
        which must be its start), note its seq_nums, feed it."""
        if not isinstance(doc, dict):
            raise BadRunDocument(f"a {clean(name, 40)!r} record that is not a document")
        if first:
            if name != "start" or doc.get("uid") != self.uid:
                raise BadRunDocument(f"the log starts with {_describe(name, doc)}, not this run's start")
        elif name == "start":
            raise BadRunDocument(f"a second start in the log: {_describe(name, doc)}")
        elif name in ("descriptor", "stop") and doc.get("run_start") != self.uid:
            raise BadRunDocument(f"{_describe(name, doc)} of another run")
        if name == "descriptor":
            stream = check_key(doc.get("name"), "stream name")
            for key in doc.get("data_keys") or {}:
                check_key(key, f"data key of stream {stream!r}:")
            self.streams[doc["uid"]] = stream
        elif name in ("event", "event_page"):
            of_stream = self.streams.get(str(doc.get("descriptor")))
            if of_stream is None:
                raise BadRunDocument(f"{_describe(name, doc)} of a descriptor not in this run")
            seq = self.seq_nums.setdefault(of_stream, SeqNums())
            for value in [doc["seq_num"]] if name == "event" else doc["seq_num"]:
                seq.add(int(value))
        elif name == "stream_resource":
            check_key(doc.get("data_key"), "stream_resource data key")
        if name == "start":
            self._create(doc)
        else:
            self.tiled.feed(name, doc)

    # ------------------------------------------------------------- the end
    def finish(self, received: Received) -> None:
        """The log is read to its end and closed: stop, verify, record ``uploaded``, release segments."""
        uid = self.uid
        context = self.context
        if (tail := self.reader.unread_tail()) is not None:
            log.error("run %s: %s at the end of the log; skipped", uid, tail)
            self.view.uploaded.damage.append(str(tail))
        if not self.tiled.stopped:
            self.tiled.finish_without_stop()
        rows = self.verify()
        uploaded = self.view.uploaded
        uploaded.finish(self.fed, rows)
        uploaded.save(self.view.directory)
        self.phase = Phase.DONE
        with context.lock:
            context.status.note_uploaded(self.fed, sum(rows.values()) - self.rows_counted)
        problems = received.problems() + uploaded.damage
        log.info(
            "run uploaded uid=%s scan_id=%s documents=%d rows=%s seconds=%.1f %s",
            uid,
            received.scan_id,
            self.fed,
            rows,
            time.monotonic() - self.started,
            "incomplete: " + "; ".join(problems) if problems else "complete",
        )
        context.spool.release_run(
            RunView(self.view.directory, received, uploaded), context.config.spool.retention_hours
        )

    def verify(self) -> dict[str, int]:
        """Rows per stream in Tiled, checked against what was fed; raise VerificationFailed otherwise."""
        streams = set(self.seq_nums) | set(self.tiled.events)
        return {stream: self._verify(stream) for stream in sorted(streams)}

    def _verify(self, stream: str) -> int:
        """Rows of `stream` in Tiled: exactly the seq_nums fed, in the order they were fed."""
        fed = self.seq_nums.get(stream, SeqNums())
        if self.tiled.acknowledged_rows(stream) == fed.count:
            return fed.count  # every row acknowledged once, as fed: a read-back cannot differ
        tiled = self._read_back(stream)
        if tiled is None:
            if fed.count == 0:
                return 0
            raise VerificationFailed(f"run {self.uid} stream {stream}: no table in Tiled after upload")
        if not fed.matches(tiled):
            raise VerificationFailed(f"run {self.uid} stream {stream}: {fed.describe_difference(tiled)}")
        return len(tiled)

    def _read_back(self, stream: str) -> list[int] | None:
        """The stream's ``seq_num`` column in Tiled; a 5xx is retried in place (bounded: `InPlaceRetry`)."""
        failed = False
        while True:
            try:
                seq = read_seq_nums(self.context.link.client, self.uid, stream)
            except httpx.HTTPStatusError as err:
                if not retryable(err):
                    raise
                failed = True
                self.retry.wait(err)
                continue
            if failed:
                self.retry.recovered()
            return seq

    # ------------------------------------------------------------- failures
    def abandon(self, err: Exception) -> None:
        """Say why this upload is given up: the run stays ``uploading`` and is rewritten."""
        if isinstance(err, VerificationFailed):
            log.warning("%s; rewriting the run", err)
        else:
            log.warning("run %s: upload failed (%s); it will be rewritten", self.uid, one_line(err))


def quarantine(view: RunView, reason: str, status: UploaderStatus) -> None:
    """Record that the run can never be uploaded (``uploaded.json``, the status, one log line).

    The caller holds `UploadContext.lock` if workers may be running."""
    uid = view.directory.name
    uploaded = view.uploaded
    uploaded.quarantine(reason)
    status.note_quarantined(f"run {clean(uid, 80)} quarantined: {reason}")
    log.error("run %s quarantined: %s", clean(uid, 80), reason)
    try:
        uploaded.save(view.directory)
    except OSError as err:  # shown in the log; the run is not retried by this process
        log.error("run %s: cannot record its quarantine: %s", clean(uid, 80), one_line(err))


def _holds_start(client: Any, doc: dict[str, Any]) -> bool:
    """Tiled's run of this uid was created from this start document (same uid and time)."""
    start = client[check_uid(doc["uid"])].metadata.get("start") or {}
    return bool(start.get("uid") == doc["uid"] and start.get("time") == doc.get("time"))


def _close_for_subscribers(client: Any, uid: str) -> None:
    """Close a partial run's nodes before deleting it: Tiled's delete tells live subscribers nothing.

    Best effort: a node Tiled refuses to close (4xx) does not stop the rewrite; an outage does.
    """
    try:
        TiledRun.close_run_in_tiled(client, uid)
    except httpx.HTTPStatusError as err:
        if retryable(err):
            raise
        log.info("run %s: could not close its streams before the rewrite: %s", uid, one_line(err))


def _describe(name: str, doc: dict[str, Any]) -> str:
    """A document named for a reason: kind and uid, escaped and bounded."""
    return f"{clean(name, 40)} {clean(doc.get('uid'), 80)!r}"
