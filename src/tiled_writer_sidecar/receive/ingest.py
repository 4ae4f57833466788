"""Ingest: the one path from a decoded document to a spooled record.

`Ingest` composes a `RunTracker` (routing, ownership, gaps, caps) and a
`RunSpooler` (staging, writes, drops, ``received.json``); the receiver and
`import-backup` feed documents through it, `replay` closes abandoned runs
with it. Each open run (and orphan) is one `OpenRun`: the tracker's
`TrackedRun` with the spooler's `SpooledRun` in it, held in the tracker's
tables only. A run is opened once its log exists (a start is checked, its
log created, then the run opened: nothing to undo) and leaves memory in
one place (`_forget`: closed or evicted). Contract:

- `accept` validates, routes and stages one document (a stop closes its
  run), or raises `RejectedMessage` with nothing changed; any other
  exception becomes ``internal-error:<Type>``.
- ``max_open_runs`` caps open files, not open runs (the spooler parks the
  least recently written log). At most `MAX_RUNS_IN_MEMORY` runs are held in
  memory; beyond, the idlest run that sent only its start (else the idlest)
  is evicted: still open on disk, its next document reopens it (its log is
  replayed), so nothing of it is rejected ``after-stop``.
- Orphans (`spool/orphans.py`): a document of a run whose start never came is
  spooled into an orphan; its start (or its descriptor) arriving later
  replays the orphan into the run after it and deletes the orphan.
- `recover` takes over the runs and orphans left open in the spool (kept
  open, evicted, or closed with a reason); it never raises.
- `upkeep` closes idle runs and writes, commits and saves as the spooler
  says; `shutdown` writes everything and leaves open runs open.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any

from tiled_writer_sidecar.coerce import as_float
from tiled_writer_sidecar.config import SpoolConfig
from tiled_writer_sidecar.documents.tracker import RunTracker, TrackedRun
from tiled_writer_sidecar.documents.validation import validate_document
from tiled_writer_sidecar.errors import RejectedMessage, ValidationError
from tiled_writer_sidecar.receive.counters import ReceiverStats
from tiled_writer_sidecar.receive.ledger import RunLedger
from tiled_writer_sidecar.receive.spooler import RunSpooler, SpooledRun
from tiled_writer_sidecar.spool.codec import pack_document
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.orphans import (
    MAX_ORPHANS,
    ORPHAN_MAX_BYTES,
    orphan_dir,
    orphans,
)
from tiled_writer_sidecar.spool.segment import list_segments
from tiled_writer_sidecar.spool.state_files import Received
from tiled_writer_sidecar.states import Rejection
from tiled_writer_sidecar.text import one_line

log = logging.getLogger(__name__)

SAVE_INTERVAL_S = 1.0
SPOOL_SIZE_INTERVAL_S = 2.0
MAX_RUNS_IN_MEMORY = 10_000  # open runs held in memory (a few KiB each); beyond, the idlest are evicted


def internal_error(err: BaseException) -> RejectedMessage:
    """A rejection for an exception nobody expected: its type names the reason, its place the detail."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb else "?"
    return RejectedMessage(f"internal-error:{type(err).__name__}", f"at {where}")


@dataclass(eq=False, slots=True)
class OpenRun(TrackedRun):
    """One open run (or orphan) in memory: what the tracker knows of it and its log (`log`: None only
    for an orphan none of whose documents is spooled yet)."""

    log: SpooledRun | None = None


class Ingest:
    """Routes and spools decoded documents; see the module docstring."""

    def __init__(self, config: SpoolConfig, spool: SpoolDir, stats: ReceiverStats) -> None:
        self.config = config
        self.spool = spool
        self.stats = stats
        self.tracker: RunTracker[OpenRun] = RunTracker(
            on_gap=self._gap, reject_duplicates=True, may_orphan=self._may_orphan, run_type=OpenRun
        )
        self.spooler = RunSpooler(config, spool, stats)
        self.max_runs_in_memory = MAX_RUNS_IN_MEMORY
        self.recent: OrderedDict[str, None] = OrderedDict()  # open runs by their last document, idlest first
        self.start_only: dict[str, None] = {}  # open runs that sent only their start, oldest first
        self.evicted: dict[str, float] = {}  # open on disk, not in memory: uid -> last document
        self.ledger = RunLedger(spool)
        stats.ledger = self.ledger
        self._last_save = self._last_size_check = 0.0
        self._measuring: threading.Thread | None = None

    def accept(self, name: str, doc: dict[str, Any]) -> None:
        """Validate, route and stage one document; RejectedMessage (and nothing changed) if it cannot be."""
        try:
            validate_document(name, doc)
            payload = pack_document(name, doc)  # first: a document that cannot be stored is not counted
            if name == "start":
                self._start(doc, payload)
                return
            waiting = self.tracker.orphan("descriptor", doc["uid"]) if name == "descriptor" else None
            run = self._route(name, doc)  # a descriptor accepted releases the orphan its events opened
            if run.orphan is not None:
                self._stage_orphan(run, name, payload)
            else:
                assert run.log is not None  # an open run has its log
                self.spooler.stage(run.log, name, payload)
                self._touch(run.uid)
            if waiting is not None and waiting.key not in self.tracker.orphans:
                self._adopt(waiting)
            if name == "stop" and run.orphan is None:
                self.close_run(run, "stop")
        except RejectedMessage:
            raise
        except Exception as err:  # noqa: BLE001  # confined to this document
            raise internal_error(err) from None

    def close_all(self, reason: str) -> None:
        """Close every open run with `reason` (the runs evicted from memory too)."""
        for run in list(self.tracker.runs.values()):
            self.close_run(run, reason)
        for uid in list(self.evicted):
            self._close_evicted(uid, reason)

    def close_run(self, run: OpenRun, reason: str) -> None:
        received = run.received
        received.close(reason)
        self._forget(run)
        if run.log is not None:
            self.spooler.close(run.log)
        self.ledger.note(received)
        self._count_losses(received)
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
            if timeout:
                reason, limit = f"no document for {timeout:.0f} s", time.time() - timeout
                idle = []
                for uid in self.recent:  # idlest first: stop at the first that is not idle
                    if self.tracker.runs[uid].received.last_received > limit:
                        break
                    idle.append(uid)
                for uid in idle:
                    self.close_run(self.tracker.runs[uid], reason)
                for uid in [u for u, last in self.evicted.items() if last < limit]:
                    self._close_evicted(uid, reason)
        self.spooler.upkeep(self._logs(), save)
        if now - self._last_size_check >= SPOOL_SIZE_INTERVAL_S and not self._busy_measuring():
            self._last_size_check = now
            if self._measuring is None:  # the first upkeep: measured here, before anything is staged
                self._measure()
                self._measuring = threading.Thread(target=lambda: None)
            else:  # off the receive path: it lists every run directory
                self._measuring = threading.Thread(target=self._measure, name="spool-size", daemon=True)
                self._measuring.start()

    def _busy_measuring(self) -> bool:
        return self._measuring is not None and self._measuring.is_alive()

    def _measure(self) -> None:
        """Set the spool's size and segment count from a listing (what the uploader deleted shows here);
        never raises."""
        before = self.stats.spool_bytes
        try:
            total = segments = 0
            for run_dir in self.spool.run_dirs():
                for segment in list_segments(run_dir):
                    try:
                        total += segment.lstat().st_size
                        segments += 1
                    except FileNotFoundError:
                        pass
            total += self.spool.quarantine_bytes()
        except Exception:  # noqa: BLE001  # the next measure will do
            return
        self.stats.spool_segments = segments
        self.stats.spool_bytes = total + max(0, self.stats.spool_bytes - before)  # + what came meanwhile

    def shutdown(self) -> None:
        """Write and save everything; open runs stay open for the next receiver."""
        self.spooler.shutdown(self._logs())

    # ------------------------------------------------------------------ runs
    def _logs(self) -> Iterator[SpooledRun]:
        """The logs of the open runs and orphans."""
        for run in chain(self.tracker.runs.values(), self.tracker.orphans.values()):
            if run.log is not None:
                yield run.log

    def _forget(self, run: OpenRun) -> None:
        """The one place an open run leaves memory (closed or evicted); its log is the caller's to close."""
        self.tracker.close(run)
        self.recent.pop(run.uid, None)
        self.start_only.pop(run.uid, None)

    def _route(self, name: str, doc: dict[str, Any]) -> OpenRun:
        """`tracker.route`, reopening a run evicted from memory that the document names."""
        try:
            return self.tracker.route(name, doc)
        except ValidationError as err:
            if err.reason == Rejection.AFTER_STOP:
                uid = self.tracker.closed_run_of(name, doc)
                if uid is not None and uid in self.evicted and self._reopen(uid):
                    return self.tracker.route(name, doc)
            elif err.reason == Rejection.DUPLICATE_SEQ_NUM:
                owner = self.tracker.run_of_descriptor.get(doc.get("descriptor"))  # type: ignore[arg-type]
                if owner is not None:
                    owner.received.note_duplicate()
            raise

    def _touch(self, uid: str) -> None:
        """`uid` received a document: it is the least idle run now."""
        recent = self.recent
        if uid in recent:
            recent.move_to_end(uid)
        else:
            recent[uid] = None
        if self.start_only and uid in self.start_only:
            del self.start_only[uid]

    def _start(self, doc: dict[str, Any], payload: bytes) -> None:
        """Check a start, create its run's log, then open the run (in that order: nothing to undo)."""
        run = self.tracker.new_run(doc)
        uid = run.uid
        if self.spool.run_dir(uid).exists():
            self._closed_in_spool(uid)
            raise ValidationError(Rejection.REPEATED_START, uid)
        try:
            run.log = spooled = self.spooler.open(run.received)
        except OSError as err:
            self.spooler.trouble(f"cannot create run {uid} in the spool: {err.strerror}")
            self.stats.dropped += 1
            return
        self.tracker.open(run)
        self.stats.runs_started += 1
        self.ledger.note(run.received)
        received = run.received
        log.info("run start uid=%s scan_id=%s plan=%r", uid, received.scan_id, received.plan_name)
        self.spooler.stage(spooled, "start", payload)
        self._touch(uid)
        self.start_only[uid] = None
        self._make_room(run)
        orphan = self.tracker.orphan("run_start", uid)
        if orphan is not None:
            self.tracker.release_orphan(orphan)
            self._adopt(orphan)

    def _make_room(self, new: OpenRun) -> None:
        """Hold at most `max_runs_in_memory` runs: evict those that sent only a start first, then the idlest."""
        while len(self.tracker.runs) > self.max_runs_in_memory:
            victims = (uid for queue in (self.start_only, self.recent) for uid in queue if uid != new.uid)
            uid = next(victims, None)
            if uid is None:
                return
            self._evict(self.tracker.runs[uid])

    def _evict(self, run: OpenRun) -> None:
        """Drop an open run from memory; it stays open on disk and its next document reopens it."""
        self._forget(run)
        if run.log is not None:
            self.spooler.park(run.log)
        self.evicted[run.uid] = run.received.last_received
        log.info(
            "run evicted from memory uid=%s (more than %d open); it stays open",
            run.uid,
            len(self.tracker.runs),
        )

    def _reopen(self, uid: str) -> bool:
        """Bring an evicted run back (its log replayed); False if it cannot be."""
        del self.evicted[uid]
        received = Received.load(self.spool.run_dir(uid))
        if received is None or received.closed:
            return False
        self.tracker.closed_runs.pop(uid, None)
        if self._recover_run(received, None) is not None:
            return False
        self._touch(uid)
        self._make_room(self.tracker.runs[uid])
        return True

    def _close_evicted(self, uid: str, reason: str) -> None:
        del self.evicted[uid]
        received = Received.load(self.spool.run_dir(uid))
        if received is not None and not received.closed:
            self.spooler.close_unopened(received, reason)
            self.ledger.note(received)
            self._count_losses(received)
            log.info("run closed uid=%s documents=%d (%s)", uid, received.documents, reason)

    def _count_losses(self, received: Received) -> None:
        """A run closed: count the events it lacks and a stop that never came (one metric each)."""
        self.stats.gaps += sum(received.gaps().values())
        self.stats.events_out_of_order += sum(received.out_of_order.values())
        if not received.stop_received:
            self.stats.runs_stop_missing += 1

    def _gap(self, run: TrackedRun, stream: str, first: int, last: int) -> None:
        missing = last - first + 1
        log.warning("gap run=%s stream=%r missing=%d seq_num %d..%d", run.uid, stream, missing, first, last)

    # --------------------------------------------------------------- orphans
    def _may_orphan(self, kind: str, uid: str) -> bool:
        """May a new orphan open (within the bounds, and not for a run the spool holds: that one is
        remembered closed, so the document is after-stop, or reopens it if it was evicted)?"""
        if kind == "run_start" and self.spool.run_dir(uid).exists():
            self._closed_in_spool(uid)
            return False
        return len(self.tracker.orphans) < MAX_ORPHANS and self.stats.orphan_bytes < ORPHAN_MAX_BYTES

    def _closed_in_spool(self, uid: str) -> None:
        """A run the spool holds but the tracker does not: its documents are after-stop from now on."""
        if uid not in self.tracker.runs:
            self.tracker.closed_runs[uid] = None

    def _stage_orphan(self, run: OpenRun, name: str, payload: bytes) -> None:
        if self.stats.orphan_bytes + len(payload) > ORPHAN_MAX_BYTES:
            raise ValidationError(Rejection.ORPHANS_FULL, f"orphans hold {ORPHAN_MAX_BYTES} bytes")
        spooled = run.log
        if spooled is None:
            assert run.orphan is not None
            directory = orphan_dir(self.spool, run.orphan, run.uid, create=True)
            try:
                run.log = spooled = self.spooler.open(run.received, directory, run.key)
            except OSError as err:
                self.tracker.release_orphan(run)  # given up: its next document opens a new one
                self.spooler.trouble(f"cannot create orphan {run.key} in the spool: {err.strerror}")
                self.stats.dropped += 1
                return
            self.stats.orphan_runs += 1
            self.stats.orphan_runs_total += 1
            log.warning(
                "orphan run=%s keyed_by=%s: its start never came; its documents are kept in %s",
                run.uid,
                run.orphan,
                directory,
            )
        before = run.received.bytes
        self.spooler.stage(spooled, name, payload)
        self.stats.orphan_documents += 1
        self.stats.orphan_bytes += run.received.bytes - before
        if name == "stop":
            self.spooler.park(spooled)

    def _adopt(self, orphan: OpenRun) -> None:
        """Feed a released orphan's documents, in order, to the run that now claims them; delete it."""
        spooled = orphan.log
        if spooled is None:
            return
        self.spooler.park(spooled)
        fed = rejected = 0
        try:
            for name, doc in self.spooler.read_back(Received(uid=orphan.uid), spooled.directory):
                try:
                    self.accept(name, doc)
                    fed += 1
                except RejectedMessage as err:
                    self.stats.rejected[err.reason] += 1
                    rejected += 1
        except Exception as err:  # noqa: BLE001  # a damaged orphan log: keep what was fed
            log.error("orphan %s: its log could not be read to the end (%s)", orphan.key, one_line(err))
        shutil.rmtree(spooled.directory, ignore_errors=True)
        self.stats.orphan_runs -= 1
        self.stats.orphan_bytes = max(0, self.stats.orphan_bytes - orphan.received.bytes)
        log.info("orphan %s adopted: %d documents fed to their run, %d rejected", orphan.key, fed, rejected)

    # -------------------------------------------------------------- recovery
    def recover(self, close_reason: str | None = None) -> list[tuple[str, str]]:
        """Take over the runs left open in the spool; return (uid, reason) of each run it closed.

        Each run's log is replayed through the tracker, so its counters and
        gaps are exact. Without `close_reason` (the receiver) a run stays
        open (its log opens on its next write), except beyond
        `max_runs_in_memory` (the idlest are closed); with it (`replay`) every
        run is closed with it. A run whose stop is in its log is closed by it; a log
        that cannot be replayed closes its run. Orphans are reopened too.
        """
        try:
            views = self.spool.runs()
        except Exception as err:  # noqa: BLE001  # go on; the uploader will say what is wrong
            log.error("cannot list the runs in the spool (%s)", one_line(err))
            return []
        self.ledger.load(views)
        for view in views:
            if view.received.closed:
                self.tracker.closed_runs[view.uid] = None
        left_open = [view.received for view in views if not view.received.closed]
        # Replayed, their logs open on their next write; beyond the memory bound the idlest are closed.
        left_open.sort(key=lambda received: as_float(received.last_received) or 0.0)
        excess = len(left_open) - self.max_runs_in_memory
        crowded = f"closed at start-up: more than {self.max_runs_in_memory} runs open"
        closed = []
        for n, received in enumerate(left_open):
            reason = self._recover_run(received, close_reason or (crowded if n < excess else None))
            if reason is not None:
                closed.append((received.uid, reason))
        self._recover_orphans(known={view.uid for view in views})
        return closed

    def _recover_run(self, received: Received, close_reason: str | None) -> str | None:
        """Replay one run's log and reopen it; the reason it was closed instead, or None."""
        try:
            run = self.tracker.replay(received, self.spooler.read_back(received))
            run.log = spooled = self.spooler.resume(run.received)
        except Exception as err:  # noqa: BLE001  # this run only
            reason = f"its log could not be replayed ({one_line(err)})"
            log.warning("run %s closed: %s", received.uid, reason)
            failed = self.tracker.runs.get(received.uid)
            if failed is not None:
                self._forget(failed)
            self.spooler.close_unopened(received, reason)
            self.ledger.note(received)
            self._count_losses(received)
            return reason
        if received.stop_received:
            close_reason = "stop"
        if close_reason is not None:
            self.close_run(run, close_reason)
            return close_reason
        self._touch(run.uid)
        self.ledger.note(run.received)
        self.spooler.save(spooled)
        log.info("run reopened uid=%s documents=%d", run.uid, received.documents)
        return None

    def _recover_orphans(self, known: set[str]) -> None:
        """Reopen the orphans left in the spool; one whose run the spool now holds was adopted: deleted."""
        for orphan in orphans(self.spool):
            received = orphan.received
            if orphan.kind == "run_start" and received.uid in known:
                shutil.rmtree(orphan.directory, ignore_errors=True)
                continue
            try:
                run = self.tracker.replay_orphan(received, self.spooler.read_back(received, orphan.directory))
            except Exception as err:  # noqa: BLE001  # this orphan only: kept on disk, as it is
                log.warning("orphan %s:%s not reopened (%s)", orphan.kind, received.uid, one_line(err))
                continue
            run.log = self.spooler.resume(run.received, orphan.directory, run.key)
            self.stats.orphan_runs += 1
            self.stats.orphan_bytes += received.bytes
