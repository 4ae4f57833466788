"""Ingest: the one path from a decoded document to a spooled record.

`Ingest` composes a `RunTracker` (routing, ownership, gaps, caps) and a
`RunSpooler` (staging, writes, drops, ``received.json``); the receiver and
`import-backup` feed documents through it, `replay` closes abandoned runs
with it. Contract:

- `accept` validates, routes and stages one document (a stop closes its
  run), or raises `RejectedMessage` with nothing changed; any other
  exception becomes ``internal-error:<Type>``.
- At most ``max_open_runs`` runs are open: a new run is never refused, the
  idlest one is closed instead.
- `recover` takes over the runs left open in the spool by replaying their
  logs (kept open, or closed with a reason); it never raises.
- `upkeep` closes idle runs and writes, commits and saves as the spooler
  says; `shutdown` writes everything and leaves open runs open.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import Any

from .config import SpoolConfig
from .errors import RejectedMessage, ValidationError
from .spool.codec import pack_document
from .spool.directory import SpoolDir
from .spool.index import Received
from .spooler import RunSpooler, SpooledRun
from .stats import ReceiverStats
from .tracker import RunTracker, TrackedRun, plain_float
from .validation import validate_document

log = logging.getLogger(__name__)

SAVE_INTERVAL_S = 1.0
SPOOL_SIZE_INTERVAL_S = 2.0


def internal_error(err: BaseException) -> RejectedMessage:
    """A rejection for an exception nobody expected: its type names the reason, its place the detail."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb else "?"
    return RejectedMessage(f"internal-error:{type(err).__name__}", f"at {where}")


def describe(err: BaseException) -> str:
    """``Type: message`` of an exception, bounded, even if its ``str()`` fails."""
    try:
        text = str(err)[:200]
    except Exception:  # noqa: BLE001  # str() itself failed (a huge int, say)
        text = ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class Ingest:
    """Routes and spools decoded documents; see the module docstring."""

    def __init__(self, config: SpoolConfig, spool: SpoolDir, stats: ReceiverStats) -> None:
        self.config = config
        self.spool = spool
        self.stats = stats
        self.tracker = RunTracker(on_gap=self._gap)
        self.spooler = RunSpooler(config, spool, stats)
        self._last_save = self._last_size_check = 0.0

    def accept(self, name: str, doc: dict[str, Any]) -> None:
        """Validate, route and stage one document; RejectedMessage (and nothing changed) if it cannot be."""
        try:
            validate_document(name, doc)
            payload = pack_document(name, doc)  # first: a document that cannot be stored is not counted
            if name == "start":
                self._start(doc, payload)
                return
            run = self.tracker.route(name, doc)
            self.spooler.stage(self.spooler.runs[run.uid], name, payload)
            if name == "stop":
                self.close_run(run, "stop")
        except RejectedMessage:
            raise
        except Exception as err:  # noqa: BLE001  # confined to this document
            raise internal_error(err) from None

    def close_all(self, reason: str) -> None:
        """Close every open run with `reason`."""
        for run in list(self.tracker.runs.values()):
            self.close_run(run, reason)

    def close_run(self, run: TrackedRun, reason: str) -> None:
        received = run.received
        received.closed, received.close_reason = True, reason
        self.tracker.close(run)
        spooled = self.spooler.runs.get(run.uid)
        if spooled is not None:
            self.spooler.close(spooled)
        problems = received.problems()
        log.info(
            "run closed uid=%s documents=%d %s",
            run.uid,
            received.documents,
            "problems=" + "; ".join(problems) if problems else "complete",
        )

    def upkeep(self) -> None:
        """Close runs idle for ``run_timeout_seconds``, write and save as due, refresh the spool's size."""
        now = time.monotonic()
        save = now - self._last_save >= SAVE_INTERVAL_S
        if save:
            self._last_save = now
            timeout = self.config.run_timeout_seconds
            for run in list(self.tracker.runs.values()):
                if timeout and time.time() - run.received.last_received > timeout:
                    self.close_run(run, f"no document for {timeout:.0f} s")
        self.spooler.upkeep(save)
        if now - self._last_size_check >= SPOOL_SIZE_INTERVAL_S:
            self._last_size_check = now
            self.stats.spool_bytes = self.spool.total_bytes()

    def shutdown(self) -> None:
        """Write and save everything; open runs stay open for the next receiver."""
        self.spooler.shutdown()

    # ------------------------------------------------------------------ runs
    def _start(self, doc: dict[str, Any], payload: bytes) -> None:
        run = self.tracker.route("start", doc)
        uid = run.uid
        if self.spooler.has_run(uid):
            self.tracker.discard(run)
            raise ValidationError("repeated-start", uid)
        self._make_room(run)
        try:
            spooled = self._open(run.received)
        except OSError as err:
            self.tracker.discard(run)
            self.spooler.trouble(f"cannot create run {uid} in the spool: {err.strerror}")
            self.stats.dropped += 1
            return
        self.stats.runs_started += 1
        received = run.received
        log.info("run start uid=%s scan_id=%s plan=%r", uid, received.scan_id, received.plan_name)
        self.spooler.stage(spooled, "start", payload)

    def _open(self, received: Received) -> SpooledRun:
        """Create the run's log; if the process is out of file descriptors, close the idlest run and retry."""
        try:
            return self.spooler.open(received)
        except OSError as err:
            idlest = self.tracker.idlest(but=received.uid)
            if err.errno not in (errno.EMFILE, errno.ENFILE) or idlest is None:
                raise
            self.close_run(idlest, "closed: the process ran out of file descriptors")
            return self.spooler.open(received)

    def _make_room(self, new: TrackedRun) -> None:
        """Keep at most ``max_open_runs`` open: close the runs idle for the longest."""
        limit = self.config.max_open_runs
        while len(self.tracker.runs) > limit:
            idlest = self.tracker.idlest(but=new.uid)
            if idlest is None:
                return
            self.close_run(idlest, f"closed: more than max_open_runs={limit} runs open")

    def _gap(self, run: TrackedRun, stream: str, first: int, last: int) -> None:
        missing = last - first + 1
        self.stats.gaps += missing
        log.warning("gap run=%s stream=%r missing=%d seq_num %d..%d", run.uid, stream, missing, first, last)

    # -------------------------------------------------------------- recovery
    def recover(self, close_reason: str | None = None) -> list[tuple[str, str]]:
        """Take over the runs left open in the spool; return (uid, reason) of each run it closed.

        Each run's log is replayed through the tracker, so its counters and
        gaps are exact. Without `close_reason` (the receiver) a run stays
        open, except beyond ``max_open_runs`` (the idlest are closed); with
        it (`replay`) every run is closed with it. A run whose stop is in its
        log is closed by it; a log that cannot be replayed closes its run.
        """
        try:
            views = self.spool.runs()
        except Exception as err:  # noqa: BLE001  # go on; the uploader will say what is wrong
            log.error("cannot list the runs in the spool (%s)", describe(err))
            return []
        for view in views:
            if view.received.closed:
                self.tracker.closed_runs[view.uid] = None
        left_open = [view.received for view in views if not view.received.closed]
        # One file descriptor at a time, never more than the bound: the idlest are closed.
        left_open.sort(key=lambda received: plain_float(received.last_received) or 0.0)
        excess = len(left_open) - self.config.max_open_runs
        crowded = f"closed at start-up: more than max_open_runs={self.config.max_open_runs} runs open"
        closed = []
        for n, received in enumerate(left_open):
            reason = self._recover_run(received, close_reason or (crowded if n < excess else None))
            if reason is not None:
                closed.append((received.uid, reason))
        return closed

    def _recover_run(self, received: Received, close_reason: str | None) -> str | None:
        """Replay one run's log and reopen it; the reason it was closed instead, or None."""
        try:
            run = self.tracker.replay(received, self.spooler.read_back(received))
            spooled = self.spooler.resume(run.received)
        except Exception as err:  # noqa: BLE001  # this run only
            reason = f"its log could not be replayed ({describe(err)})"
            log.warning("run %s closed: %s", received.uid, reason)
            failed = self.tracker.runs.get(received.uid)
            if failed is not None:
                self.tracker.close(failed)
            self.spooler.close_unopened(received, reason)
            return reason
        if received.stop_received:
            close_reason = "stop"
        if close_reason is not None:
            self.close_run(run, close_reason)
            return close_reason
        self.spooler.save(spooled)
        log.info("run reopened uid=%s documents=%d", run.uid, received.documents)
        return None
