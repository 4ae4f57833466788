"""The uploader: drains the spool into Tiled, run by run, exactly once.

State machine of a run (``uploaded.json``)::

    pending ──> uploading ──> uploaded            (segments released)
                   │  ^
                   │  └── Tiled down / restarted / verification failed:
                   │      delete the partial run in Tiled, rewrite it whole
                   └────> quarantined             (Tiled rejected it for good)

Resume strategy: *delete and rewrite*. TiledWriter's state for a run (nodes,
consolidators, buffered rows) lives in memory and a write whose response was
lost may or may not have landed, so after any interruption the uploader
deletes what Tiled holds of the run (only runs it marked ``uploading``
itself) and replays the run's log from the first record. The spool keeps a
run until this succeeds, so the rewrite is always possible. When a run is
finished, the uploader reads back each stream's ``seq_num`` column and checks
it against what it fed: no row missing, none twice; otherwise it rewrites.

Batching: rows are flushed when TiledWriter's ``batch_size`` (= ``batch_rows``)
is reached or ``batch_seconds`` after the first buffered row, whichever
comes first. Tiled errors are retried forever with exponential backoff and
jitter; one log line per state change (down, up again), not per retry.
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
from .spool.index import Received, RunView, atomic_write_json
from .spool.segment import LogReader
from .tiled_client import connect, delete_run, read_seq_nums, run_exists
from .tiled_run import TiledRun

log = logging.getLogger(__name__)

MAX_ACTIVE_RUNS = 4
RECORDS_PER_PUMP = 5000
IDLE_WAIT_S = 0.05
MAX_ATTEMPTS_BEFORE_QUARANTINE = 10
STATUS_INTERVAL_S = 1.0


class Transient(Exception):
    """Tiled is unreachable or answered 5xx/429/auth: wait and retry."""


class VerificationFailed(Transient):
    """Tiled's rows for a run differ from what was fed: rewrite the run."""


class RunRejected(Exception):
    """This run cannot be written (a 4xx from Tiled, a bad document)."""


def classify(err: BaseException) -> type[Exception]:
    """Map an exception from the Tiled client to Transient or RunRejected."""
    if isinstance(err, (Transient, RunRejected)):
        return type(err)
    if isinstance(err, httpx.HTTPStatusError):
        code = err.response.status_code
        if code >= 500 or code in (401, 403, 408, 429):
            return Transient
        return RunRejected
    if isinstance(err, (httpx.TransportError, TiledUnauthorizedError, ConnectionError, TimeoutError)):
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
        self.active: dict[str, ActiveRun] = {}
        self.status = UploaderStatus()
        self._last_status_write = 0.0
        self.backoff = Backoff(config.tiled.backoff_initial_seconds, config.tiled.backoff_max_seconds)

    # ------------------------------------------------------------- the loop
    def run(self, *, until_idle: bool = False) -> None:
        """Upload until stopped (or, with `until_idle`, until nothing is left)."""
        while not self.stop_event.is_set():
            try:
                progressed = self.step()
            except Exception as err:  # noqa: BLE001 - every failure is classified
                self._on_failure(err)
                continue
            self._failing_since = None
            self._write_status()
            if until_idle and not progressed and not self._work_left():
                return
            if not progressed:
                self.wake.wait(IDLE_WAIT_S)
                self.wake.clear()
        self._shutdown()

    def step(self) -> bool:
        """One pass over the runs; True if anything was uploaded."""
        if self.client is None:
            self.client = connect(self.config)
            self._set_tiled("up")
        for view in self._candidates():
            if view.uid not in self.active and len(self.active) < MAX_ACTIVE_RUNS:
                self._activate(view)
        progressed = False
        for run in list(self.active.values()):
            try:
                progressed |= self._pump(run)
            except Exception as err:
                if classify(err) is RunRejected and self._tiled_reachable():
                    self._quarantine(run, one_line(err))
                    continue
                raise
        return progressed

    def _candidates(self) -> list[RunView]:
        views = []
        for view in self.spool.runs():
            if self.only is not None:
                if view.uid in self.only and view.uploaded.state != "uploaded":
                    views.append(view)
            elif view.uploaded.state in ("pending", "uploading"):
                views.append(view)
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
        tiled_run = TiledRun(self.client, self.config.tiled.batch_rows)
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
        self.backoff.reset()
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
        self.status.runs_quarantined += 1
        log.error("run %s quarantined: %s", run.view.uid, reason)

    # ------------------------------------------------------------- failures
    def _on_failure(self, err: Exception) -> None:
        """Forget in-flight runs (they will be rewritten), then back off and retry."""
        abandoned = list(self.active.values())
        self.active.clear()
        for run in abandoned:
            if run.view.uploaded.attempts >= MAX_ATTEMPTS_BEFORE_QUARANTINE:
                self._quarantine(run, f"gave up after {run.view.uploaded.attempts} attempts: {one_line(err)}")
        self.status.retries += 1
        if isinstance(err, VerificationFailed):
            log.warning("%s; rewriting the run", err)
        elif _is_auth_error(err):
            self.client = None
            self._set_tiled("unauthorized", one_line(err))
        elif self._tiled_reachable():
            log.exception("upload failed, Tiled is reachable; in-flight runs will be rewritten")
        else:
            self.client = None
            self._set_tiled("down", one_line(err))
        self._write_status(force=True)
        now = time.monotonic()
        self._failing_since = self._failing_since or now
        if self.give_up_after is not None and now - self._failing_since > self.give_up_after:
            raise TiledUnavailableError(
                f"giving up after {now - self._failing_since:.0f} s: {self.config.tiled.uri}: {one_line(err)}"
            )
        self.stop_event.wait(self.backoff.next_delay())

    def _tiled_reachable(self) -> bool:
        server = urlsplit(self.config.tiled.uri)
        try:
            response = httpx.get(f"{server.scheme}://{server.netloc}/api/v1/", timeout=5)
        except httpx.HTTPError:
            return False
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
        """Stopping: in-flight runs stay `uploading` and are rewritten on the next start."""
        for uid in self.active:
            log.info("run %s: upload interrupted by shutdown; it will be rewritten", uid)
        self.active.clear()
        self._write_status(force=True)


def _is_auth_error(err: BaseException) -> bool:
    return isinstance(err, TiledUnauthorizedError) or (
        isinstance(err, httpx.HTTPStatusError) and err.response.status_code in (401, 403)
    )
