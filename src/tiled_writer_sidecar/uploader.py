"""The uploader: drains the spool into Tiled, run by run, exactly once.

State machine of a run (``uploaded.json``)::

    pending ──> uploading ──> uploaded            (segments released)
                   │  ^
                   │  └── this run's upload failed in a way that cannot be
                   │      resumed (see below), the uploader was stopped, or
                   │      verification failed: delete the partial run in
                   │      Tiled, rewrite it whole
                   └────> quarantined             (the run itself cannot be uploaded)

What happens after a failure is decided in one place, `classify` (its table
is `OUTCOMES`): retry in place, rewrite the run, count a rejection,
quarantine, wait for Tiled, stop. Outages and ambiguous failures never
quarantine a run; a rejection does only when Tiled repeats it for the same
request (`REJECTIONS_TO_QUARANTINE` times in a row) while it answers other
requests. Whatever is read back from the spool is untrusted: uids are
checked (full match, equal to the run directory's name), names that could
address another Tiled node are refused (`tiled_client.check_key`), and a
document that does not belong to its run quarantines that run only.

Failed appends are retried in place. Nearly all of an upload's requests are
appends of rows to a stream's table; when one fails with a transient error
(Tiled down, 5xx, e.g. SQLite's "database is locked" while a client reads)
the writer waits (backoff), reads the table's ``seq_num`` column and
decides: the rows are there (the response was lost) -> go on; they are not
and Tiled is done with the request -> append them again; otherwise (the
request may still be running in Tiled) -> rewrite the run
(`tiled_run.SidecarRunWriter`). The run's other state (TiledWriter's nodes,
consolidators, buffered rows) stays in memory meanwhile, so nothing else is
redone.

Any other failure (creating a node, updating metadata, verification, an
ambiguous append) rewrites *that run only*: TiledWriter's state for it is
in memory and a request whose response was lost may or may not have
landed, so the uploader deletes what Tiled holds of the run (only runs it
marked ``uploading`` itself) and replays the run's log from the first
record. The spool keeps a run until this succeeds, so the rewrite is always
possible. Other runs in flight carry on. After a restart of the uploader
every run left ``uploading`` is rewritten the same way. When a run is
finished, the uploader reads back each stream's ``seq_num`` column (one
request per stream) and checks it against what it fed, in order: no row
missing, none twice, none moved; otherwise it rewrites.

Scheduling: at most ``MAX_ACTIVE_RUNS`` runs with a backlog (their last pass
read a full ``RECORDS_PER_PUMP``) are uploaded at once, oldest first; a run
that has caught up with its log (an open run waiting for more documents,
however many) does not count, so open runs never keep newer runs waiting.
Runs in memory are bounded by ``[spool] max_open_runs + MAX_ACTIVE_RUNS``
(the receiver never keeps more runs open); beyond it the longest idle
caught-up run is parked (forgotten, rewritten once more documents come).
Runs already uploaded are remembered and not looked at again, so an idle
pass costs the same however many runs the spool's history holds.

Batching: rows are flushed when TiledWriter's ``batch_size`` (= ``batch_rows``)
is reached or ``batch_seconds`` after the first buffered row, whichever
comes first. Tiled errors are retried forever with one backoff
(`backoff.Backoff`, equal jitter); one log line per state change (down,
up again), not per retry.
While Tiled is down, each retry is one GET on a kept HTTP client; a new
Tiled client is built only once the server answers again.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from .backoff import Backoff
from .config import Config
from .errors import BadRunDocument, TiledUnavailableError
from .metrics import LagHistogram
from .outcomes import (
    REJECTIONS_TO_QUARANTINE,
    Outcome,
    Stopping,
    TiledDown,
    VerificationFailed,
    classify,
    is_auth_error,
    one_line,
    rejection_key,
)
from .spool.codec import unpack_document
from .spool.directory import SpoolDir
from .spool.index import Received, RunView, Uploaded, UploaderStatus, UploadState
from .spool.segment import LogReader
from .text import clean
from .tiled_client import check_key, check_uid, connect, delete_run, read_seq_nums, run_exists
from .tiled_run import TiledRun, check_tiledwriter_api, retryable

log = logging.getLogger(__name__)

MAX_ACTIVE_RUNS = 4  # runs with a backlog, uploaded at once (caught-up open runs do not count)
RECORDS_PER_PUMP = 5000
IDLE_WAIT_S = 0.05
STATUS_INTERVAL_S = 1.0
BUSY_BACKOFF_INITIAL_S = 0.05  # retrying an append Tiled answered with a 5xx (see Uploader.busy_backoff)
BUSY_BACKOFF_MAX_S = 1.0


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


@dataclass
class ActiveRun:
    view: RunView
    tiled: TiledRun
    reader: LogReader
    fed: int = 0
    rows_counted: int = 0
    first_buffered: float | None = None
    last_status_save: float = 0.0
    started: float = field(default_factory=time.monotonic)
    waiting: bool = False  # open, its log drained, nothing buffered: no work until more documents come
    caught_up: bool = False  # its last pass read less than RECORDS_PER_PUMP: no backlog, no upload slot
    last_read: float = field(default_factory=time.monotonic)  # when its last pass read a document
    start_seen: bool = False
    streams: dict[str, str] = field(default_factory=dict)  # descriptor uid -> stream name, as fed
    seq_nums: dict[str, SeqNums] = field(default_factory=dict)  # stream -> seq_num fed, in order

    @property
    def uid(self) -> str:
        return self.view.uid


class InPlaceRetry:
    """The uploader's `RetryPolicy` for a failed append: its backoff and status, then the same append."""

    def __init__(self, uploader: Uploader) -> None:
        self.uploader = uploader

    def wait(self, err: Exception) -> None:
        self.uploader._wait_before_retry(err)

    def recovered(self) -> None:
        self.uploader._recovered()


class Uploader:
    """Uploads spooled runs; see the module docstring."""

    def __init__(
        self,
        config: Config,
        spool: SpoolDir,
        *,
        only: set[str] | None = None,
        stop: threading.Event | None = None,
        give_up_after: float | None = None,
    ) -> None:
        check_tiledwriter_api()  # an unsupported bluesky-tiled-plugins fails here, in one line
        self.config = config
        self.spool = spool
        self.only = only
        self.stop_event = stop or threading.Event()
        self.wake = threading.Event()
        self.give_up_after = give_up_after
        self._failing_since: float | None = None
        self.client: Any = None
        self._probe: httpx.Client | None = None
        self._probe_error: str | None = None
        self.active: dict[str, ActiveRun] = {}
        self.done: set[str] = set()  # runs seen uploaded (or quarantined): never candidates again
        self.parked: dict[str, int] = {}  # idle open runs put out of memory -> their documents then
        self.rejections: dict[str, tuple[str, int]] = {}  # uid -> (last rejection, times in a row)
        self.max_in_memory = config.spool.max_open_runs + MAX_ACTIVE_RUNS
        self.status = UploaderStatus()
        self.lag = LagHistogram()
        self._last_status_write = 0.0
        self.backoff = Backoff(config.tiled.backoff_initial_seconds, config.tiled.backoff_max_seconds)
        # Tiled answers but is busy (SQLite "database is locked" while a client reads): the same
        # append usually goes through a moment later, so retry it soon, not on the outage backoff.
        self.busy_backoff = Backoff(BUSY_BACKOFF_INITIAL_S, BUSY_BACKOFF_MAX_S)

    # ------------------------------------------------------------- the loop
    def run(self, *, until_idle: bool = False) -> None:
        """Upload until stopped (or, with `until_idle`, until nothing is left)."""
        while not self.stop_event.is_set():
            try:
                progressed = self.step()
            except Stopping:
                break
            except TiledUnavailableError:
                raise
            except Exception as err:  # noqa: BLE001 - every failure is classified
                self._on_failure(err)
                continue
            self._recovered()
            self._write_status()
            if until_idle and not progressed and not self._work_left():
                break
            if not progressed:
                self.wake.wait(IDLE_WAIT_S)
                self.wake.clear()
        self._shutdown()

    def step(self) -> bool:
        """One pass over the runs; True if anything was uploaded."""
        if self.client is None:
            if self.status.tiled == "down" and not self._tiled_reachable():
                raise TiledDown(self._probe_error or "Tiled is not reachable")
            self.client = connect(self.config)
            self._set_tiled("up")
        self._schedule()
        progressed = False
        for run in list(self.active.values()):
            fed = run.fed
            try:
                progressed |= self._pump(run)
            except Exception as err:  # noqa: BLE001 - classified: one run's failure never stops the others
                self._run_failed(run.view, err, fed=run.fed)
                continue
            run.caught_up = run.fed - fed < RECORDS_PER_PUMP
            if run.fed > fed:
                run.last_read = time.monotonic()
        return progressed

    # ------------------------------------------------------------- scheduling
    def _schedule(self) -> None:
        """Activate the oldest candidates while upload slots (runs with a backlog) are free."""
        for view in self._candidates():
            busy = sum(not (run.caught_up or run.waiting) for run in self.active.values())
            if busy >= MAX_ACTIVE_RUNS:
                break
            if len(self.active) >= self.max_in_memory and not self._park_idle_run():
                break
            try:
                self._activate(view)
            except Exception as err:  # noqa: BLE001 - classified, as above
                self._run_failed(view, err, fed=0)

    def _park_idle_run(self) -> bool:
        """Forget the longest idle caught-up open run to make room; False if there is none."""
        idle = [run for run in self.active.values() if run.caught_up and not run.tiled.buffered_rows()]
        if not idle:
            return False
        run = min(idle, key=lambda r: r.last_read)
        self.active.pop(run.uid)
        received = Received.load(run.view.directory)
        self.parked[run.uid] = received.documents if received is not None else -1
        log.info(
            "run %s: parked (idle, open; %d runs in memory); rewritten when it goes on",
            run.uid,
            len(self.active),
        )
        return True

    def _candidates(self) -> list[RunView]:
        """Runs to upload that are not in flight, oldest first (each run's files are untrusted)."""
        views = []
        for run_dir in self.spool.runs_dir.iterdir():
            uid = run_dir.name
            if uid in self.done or uid in self.active:
                continue
            try:
                received = Received.load(run_dir)
                if received is None:
                    continue
                view = RunView(run_dir, received, Uploaded.load(run_dir))
            except (OSError, TypeError, ValueError) as err:
                log.warning("run directory %s: unreadable (%s); skipped", clean(uid), one_line(err))
                self.done.add(uid)
                continue
            state = view.uploaded.state
            if self.only is not None and uid in self.only:
                wanted = state != UploadState.UPLOADED
            else:
                wanted = self.only is None and not state.finished
            if uid in self.parked and wanted:
                if self.parked[uid] == received.documents and not received.closed:
                    continue
                del self.parked[uid]
            if wanted:
                views.append(view)
            elif state.finished:
                self.done.add(uid)
        views.sort(key=_age)
        return views

    def _work_left(self) -> bool:
        return bool(self.active) or bool(self._candidates())

    # ------------------------------------------------------------- one run
    def _close_for_subscribers(self, uid: str) -> None:
        """Close a partial run's nodes before deleting it: Tiled's delete tells live subscribers nothing.

        Best effort: a node Tiled refuses to close (4xx) does not stop the rewrite; an outage does.
        """
        try:
            TiledRun.close_run_in_tiled(self.client, uid)
        except httpx.HTTPStatusError as err:
            if retryable(err):
                raise
            log.info("run %s: could not close its streams before the rewrite: %s", uid, one_line(err))

    def _activate(self, view: RunView) -> None:
        uid = check_uid(view.directory.name)
        if view.received.uid != uid:
            raise BadRunDocument(f"received.json names run {clean(view.received.uid, 80)!r}, not {uid}")
        uploaded = view.uploaded
        if uploaded.state in (UploadState.UPLOADING, UploadState.QUARANTINED):
            if run_exists(self.client, uid):
                log.info("run %s: deleting the partial upload before rewriting it", uid)
                self._close_for_subscribers(uid)
                delete_run(self.client, uid)
                self.status.rewrites += 1
        elif run_exists(self.client, uid):
            uploaded.state = UploadState.QUARANTINED
            uploaded.reason = "a run with this uid is already in Tiled (not written by this sidecar)"
            uploaded.save(view.directory)
            self.status.runs_quarantined += 1
            log.error("run %s quarantined: %s", uid, uploaded.reason)
            return
        uploaded.state = UploadState.UPLOADING
        uploaded.attempts += 1
        uploaded.documents = 0
        uploaded.damage = []
        uploaded.reason = None
        uploaded.save(view.directory)
        tiled_run = TiledRun(self.client, self.config.tiled.batch_rows, InPlaceRetry(self))
        self.active[uid] = ActiveRun(view, tiled_run, LogReader(view.directory))
        log.info("run %s: upload started (attempt %d)", uid, uploaded.attempts)

    def _pump(self, run: ActiveRun) -> bool:
        """Feed what is new in the run's log; flush on time; finish when closed."""
        received = Received.load(run.view.directory) or run.view.received
        count = 0
        damage_before = len(run.reader.damage)
        for payload in run.reader.read(max_records=RECORDS_PER_PUMP):
            name, doc = unpack_document(payload)
            self._feed(run, name, doc)
            count += 1
        run.fed += count
        for damage in run.reader.damage[damage_before:]:
            log.error("run %s: %s; skipped", run.view.uid, damage)
            run.view.uploaded.damage.append(str(damage))
        now = time.monotonic()
        if run.tiled.buffered_rows():
            if run.first_buffered is None:
                run.first_buffered = now
            if self._batch_due(run, now, caught_up=count < RECORDS_PER_PUMP):
                self._flush(run)
        else:
            run.first_buffered = None
        if count == 0 and received.closed:
            self._finish(run, received)
            return True
        run.waiting = count == 0 and not run.tiled.buffered_rows()
        if count and now - run.last_status_save >= STATUS_INTERVAL_S and not run.tiled.buffered_rows():
            self._save_progress(run)
        return count > 0

    def _batch_due(self, run: ActiveRun, now: float, *, caught_up: bool) -> bool:
        """`batch_seconds` passed since the uploader first held a row, or since its event time.

        The event time counts only once the run's log is read to its end
        (not while draining a backlog, where rows are old and batches should
        be full): rows then reach Tiled within `batch_seconds` of being
        acquired, however late they reached the uploader.
        """
        seconds = self.config.tiled.batch_seconds
        held = run.first_buffered
        if held is not None and now - held >= seconds:
            return True
        age = run.tiled.buffered_age()
        return caught_up and age is not None and age >= seconds

    def _flush(self, run: ActiveRun) -> None:
        rows = run.tiled.buffered_rows()
        lag = run.tiled.flush()
        run.first_buffered = None
        self.status.flushes += 1
        self.status.rows += rows
        run.rows_counted += rows
        if lag is not None:
            self.status.last_lag_seconds = lag
            self.status.lag_seconds.append(lag)
            del self.status.lag_seconds[:-1000]
            self.lag.observe(lag)
            self.status.lag_histogram = self.lag.as_status()
        self._save_progress(run)

    def _save_progress(self, run: ActiveRun) -> None:
        """Record how many documents Tiled holds (everything fed, once flushed)."""
        run.view.uploaded.documents = run.fed
        run.view.uploaded.save(run.view.directory)
        run.last_status_save = time.monotonic()

    def _finish(self, run: ActiveRun, received: Received) -> None:
        uid = run.view.uid
        if (tail := run.reader.unread_tail()) is not None:
            log.error("run %s: %s at the end of the log; skipped", uid, tail)
            run.view.uploaded.damage.append(str(tail))
        if not run.tiled.stopped:
            run.tiled.finish_without_stop()
        rows = self._verify_run(run)
        self.status.rows += sum(rows.values()) - run.rows_counted
        uploaded = run.view.uploaded
        uploaded.state = UploadState.UPLOADED
        uploaded.documents = run.fed
        uploaded.rows = rows
        uploaded.save(run.view.directory)
        del self.active[uid]
        self.done.add(uid)
        self.status.runs_uploaded += 1
        self.status.documents += run.fed
        problems = received.problems() + uploaded.damage
        log.info(
            "run uploaded uid=%s scan_id=%s documents=%d rows=%s seconds=%.1f %s",
            uid,
            received.scan_id,
            run.fed,
            rows,
            time.monotonic() - run.started,
            "incomplete: " + "; ".join(problems) if problems else "complete",
        )
        self.spool.release_run(
            RunView(run.view.directory, received, uploaded), self.config.spool.retention_hours
        )

    # ------------------------------------------------------------- untrusted documents
    def _feed(self, run: ActiveRun, name: str, doc: dict[str, Any]) -> None:
        """Check that a document read back from the spool belongs to this run, note its seq_nums, feed it."""
        if not isinstance(doc, dict):
            raise BadRunDocument(f"a {clean(name, 40)!r} record that is not a document")
        if not run.start_seen:
            if name != "start" or doc.get("uid") != run.uid:
                raise BadRunDocument(f"the log starts with {_describe(name, doc)}, not this run's start")
            run.start_seen = True
        elif name == "start":
            raise BadRunDocument(f"a second start in the log: {_describe(name, doc)}")
        elif name in ("descriptor", "stop") and doc.get("run_start") != run.uid:
            raise BadRunDocument(f"{_describe(name, doc)} of another run")
        if name == "descriptor":
            stream = check_key(doc.get("name"), "stream name")
            for key in doc.get("data_keys") or {}:
                check_key(key, f"data key of stream {stream!r}:")
            run.streams[doc["uid"]] = stream
        elif name in ("event", "event_page"):
            of_stream = run.streams.get(str(doc.get("descriptor")))
            if of_stream is None:
                raise BadRunDocument(f"{_describe(name, doc)} of a descriptor not in this run")
            seq = run.seq_nums.setdefault(of_stream, SeqNums())
            for value in [doc["seq_num"]] if name == "event" else doc["seq_num"]:
                seq.add(int(value))
        elif name == "stream_resource":
            check_key(doc.get("data_key"), "stream_resource data key")
        run.tiled.feed(name, doc)

    # ------------------------------------------------------------- verification
    def _verify_run(self, run: ActiveRun) -> dict[str, int]:
        """Rows per stream in Tiled, checked against what was fed; raise VerificationFailed otherwise."""
        streams = set(run.seq_nums) | set(run.tiled.events)
        return {stream: self._verify(run, stream) for stream in sorted(streams)}

    def _verify(self, run: ActiveRun, stream: str) -> int:
        """Rows of `stream` in Tiled: exactly the seq_nums fed, in the order they were fed."""
        fed = run.seq_nums.get(stream, SeqNums())
        tiled = read_seq_nums(self.client, run.uid, stream)
        if tiled is None:
            if fed.count == 0:
                return 0
            raise VerificationFailed(f"run {run.uid} stream {stream}: no table in Tiled after upload")
        if SeqNums.of(tiled) != fed:
            raise VerificationFailed(f"run {run.uid} stream {stream}: {fed.describe_difference(tiled)}")
        return len(tiled)

    # ------------------------------------------------------------- failures of one run
    def _run_failed(self, view: RunView, err: Exception, *, fed: int) -> None:
        """One run's activation or pass failed: quarantine it, or forget it and re-raise (backoff, rewrite)."""
        outcome = classify(err)
        uid = view.directory.name
        if outcome is Outcome.STOP:
            raise err
        if outcome is Outcome.QUARANTINE:
            self._quarantine(view, one_line(err))
            return
        if outcome is Outcome.REJECTED and self._tiled_reachable():
            key = rejection_key(err, fed)
            last, times = self.rejections.get(uid, ("", 0))
            times = times + 1 if key == last else 1
            self.rejections[uid] = (key, times)
            if times >= REJECTIONS_TO_QUARANTINE:
                self._quarantine(
                    view, f"rejected {times} times in a row while Tiled answered: {one_line(err)}"
                )
                return
            log.debug("run %s: rejection %d of %d", clean(uid), times, REJECTIONS_TO_QUARANTINE, exc_info=err)
        if uid in self.active:
            self._abandon(self.active[uid], err)
        raise err

    def _quarantine(self, run: ActiveRun | RunView, reason: str) -> None:
        view = run.view if isinstance(run, ActiveRun) else run
        uid = view.directory.name
        uploaded = view.uploaded
        uploaded.state = UploadState.QUARANTINED
        uploaded.reason = reason
        self.active.pop(uid, None)
        self.rejections.pop(uid, None)
        self.done.add(uid)  # not retried by this process (replay of that run retries it once)
        self.status.runs_quarantined += 1
        self.status.last_error = f"run {clean(uid, 80)} quarantined: {reason}"
        log.error("run %s quarantined: %s", clean(uid, 80), reason)
        try:
            uploaded.save(view.directory)
        except OSError as err:  # shown in the log; the run is not retried by this process
            log.error("run %s: cannot record its quarantine: %s", clean(uid, 80), one_line(err))

    # ------------------------------------------------------------- failures
    def _abandon(self, run: ActiveRun, err: Exception) -> None:
        """Forget one in-flight run after a failure: it stays `uploading` and is rewritten."""
        self.active.pop(run.uid, None)
        if isinstance(err, VerificationFailed):
            log.warning("%s; rewriting the run", err)
        else:
            log.warning("run %s: upload failed (%s); it will be rewritten", run.uid, one_line(err))

    def _on_failure(self, err: Exception) -> None:
        """A step failed (any run it broke is abandoned already): back off, then go on."""
        self.status.retries += 1
        outcome = classify(err)
        if outcome in (Outcome.REWRITE, Outcome.REJECTED, Outcome.QUARANTINE):
            self.status.last_error = one_line(err)
        elif is_auth_error(err):
            self.client = None
            self._set_tiled("unauthorized", one_line(err))
        elif not isinstance(err, TiledDown) and self._tiled_reachable():
            log.warning("upload failed, Tiled is reachable: %s", one_line(err))
            self.status.last_error = one_line(err)
        else:
            self.client = None
            self._set_tiled("down", str(err) if isinstance(err, TiledDown) else one_line(err))
        self._write_status(force=True)
        self._give_up_if_too_long(err)
        self.stop_event.wait(self.backoff.next_delay())

    def _wait_before_retry(self, err: Exception) -> None:
        """A run's append failed transiently: report it, back off; it is then retried in place."""
        self.status.retries += 1
        self.status.append_retries += 1
        backoff = self.backoff
        if self._tiled_reachable():
            if self._failing_since is None:
                log.warning("append failed, Tiled is reachable; retrying it in place: %s", one_line(err))
            self.status.last_error = one_line(err)
            backoff = self.busy_backoff
        else:
            self._set_tiled("down", one_line(err))
        self._write_status(force=True)
        self._give_up_if_too_long(err)
        if self.stop_event.wait(backoff.next_delay()):
            raise Stopping

    def _recovered(self) -> None:
        """A request succeeded after failures (or a step went through): reset the backoff."""
        if self._failing_since is not None:
            self._failing_since = None
            self.backoff.reset()
            self.busy_backoff.reset()
            if self.client is not None:
                self._set_tiled("up")

    def _give_up_if_too_long(self, err: Exception) -> None:
        now = time.monotonic()
        self._failing_since = self._failing_since or now
        if self.give_up_after is not None and now - self._failing_since > self.give_up_after:
            raise TiledUnavailableError(
                f"giving up after {now - self._failing_since:.0f} s: {self.config.tiled.uri}: {one_line(err)}"
            )

    def _tiled_reachable(self) -> bool:
        """Whether Tiled's server answers at all (one GET on a client kept for this).

        Cheap on purpose: it is asked on every failure, and before every
        reconnection while Tiled is down (a new HTTP client costs ~20 ms of
        CPU to load the TLS trust store).
        """
        server = urlsplit(self.config.tiled.uri)
        if self._probe is None:
            self._probe = httpx.Client(timeout=5)
        try:
            response = self._probe.get(f"{server.scheme}://{server.netloc}/api/v1/")
        except httpx.HTTPError as err:
            self._probe_error = one_line(err)
            return False
        self._probe_error = None if response.status_code < 500 else f"HTTP {response.status_code}"
        return response.status_code < 500

    def _set_tiled(self, state: str, error: str | None = None) -> None:
        if error:
            self.status.last_error = error
        if state == self.status.tiled:
            return
        previous, since = self.status.tiled, self.status.since
        self.status.tiled, self.status.since = state, time.time()
        if state == "up":
            if previous in ("down", "unauthorized"):
                log.warning("tiled up again uri=%s after %.1f s", self.config.tiled.uri, time.time() - since)
            else:
                log.info("tiled connected uri=%s", self.config.tiled.uri)
        elif state == "unauthorized":
            log.error(
                "tiled unauthorized: check the API key (TILED_API_KEY or api_key_file); data stays spooled"
            )
        else:
            log.warning(
                "tiled down uri=%s: %s; retrying with backoff, data stays spooled",
                self.config.tiled.uri,
                error,
            )

    def _write_status(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_status_write < STATUS_INTERVAL_S:
            return
        self._last_status_write = now
        self.status.updated = now
        try:
            self.status.save(self.spool.root)
        except OSError:
            pass

    def _shutdown(self) -> None:
        """Stopping (or idle): in-flight runs stay `uploading` and are rewritten on the next start."""
        for uid in self.active:
            log.info("run %s: upload interrupted by shutdown; it will be rewritten", uid)
        self.active.clear()
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        if self.client is not None:
            self.client.context.close()
            self.client = None
        self._write_status(force=True)


def _age(view: RunView) -> tuple[float, str]:
    """Sort key: oldest first (a hostile received.json may hold anything there)."""
    first = view.received.first_received
    return (float(first) if isinstance(first, (int, float)) else 0.0, view.directory.name)


def _describe(name: str, doc: dict[str, Any]) -> str:
    """A document named for a reason: kind and uid, escaped and bounded."""
    return f"{clean(name, 40)} {clean(doc.get('uid'), 80)!r}"
