"""The uploader's scheduler: which runs are uploaded, and the loop that drives them.

A run's state machine is in ``uploaded.json`` (`spool.index.UploadState`)::

    pending ──> uploading ──> uploaded           (segments released)
                   │  ^
                   │  └── failed (not resumable), stopped, or not verified: rewritten whole
                   └────> quarantined            (the run itself cannot be uploaded)

- Candidates: runs not finished (or those named by `only`), oldest first;
  runs seen finished are remembered and never looked at again.
- Slots: at most `MAX_ACTIVE_RUNS` runs with a backlog in flight; a run
  caught up with its log takes none. Runs in memory are bounded by
  ``max_open_runs + MAX_ACTIVE_RUNS``; beyond it the longest idle run is
  parked (forgotten until its document count changes or it closes).
- A failure of one run is classified (`outcomes`): quarantined, or forgotten
  and re-raised so that the loop backs off (`TiledLink.failed`); other runs go
  on. A rejection quarantines after `REJECTIONS_TO_QUARANTINE` in a row.
- ``uploader.json`` (`UploaderStatus`) is written at most once a second, and
  at once on a failure; on shutdown runs in flight stay ``uploading``.

One run's upload is `run_upload`, the Tiled connection `tiled_link`; the
reasons are in docs/design.md ("Upload").
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .config import Config
from .errors import TiledUnavailableError
from .metrics import LagHistogram
from .outcomes import REJECTIONS_TO_QUARANTINE, Outcome, Stopping, classify, one_line, rejection_key
from .run_upload import RECORDS_PER_PUMP, RunUpload, Shared, quarantine
from .spool.directory import SpoolDir
from .spool.index import Received, RunView, Uploaded, UploaderStatus, UploadState
from .text import clean
from .tiled_link import TiledLink
from .tiled_run import check_tiledwriter_api

log = logging.getLogger(__name__)

MAX_ACTIVE_RUNS = 4  # runs with a backlog, uploaded at once (caught-up open runs do not count)
IDLE_WAIT_S = 0.05
STATUS_INTERVAL_S = 1.0

__all__ = ["MAX_ACTIVE_RUNS", "RECORDS_PER_PUMP", "Uploader"]


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
        self.status = UploaderStatus()
        self.link = TiledLink(
            config,
            self.status,
            stop=self.stop_event,
            report=lambda: self._write_status(force=True),
            give_up_after=give_up_after,
        )
        self.shared = Shared(config, spool, self.link, self.status, LagHistogram())
        self.active: dict[str, RunUpload] = {}
        self.done: set[str] = set()  # runs seen uploaded (or quarantined): never candidates again
        self.parked: dict[str, int] = {}  # idle open runs put out of memory -> their documents then
        self.rejections: dict[str, tuple[str, int]] = {}  # uid -> (last rejection, times in a row)
        self.max_in_memory = config.spool.max_open_runs + MAX_ACTIVE_RUNS
        self._last_status_write = 0.0

    @property
    def client(self) -> Any:
        """The Tiled client in use (None while Tiled is down)."""
        return self.link.client

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
                self.link.failed(err)
                continue
            self.link.recovered()
            self._write_status()
            if until_idle and not progressed and not self._work_left():
                break
            if not progressed:
                self.wake.wait(IDLE_WAIT_S)
                self.wake.clear()
        self._shutdown()

    def step(self) -> bool:
        """One pass over the runs; True if anything was uploaded."""
        self.link.connected()
        self._schedule()
        progressed = False
        for run in list(self.active.values()):
            try:
                progressed |= run.pump()
            except Exception as err:  # noqa: BLE001 - classified: one run's failure never stops the others
                self._run_failed(run.view, err, fed=run.fed)
                continue
            if run.finished:
                del self.active[run.uid]
                self.done.add(run.uid)
        return progressed

    # ------------------------------------------------------------- scheduling
    def _schedule(self) -> None:
        """Activate the oldest candidates while upload slots (runs with a backlog) are free."""
        for view in self._candidates():
            if sum(run.busy for run in self.active.values()) >= MAX_ACTIVE_RUNS:
                break
            if len(self.active) >= self.max_in_memory and not self._park_idle_run():
                break
            try:
                run = RunUpload.start(view, self.shared)
            except Exception as err:  # noqa: BLE001 - classified, as above
                self._run_failed(view, err, fed=0)
                continue
            if run is not None:
                self.active[run.uid] = run

    def _park_idle_run(self) -> bool:
        """Forget the longest idle caught-up open run to make room; False if there is none."""
        idle = [run for run in self.active.values() if run.idle]
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

    # ------------------------------------------------------------- failures of one run
    def _run_failed(self, view: RunView, err: Exception, *, fed: int) -> None:
        """One run's start or pass failed: quarantine it, or forget it and re-raise (backoff, rewrite)."""
        outcome = classify(err)
        uid = view.directory.name
        if outcome is Outcome.STOP:
            raise err
        if outcome is Outcome.QUARANTINE:
            self._quarantine(view, one_line(err))
            return
        if outcome is Outcome.REJECTED and self.link.reachable():
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
        if (run := self.active.pop(uid, None)) is not None:
            run.abandon(err)
        raise err

    def _quarantine(self, view: RunView, reason: str) -> None:
        uid = view.directory.name
        self.active.pop(uid, None)
        self.rejections.pop(uid, None)
        self.done.add(uid)  # not retried by this process (replay of that run retries it once)
        quarantine(view, reason, self.status)

    # ------------------------------------------------------------- status and shutdown
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
        self.link.close()
        self._write_status(force=True)


def _age(view: RunView) -> tuple[float, str]:
    """Sort key: oldest first (a hostile received.json may hold anything there)."""
    first = view.received.first_received
    return (float(first) if isinstance(first, (int, float)) else 0.0, view.directory.name)
