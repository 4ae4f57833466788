"""The uploader: drains the spool into Tiled, run by run, exactly once.

State machine of a run (``uploaded.json``)::

    pending ──> uploading ──> uploaded            (segments released)
                   │  ^
                   │  └── this run's upload failed in a way that cannot be
                   │      resumed (see below), the uploader was stopped, or
                   │      verification failed: delete the partial run in
                   │      Tiled, rewrite it whole
                   └────> quarantined             (Tiled rejected it for good)

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
request per stream) and checks it against what it fed: no row missing,
none twice; otherwise it rewrites.

Scheduling: at most ``MAX_ACTIVE_RUNS`` runs with work to do are uploaded at
once, oldest first; a run still open (no stop yet) whose log is drained does
not count, so open runs never keep newer runs waiting. Runs already
uploaded are remembered and not looked at again, so an idle pass costs the
same however many runs the spool's history holds.

Batching: rows are flushed when TiledWriter's ``batch_size`` (= ``batch_rows``)
is reached or ``batch_seconds`` after the first buffered row, whichever
comes first. Tiled errors are retried forever with exponential backoff and
jitter; one log line per state change (down, up again), not per retry.
While Tiled is down, each retry is one GET on a kept HTTP client; a new
Tiled client is built only once the server answers again.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from .config import Config
from .errors import TiledUnauthorizedError, TiledUnavailableError
from .spool.codec import unpack_document
from .spool.directory import SpoolDir
from .spool.index import Received, RunView, Uploaded, atomic_write_json
from .spool.segment import LogReader
from .tiled_client import connect, delete_run, read_seq_nums, run_exists
from .tiled_run import AppendAmbiguous, TiledRun, retryable

log = logging.getLogger(__name__)

MAX_ACTIVE_RUNS = 4  # runs with work to do, uploaded at once
MAX_OPEN_RUNS = 64  # runs in memory at all, counting open runs that wait for more documents
RECORDS_PER_PUMP = 5000
IDLE_WAIT_S = 0.05
MAX_ATTEMPTS_BEFORE_QUARANTINE = 10
STATUS_INTERVAL_S = 1.0
BUSY_BACKOFF_INITIAL_S = 0.05  # retrying an append Tiled answered with a 5xx (see Uploader.busy_backoff)
BUSY_BACKOFF_MAX_S = 1.0


class Transient(Exception):
    """Tiled is unreachable or answered 5xx/429/auth: wait and retry."""


class VerificationFailed(Transient):
    """Tiled's rows for a run differ from what was fed: rewrite the run."""


class RunRejected(Exception):
    """This run cannot be written (a 4xx from Tiled, a bad document)."""


class TiledDown(Transient):
    """Tiled was down and still does not answer (checked before connecting again)."""


class Stopping(Exception):
    """The uploader was asked to stop while a request was being retried."""


def classify(err: BaseException) -> type[Exception]:
    """Map an exception from the Tiled client to Transient or RunRejected."""
    if isinstance(err, (Transient, RunRejected)):
        return type(err)
    if isinstance(err, AppendAmbiguous):
        return Transient
    if isinstance(err, (httpx.HTTPStatusError, httpx.TransportError)):
        return Transient if retryable(err) or _is_auth_error(err) else RunRejected
    if isinstance(err, (TiledUnauthorizedError, ConnectionError, TimeoutError)):
        return Transient
    return RunRejected


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


@dataclass
class Backoff:
    initial: float
    maximum: float
    attempt: int = 0

    def next_delay(self) -> float:
        """Exponential backoff with full jitter."""
        ceiling = min(self.maximum, self.initial * 2**self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class UploaderStatus:
    """What the uploader tells the receiver's /metrics and /healthz (uploader.json)."""

    tiled: str = "connecting"
    since: float = field(default_factory=time.time)
    last_error: str | None = None
    documents: int = 0
    rows: int = 0
    runs_uploaded: int = 0
    runs_quarantined: int = 0
    rewrites: int = 0
    retries: int = 0
    append_retries: int = 0
    flushes: int = 0
    last_lag_seconds: float | None = None
    lag_seconds: list[float] = field(default_factory=list)
    updated: float = field(default_factory=time.time)


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
        self.status = UploaderStatus()
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
        for view in self._candidates():
            busy = sum(not run.waiting for run in self.active.values())
            if busy >= MAX_ACTIVE_RUNS or len(self.active) >= MAX_OPEN_RUNS:
                break
            self._activate(view)
        progressed = False
        for run in list(self.active.values()):
            try:
                progressed |= self._pump(run)
            except (Stopping, TiledUnavailableError):
                raise
            except Exception as err:
                if classify(err) is RunRejected and self._tiled_reachable():
                    self._quarantine(run, one_line(err))
                    continue
                self._abandon(run, err)
                raise
        return progressed

    def _candidates(self) -> list[RunView]:
        """Runs to upload that are not in flight, oldest first."""
        views = []
        for run_dir in self.spool.runs_dir.iterdir():
            uid = run_dir.name
            if uid in self.done or uid in self.active:
                continue
            received = Received.load(run_dir)
            if received is None:
                continue
            view = RunView(run_dir, received, Uploaded.load(run_dir))
            state = view.uploaded.state
            if self.only is not None and uid in self.only:
                wanted = state != "uploaded"
            else:
                wanted = self.only is None and state in ("pending", "uploading")
            if wanted:
                views.append(view)
            elif state in ("uploaded", "quarantined"):
                self.done.add(uid)
        views.sort(key=lambda v: (v.received.first_received, v.uid))
        return views

    def _work_left(self) -> bool:
        return bool(self.active) or bool(self._candidates())

    # ------------------------------------------------------------- one run
    def _activate(self, view: RunView) -> None:
        uid = view.uid
        uploaded = view.uploaded
        if uploaded.state in ("uploading", "quarantined"):
            if run_exists(self.client, uid):
                log.info("run %s: deleting the partial upload before rewriting it", uid)
                delete_run(self.client, uid)
                self.status.rewrites += 1
        elif run_exists(self.client, uid):
            uploaded.state = "quarantined"
            uploaded.reason = "a run with this uid is already in Tiled (not written by this sidecar)"
            uploaded.save(view.directory)
            self.status.runs_quarantined += 1
            log.error("run %s quarantined: %s", uid, uploaded.reason)
            return
        uploaded.state = "uploading"
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
            run.tiled.feed(name, doc)
            count += 1
        run.fed += count
        for damage in run.reader.damage[damage_before:]:
            log.error("run %s: %s; skipped", run.view.uid, damage)
            run.view.uploaded.damage.append(str(damage))
        now = time.monotonic()
        if run.tiled.buffered_rows():
            if run.first_buffered is None:
                run.first_buffered = now
            elif now - run.first_buffered >= self.config.tiled.batch_seconds:
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
        rows = {stream: self._verify(uid, stream, n) for stream, n in run.tiled.events.items()}
        self.status.rows += sum(rows.values()) - run.rows_counted
        uploaded = run.view.uploaded
        uploaded.state = "uploaded"
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

    def _verify(self, uid: str, stream: str, expected: int) -> int:
        """Rows of `stream` in Tiled; raise Transient unless exactly `expected`, each once."""
        seq = read_seq_nums(self.client, uid, stream)
        if seq is None:
            if expected == 0:
                return 0
            raise VerificationFailed(f"run {uid} stream {stream}: no table in Tiled after upload")
        if len(seq) != expected or len(set(seq)) != len(seq):
            raise VerificationFailed(
                f"run {uid} stream {stream}: Tiled holds {len(seq)} rows "
                f"({len(seq) - len(set(seq))} duplicated), expected {expected}"
            )
        return len(seq)

    def _quarantine(self, run: ActiveRun, reason: str) -> None:
        uploaded = run.view.uploaded
        uploaded.state = "quarantined"
        uploaded.reason = reason
        uploaded.save(run.view.directory)
        self.active.pop(run.view.uid, None)
        if self.only is None or run.view.uid not in self.only:
            self.done.add(run.view.uid)
        self.status.runs_quarantined += 1
        log.error("run %s quarantined: %s", run.view.uid, reason)

    # ------------------------------------------------------------- failures
    def _abandon(self, run: ActiveRun, err: Exception) -> None:
        """Forget one in-flight run after a failure: it stays `uploading` and is rewritten."""
        self.active.pop(run.uid, None)
        attempts = run.view.uploaded.attempts
        if attempts >= MAX_ATTEMPTS_BEFORE_QUARANTINE:
            self._quarantine(run, f"gave up after {attempts} attempts: {one_line(err)}")
        elif isinstance(err, VerificationFailed):
            log.warning("%s; rewriting the run", err)
        else:
            log.warning("run %s: upload failed (%s); it will be rewritten", run.uid, one_line(err))

    def _on_failure(self, err: Exception) -> None:
        """A step failed (any run it broke is abandoned already): back off, then go on."""
        self.status.retries += 1
        if isinstance(err, VerificationFailed):
            pass
        elif _is_auth_error(err):
            self.client = None
            self._set_tiled("unauthorized", one_line(err))
        elif not isinstance(err, TiledDown) and self._tiled_reachable():
            log.exception("upload failed, Tiled is reachable")
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
            atomic_write_json(self.spool.root / "uploader.json", self.status.__dict__)
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


def _is_auth_error(err: BaseException) -> bool:
    return isinstance(err, TiledUnauthorizedError) or (
        isinstance(err, httpx.HTTPStatusError) and err.response.status_code in (401, 403)
    )
