"""The receiver: 0MQ frames in, durable per-run logs out. Never waits on Tiled, never stops.

A thin composition: a `Subscription` (socket, connection events, wake
pacing) feeds `handle`, which decodes (`wire`), validates (`validation`),
packs the document, lets the `RunTracker` place it in its run (routing,
ownership, gaps) and hands it to the `RunSpooler` (staging, writes,
``received.json``). `tick` does the upkeep between wakes: writes, group
commit, saving state about once a second, closing runs idle for
``run_timeout_seconds``.

The invariant: nothing on the wire, in the spool or in the traffic pattern
makes the receiver exit or refuse to start.

- A message that cannot be placed is rejected with a reason, counted and
  quarantined; any other exception while handling it is confined to it
  (reason ``internal-error:<ExceptionType>``). `tick` never raises either
  (logged once per episode).
- At most ``max_open_runs`` runs are open (one file descriptor each): a new
  run is never refused; the run idle for the longest is closed instead,
  ``incomplete`` with the reason.
- At start-up, runs left open by the last receiver are reopened by replaying
  their logs through the same tracker, so a restart mid-run goes on appending
  and reports what was missed as an exact gap. A run whose log cannot be
  replayed is closed ``incomplete`` with the reason; start-up never raises
  because of what the spool holds. Staged records live only in this process:
  any exit through Python writes them (`close`); a SIGKILL loses what the
  current wake staged, as it loses what waits in the socket's queue.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import Any

from .config import Config
from .errors import RejectedMessage, ValidationError
from .spool.codec import pack_document
from .spool.directory import SpoolDir
from .spool.index import Received
from .spooler import RunSpooler, SpooledRun
from .stats import ReceiverStats
from .subscription import Subscription
from .tracker import RunTracker, TrackedRun, plain_float
from .validation import validate_document
from .wire import decode_message

log = logging.getLogger(__name__)

SAVE_INTERVAL_S = 1.0
WATCH_INTERVAL_S = 0.1  # connection events are read this often
SPOOL_SIZE_INTERVAL_S = 2.0


def internal_error(err: BaseException) -> RejectedMessage:
    """A rejection for an exception nobody expected: its type names the reason, its place the detail."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb else "?"
    return RejectedMessage(f"internal-error:{type(err).__name__}", f"at {where}")


class Receiver:
    """Subscribes to the proxy and spools what arrives; see the module docstring."""

    def __init__(
        self, config: Config, spool: SpoolDir, stats: ReceiverStats, *, subscribe: bool = True
    ) -> None:
        self.config = config
        self.spool = spool
        self.stats = stats
        self.prefix = config.zmq.prefix.encode()
        self._serializer = config.zmq.serializer
        self._max_bytes = config.zmq.max_message_bytes
        self._max_open_runs = config.spool.max_open_runs
        self.tracker = RunTracker(on_gap=self._gap)
        self.spooler = RunSpooler(config.spool, spool, stats)
        self._last_save = self._last_watch = self._last_size_check = 0.0
        self._upkeep_failing = False
        self.subscription = Subscription(config.zmq) if subscribe else None
        self._reopen_runs()

    @property
    def socket(self) -> Any:
        return self.subscription.socket if self.subscription is not None else None

    def close(self) -> None:
        self.spooler.shutdown()
        if self.subscription is not None:
            self.subscription.close()

    # ------------------------------------------------------------- main loop
    def poll_once(self, timeout_ms: int = 100) -> int:
        """Wait up to `timeout_ms` for messages, handle those waiting, do the upkeep; return how many."""
        subscription = self.subscription
        assert subscription is not None, "a Receiver made with subscribe=False has no socket"
        count = subscription.drain(self.handle) if subscription.wait(timeout_ms) else 0
        self.tick()
        return count

    def handle(self, frames: list[bytes]) -> None:
        """Decode, validate, route and spool one message; whatever is wrong with it stays with it."""
        stats = self.stats
        stats.messages += 1
        stats.bytes += len(frames[0]) if len(frames) == 1 else sum(len(f) for f in frames)
        stats.last_message = time.time()
        try:
            name, doc = decode_message(
                frames, serializer=self._serializer, prefix=self.prefix, max_bytes=self._max_bytes
            )
            validate_document(name, doc)
            self._spool(name, doc)
        except RejectedMessage as rejected:
            if rejected.reason != "prefix-mismatch":
                self._reject(rejected, frames)
        except Exception as err:  # noqa: BLE001  # confined to this message, by design
            self._reject(internal_error(err), frames)

    def accept(self, name: str, doc: dict[str, Any]) -> None:
        """Validate, route and spool one decoded document (raises RejectedMessage, never anything else)."""
        try:
            validate_document(name, doc)
            self._spool(name, doc)
        except RejectedMessage:
            raise
        except Exception as err:  # noqa: BLE001  # confined to this document
            raise internal_error(err) from None

    def _spool(self, name: str, doc: dict[str, Any]) -> None:
        payload = pack_document(name, doc)  # first: a document that cannot be stored is not counted
        if name == "start":
            self._start(doc, payload)
            return
        run = self.tracker.route(name, doc)
        spooled = self.spooler.runs[run.uid]
        self.spooler.stage(spooled, name, payload)
        if name == "stop":
            self._close_run(run, "stop")

    def _reject(self, rejected: RejectedMessage, frames: list[bytes]) -> None:
        reason = rejected.reason
        self.stats.rejected[reason] += 1
        count = self.stats.rejected[reason]
        raw = b"".join(frames)
        if count == 1 or count % 1000 == 0:
            log.warning(
                "message rejected reason=%s count=%d bytes=%d detail=%s",
                reason,
                count,
                len(raw),
                rejected.detail[:200],
            )
        try:
            self.spool.quarantine(reason, raw)
        except Exception as err:  # noqa: BLE001  # the count above is what matters
            if count == 1:
                log.error("cannot quarantine a rejected message (%s)", _describe(err))

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
            self._close_run(idlest, "closed: the process ran out of file descriptors")
            return self.spooler.open(received)

    def _make_room(self, new: TrackedRun) -> None:
        """Keep at most ``max_open_runs`` open: close the runs idle for the longest."""
        while len(self.tracker.runs) > self._max_open_runs:
            idlest = self.tracker.idlest(but=new.uid)
            if idlest is None:
                return
            self._close_run(idlest, f"closed: more than max_open_runs={self._max_open_runs} runs open")

    def close_open_runs(self, reason: str) -> None:
        for run in list(self.tracker.runs.values()):
            self._close_run(run, reason)

    def _close_run(self, run: TrackedRun, reason: str) -> None:
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

    def _gap(self, run: TrackedRun, stream: str, first: int, last: int) -> None:
        missing = last - first + 1
        self.stats.gaps += missing
        log.warning("gap run=%s stream=%r missing=%d seq_num %d..%d", run.uid, stream, missing, first, last)

    # ---------------------------------------------------------------- upkeep
    def tick(self) -> None:
        """Upkeep between wakes; never raises (a failure is logged once per episode)."""
        try:
            self._upkeep()
        except Exception as err:  # noqa: BLE001  # the loop must go on
            if not self._upkeep_failing:
                log.error(
                    "receiver upkeep failed (%s %s); retrying every wake",
                    _describe(err),
                    internal_error(err).detail,
                )
            self._upkeep_failing = True
        else:
            if self._upkeep_failing:
                log.warning("receiver upkeep works again")
            self._upkeep_failing = False

    def _upkeep(self) -> None:
        now = time.monotonic()
        if self.subscription is not None and now - self._last_watch >= WATCH_INTERVAL_S:
            self._last_watch = now
            self.subscription.watch()
            self.stats.connected = self.subscription.connected
            self.stats.subscription_problem = self.subscription.problem
        save = now - self._last_save >= SAVE_INTERVAL_S
        if save:
            self._last_save = now
            timeout = self.config.spool.run_timeout_seconds
            for run in list(self.tracker.runs.values()):
                if timeout and time.time() - run.received.last_received > timeout:
                    self._close_run(run, f"no document for {timeout:.0f} s")
        self.spooler.upkeep(save)
        if now - self._last_size_check >= SPOOL_SIZE_INTERVAL_S:
            self._last_size_check = now
            self.stats.spool_bytes = self.spool.total_bytes()

    # -------------------------------------------------------------- start-up
    def _reopen_runs(self) -> None:
        """Reopen runs whose stop had not arrived when the last receiver stopped; never raises."""
        try:
            views = self.spool.runs()
        except Exception as err:  # noqa: BLE001  # start anyway; the uploader will say what is wrong
            log.error("cannot list the runs in the spool (%s: %s)", type(err).__name__, err)
            return
        left_open = [view for view in views if not view.received.closed]
        for view in views:
            if view.received.closed:
                self.tracker.closed_runs[view.uid] = None
        # The runs idle for the longest beyond max_open_runs are closed, not reopened: one
        # file descriptor at a time, never more than the bound.
        left_open.sort(key=lambda v: _number(v.received.last_received))
        excess = len(left_open) - self._max_open_runs
        for n, view in enumerate(left_open):
            try:
                run = self.tracker.replay(view.received, self.spooler.read_back(view.received))
                spooled = self.spooler.resume(run.received)
            except Exception as err:  # noqa: BLE001  # this run only
                reason = f"its log could not be replayed ({_describe(err)})"
                log.warning("run %s closed at start-up: %s", view.uid, reason)
                failed = self.tracker.runs.get(view.uid)
                if failed is not None:
                    self.tracker.close(failed)
                self.spooler.close_unopened(view.received, reason)
                continue
            if n < excess:
                self._close_run(
                    run, f"closed at start-up: more than max_open_runs={self._max_open_runs} runs open"
                )
                continue
            self.spooler.save(spooled)
            log.info("run reopened uid=%s documents=%d", run.uid, run.received.documents)


def _describe(err: BaseException) -> str:
    try:
        text = str(err)[:200]
    except Exception:  # noqa: BLE001  # str() itself failed (a huge int, say)
        text = ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _number(value: object) -> float:
    """A time read back from the spool, for sorting (0 if it is not a number)."""
    return plain_float(value) or 0.0
