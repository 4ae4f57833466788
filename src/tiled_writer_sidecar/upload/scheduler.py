"""The uploader's scheduler: which runs are uploaded, by which worker, and what a failure costs.

A run's state machine is in ``uploaded.json`` (`spool.state_files.UploadState`)::

    pending ──> uploading ──> uploaded           (segments released)
                   │  ^
                   │  └── failed, backing off, or interrupted: rewritten whole (if this spool created it)
                   └────> quarantined            (the run cannot be uploaded; `replay UID` retries it)

- Runs come from `RunIndex` (in memory, refreshed incrementally; a big spool is
  indexed in chunks while the oldest runs already upload). Lanes: every
  open run (the one being acquired) is activated at once, never behind the
  backlog; closed runs, oldest first, while fewer than ``[tiled] runs_in_flight``
  of them are in flight (a run of at least ``batch_rows`` rows alone). Runs in memory are bounded by ``max_open_runs +
  runs_in_flight``; beyond it the longest idle open run is parked.
- Each active run's start and pump run in a pool of worker threads (one run
  in one worker at a time, a pass of at most `PASS_S`); this thread only
  schedules, collects results and writes ``uploader.json``. The counters every run
  adds to (`UploadContext.status`) are updated under `UploadContext.lock`.
- Every failure is decided once, by `policy.decide`, and branched on by its
  outcome. One run's (`_run_failed`): STOP stops the uploader; QUARANTINE
  quarantines the run; UNAUTHORIZED, or any other while Tiled does not answer
  (its root or its catalog), is Tiled-wide: handed up as `policy.Decided`,
  and everyone pauses on `TiledLink.failed`; else it is the run's own
  problem: it alone backs off (`RunRetry`: per-run backoff with a not-before
  time) and is quarantined once the rule's repeats or `MAX_RUN_FAILURES` are
  reached. A step's own failure is decided in `run`.
- ``uploader.json`` (`UploaderStatus`) is written at most once a second (at
  once on a state change), with the drain rate over `RATE_WINDOW_S` and the
  backlog's ETA; on shutdown runs in flight stay ``uploading``.

One run's upload is `run_upload`, the Tiled connection `connection`; the
reasons are in docs/design.md ("Upload").
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, assert_never

from tiled_writer_sidecar.backoff import Backoff
from tiled_writer_sidecar.config import Config, TiledConfig
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.lag import LagHistogram
from tiled_writer_sidecar.spool.state_files import (
    Received,
    RunView,
    Uploaded,
    UploaderStatus,
)
from tiled_writer_sidecar.upload.connection import TiledLink
from tiled_writer_sidecar.upload.policy import (
    MAX_RUN_FAILURES,
    Decided,
    Outcome,
    Stopping,
    decide,
    failure_key,
    one_line,
)
from tiled_writer_sidecar.upload.run_index import RunIndex, age_of
from tiled_writer_sidecar.upload.run_upload import RunUpload, UploadContext, quarantine
from tiled_writer_sidecar.upload.run_writer import check_tiledwriter_api

log = logging.getLogger(__name__)

#: Closed runs uploaded at once by default (open runs, the live lane, do not count): ``[tiled]
#: runs_in_flight``. Several in flight hide each run's ~9 sequential round trips (docs/design.md).
MAX_ACTIVE_RUNS = TiledConfig.runs_in_flight
LIVE_WORKERS = 1  # workers beyond MAX_ACTIVE_RUNS: open runs never queue behind the backlog
PASS_S = 1.0  # a worker gives its run back at least this often (stop, fairness)
IDLE_WAIT_S = 0.05
STATUS_INTERVAL_S = 1.0
RATE_WINDOW_S = 60.0  # the drain rate in uploader.json is measured over this window
RUN_BACKOFF_MAX_S = 30.0  # the longest a failing run waits before its next attempt

__all__ = ["MAX_ACTIVE_RUNS", "Uploader"]


@dataclass
class Slot:
    """One run in flight: its view, its upload once started, the worker's pass in progress."""

    view: RunView
    live: bool  # open when activated: the live lane, never counted against MAX_ACTIVE_RUNS
    large: bool = False  # closed, at least one batch of rows: uploaded alone (see `Uploader._schedule`)
    run: RunUpload | None = None
    future: Future[bool] | None = None

    @property
    def uid(self) -> str:
        return self.view.directory.name

    @property
    def busy(self) -> bool:
        """Holds a backlog slot: a closed run with work left (not started yet, or not caught up)."""
        return not self.live and (self.run is None or self.run.busy)

    @property
    def idle(self) -> bool:
        return self.future is None and self.run is not None and self.run.idle


@dataclass
class RunRetry:
    """A run's failures while Tiled answered: its own backoff, and what quarantines it."""

    backoff: Backoff
    key: str = ""
    repeats: int = 0
    failures: int = 0


@dataclass
class DrainRate:
    """Runs and rows per second over the last `RATE_WINDOW_S` (samples of the cumulative counts)."""

    samples: collections.deque[tuple[float, int, int]] = field(default_factory=collections.deque)

    def sample(self, status: UploaderStatus, backlog: int) -> None:
        now = time.monotonic()
        self.samples.append((now, status.runs_uploaded, status.rows))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()
        first, last = self.samples[0], self.samples[-1]
        seconds = last[0] - first[0]
        rates = ((last[1] - first[1]) / seconds, (last[2] - first[2]) / seconds) if seconds >= 1.0 else None
        status.note_backlog(backlog, rates)


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
        overwrite_foreign: bool = False,
        workers: int | None = None,
    ) -> None:
        check_tiledwriter_api()  # an unsupported bluesky-tiled-plugins fails here, in one line
        self.config = config
        self.spool = spool
        self.only = only
        self.stop_event = stop or threading.Event()
        self.wake = threading.Event()
        self.status = UploaderStatus()
        self.lock = threading.Lock()
        self.link = TiledLink(
            config,
            self.status,
            stop=self.stop_event,
            report=lambda: self._write_status(force=True),
            give_up_after=give_up_after,
        )
        self.context = UploadContext(
            config, spool, self.link, self.status, LagHistogram(), self.lock, overwrite_foreign
        )
        self.index = RunIndex(spool, only)
        self.active: dict[str, Slot] = {}
        self.retries: dict[str, RunRetry] = {}
        self.max_active = config.tiled.runs_in_flight
        self.max_in_memory = config.spool.max_open_runs + self.max_active
        self.workers = self.max_active + LIVE_WORKERS if workers is None else workers
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="upload") if self.workers else None
        self._rate = DrainRate()
        self._last_status_write = 0.0

    @property
    def done(self) -> set[str]:
        """Runs seen uploaded or quarantined: never candidates again (unless replayed by uid)."""
        return self.index.done

    @property
    def parked(self) -> dict[str, Any]:
        return self.index.parked

    # ------------------------------------------------------------- the loop
    def run(self, *, until_idle: bool = False) -> None:
        """Upload until stopped (or, with `until_idle`, until nothing is left)."""
        try:
            while not self.stop_event.is_set():
                try:
                    progressed = self.step()
                except Exception as raised:  # noqa: BLE001 - decided once (here or in _run_failed), acted on
                    failure = raised if isinstance(raised, Decided) else Decided(raised, decide(raised))
                    if failure.rule.outcome is Outcome.STOP:
                        if isinstance(failure.err, Stopping):
                            break
                        raise failure.err from None  # gave up waiting for Tiled (replay): one line
                    self.link.failed(failure.err, failure.rule)  # Tiled-wide: everyone pauses
                    continue
                if progressed:
                    self.link.recovered()
                self._write_status()
                if until_idle and not progressed and not self._work_left():
                    break
                if not progressed and not self.index.indexing:  # else index the next chunk at once
                    self.wake.wait(IDLE_WAIT_S)
                    self.wake.clear()
        finally:
            self._shutdown()

    def step(self) -> bool:
        """Collect the workers' passes, schedule, start new passes; True if any run progressed."""
        self.link.connected()
        progressed = self._collect()
        self.index.refresh()
        self._schedule()
        self._dispatch()
        if self._pool is None:  # inline (tests): each pass ran already
            progressed |= self._collect()
        return progressed

    # ------------------------------------------------------------- workers
    def _dispatch(self) -> None:
        """Start a pass for every active run that has none in progress."""
        for slot in list(self.active.values()):
            if slot.future is not None or self.stop_event.is_set():
                continue
            if slot.run is not None and not slot.run.has_news():
                continue  # an open run waiting for documents: a stat here, no pass
            if self._pool is None:
                future: Future[bool] = Future()
                try:
                    future.set_result(self._work(slot))
                except Exception as err:  # noqa: BLE001 - collected as a worker's would be
                    future.set_exception(err)
                slot.future = future
            else:
                slot.future = self._pool.submit(self._work, slot)

    def _work(self, slot: Slot) -> bool:
        """One pass of one run, in a worker: start it if needed, then pump for at most PASS_S."""
        try:
            if slot.run is None:
                slot.run = RunUpload.start(slot.view, self.context)
            run = slot.run
            deadline = time.monotonic() + PASS_S
            progressed = False
            while not self.stop_event.is_set():
                moved = run.pump()
                progressed |= moved
                if run.finished or not moved or time.monotonic() >= deadline:
                    break
            return progressed
        finally:
            self.wake.set()

    def _collect(self) -> bool:
        """Handle every finished pass: a run done, a run failed (decided here), or a run to go on."""
        progressed = False
        for slot in list(self.active.values()):
            future = slot.future
            if future is None or not future.done():
                continue
            slot.future = None
            err = future.exception()
            if err is not None:
                fed = slot.run.fed if slot.run is not None else 0
                self._run_failed(slot.view, err if isinstance(err, Exception) else RuntimeError(err), fed=fed)
                continue
            progressed |= future.result()
            if slot.run is not None and slot.run.finished:
                del self.active[slot.uid]
                self.retries.pop(slot.uid, None)
                self.index.finished(slot.uid)
        return progressed

    # ------------------------------------------------------------- scheduling
    def _schedule(self) -> None:
        """Activate every open run (live lane), then the oldest closed runs while slots are free."""
        live = self.index.live()
        for n, view in enumerate(live):
            if len(self.active) >= self.max_in_memory and not self._park_idle_run():
                for later in live[n:]:  # no room now: offered again on the next pass
                    self.index.again(later.directory.name)
                break
            self._activate(view, live=True)
        while True:
            busy = [slot for slot in self.active.values() if slot.busy]
            if len(busy) >= self.max_active or any(slot.large for slot in busy):
                break
            oldest = self.index.next_closed()
            if oldest is None:
                break
            large = self._large(oldest)
            if (busy and large) or (len(self.active) >= self.max_in_memory and not self._park_idle_run()):
                self.index.again(oldest.directory.name)  # offered again once the runs in flight are done
                break
            self._activate(oldest, live=False, large=large)

    def _large(self, view: RunView) -> bool:
        """A run of at least one batch (`batch_rows`) is uploaded alone: several at once would hold several
        batches in memory (the uploader's RSS budget) and gain nothing (Tiled writes one table at a time)."""
        received = view.received
        rows = sum(max(n, received.datum_rows.get(s, 0)) for s, n in received.events.items())
        return max(rows, received.documents) >= self.config.tiled.batch_rows

    def _activate(self, view: RunView, *, live: bool, large: bool = False) -> None:
        slot = Slot(view, live=live, large=large)
        self.active[slot.uid] = slot

    def _park_idle_run(self) -> bool:
        """Forget the longest idle caught-up open run to make room; False if there is none."""
        idle = [slot for slot in self.active.values() if slot.live and slot.idle]
        if not idle:
            return False
        slot = min(idle, key=lambda s: s.run.last_read if s.run is not None else 0.0)
        self.active.pop(slot.uid)
        received = Received.load(slot.view.directory) or slot.view.received
        self.index.park(slot.uid, slot.view.directory, age_of(received, slot.uid))
        log.info(
            "run %s: parked (idle, open; %d runs in memory); rewritten when it goes on",
            slot.uid,
            len(self.active),
        )
        return True

    def _work_left(self) -> bool:
        return bool(self.active) or self.index.work_left()

    # ------------------------------------------------------------- failures of one run
    def _run_failed(self, view: RunView, err: Exception, *, fed: int) -> None:
        """Decide one run's failure once: stop, quarantine it, pause everyone (handed up as `Decided`), or
        back it off alone."""
        rule = decide(err)
        uid = view.directory.name
        slot = self.active.pop(uid, None)
        match rule.outcome:
            case Outcome.STOP:
                raise Decided(err, rule)  # the loop ends; the run stays as it is in the spool
            case Outcome.QUARANTINE:
                self._quarantine(view, one_line(err))
                return
            case (
                Outcome.UNAUTHORIZED | Outcome.TILED_DOWN | Outcome.RETRY | Outcome.REWRITE | Outcome.REJECTED
            ):
                if slot is not None and slot.run is not None:
                    slot.run.abandon(err)
                if rule.outcome is Outcome.UNAUTHORIZED or not self.link.reachable():
                    self.index.again(uid)  # Tiled-wide: retried with everyone once Tiled answers again
                    raise Decided(err, rule)
            case unknown:
                assert_never(unknown)
        counted = rule.repeats is not None
        retry = self.retries.setdefault(
            uid, RunRetry(Backoff(self.config.tiled.backoff_initial_seconds, RUN_BACKOFF_MAX_S))
        )
        if counted:
            key = failure_key(err, fed)
            retry.repeats = retry.repeats + 1 if key == retry.key else 1
            retry.key = key
            retry.failures += 1
            assert rule.repeats is not None
            if retry.repeats >= rule.repeats:
                self._quarantine(
                    view, f"failed {retry.repeats} times the same way while Tiled answered: {one_line(err)}"
                )
                return
            if retry.failures >= MAX_RUN_FAILURES:
                self._quarantine(view, f"failed {retry.failures} times while Tiled answered: {one_line(err)}")
                return
        delay = retry.backoff.next_delay()
        uploaded = Uploaded.load(view.directory)  # status shows why it waits (the next start clears it)
        uploaded.note_waiting(
            f"attempt {uploaded.attempts} failed, retried in {delay:.0f} s: {one_line(err)}"
        )
        try:
            uploaded.save(view.directory)
        except OSError:
            pass
        with self.lock:
            self.status.note_retry(f"run {uid}: {one_line(err)}")
        log.warning(
            "run %s: %s (%s); it backs off %.1f s (failure %d of at most %d)",
            uid,
            rule.outcome,
            one_line(err),
            delay,
            retry.failures,
            MAX_RUN_FAILURES,
        )
        self.index.later(uid, time.monotonic() + delay)
        self._write_status(force=True)

    def _quarantine(self, view: RunView, reason: str) -> None:
        uid = view.directory.name
        self.active.pop(uid, None)
        self.retries.pop(uid, None)
        self.index.finished(uid)  # not retried by this process (replay of that run retries it once)
        with self.lock:
            quarantine(view, reason, self.status)
        self._write_status(force=True)

    # ------------------------------------------------------------- status and shutdown
    def _write_status(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_status_write < STATUS_INTERVAL_S:
            return
        self._last_status_write = now
        with self.lock:
            if not force:
                self._rate.sample(self.status, self.index.waiting() + len(self.active))
            try:
                self.status.save(self.spool.root)
            except OSError:
                pass

    def _shutdown(self) -> None:
        """Stopping (or idle): in-flight runs stay `uploading` and are rewritten on the next start."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="upload")
        for uid in self.active:
            log.info("run %s: upload interrupted by shutdown; it will be rewritten", uid)
        for uid in list(self.active):
            self.index.again(uid)
        self.active.clear()
        self.link.close()
        self._write_status(force=True)
