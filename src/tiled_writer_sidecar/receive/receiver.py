"""The receiver: 0MQ frames in, durable per-run logs out. Never waits on Tiled, never stops.

A `Subscription` feeds `handle`, which decodes (`wire`) and hands the
document to `Ingest` (validation, `RunTracker`, `RunSpooler`); `upkeep`
runs between wakes. At start-up the runs left open by the last
receiver are taken over (`Ingest.recover`).

What it has not handled yet is bounded in bytes (`Subscription`): a message
that would take that queue past its bound is rejected as ``queue-full``.
Nothing on the wire, in the spool or in the traffic pattern makes it exit or
refuse to start: a message that cannot be spooled is rejected with a reason,
counted and quarantined (an unexpected exception too, as
``internal-error:<Type>``), and `upkeep` never raises (logged once per episode).
"""

from __future__ import annotations

import logging
import time

from tiled_writer_sidecar.config import Config
from tiled_writer_sidecar.documents.tracker import RunTracker
from tiled_writer_sidecar.documents.wire import decode_message
from tiled_writer_sidecar.errors import RejectedMessage
from tiled_writer_sidecar.receive.counters import ReceiverStats
from tiled_writer_sidecar.receive.ingest import Ingest, OpenRun, internal_error
from tiled_writer_sidecar.receive.spooler import RunSpooler
from tiled_writer_sidecar.receive.subscription import Subscription
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.states import Rejection, counted
from tiled_writer_sidecar.text import one_line

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.1  # connection events are read this often


class Receiver:
    """Subscribes to the proxy and spools what arrives; see the module docstring."""

    def __init__(self, config: Config, spool: SpoolDir, stats: ReceiverStats) -> None:
        self.config = config
        self.spool = spool
        self.stats = stats
        self.prefix = config.zmq.prefix.encode()
        self._serializer = config.zmq.serializer
        self._max_bytes = config.zmq.max_message_bytes
        self.ingest = Ingest(config.spool, spool, stats)
        self._last_watch = 0.0
        self._upkeep_failing = False
        self.subscription = Subscription(config.zmq, catch_up=True, overflow=self._overflowed)
        self.ingest.recover()

    @property
    def tracker(self) -> RunTracker[OpenRun]:
        return self.ingest.tracker

    @property
    def spooler(self) -> RunSpooler:
        return self.ingest.spooler

    def close(self) -> None:
        self.ingest.shutdown()
        self.subscription.close()

    def poll_once(self, timeout_ms: int = 100) -> int:
        """Wait up to `timeout_ms` for messages, handle those waiting, do the upkeep; return how many."""
        subscription = self.subscription
        count = subscription.drain(self.handle) if subscription.wait(timeout_ms) else 0
        self.upkeep()
        return count

    def _count(self, frames: list[bytes], size: int | None = None) -> None:
        stats = self.stats
        stats.messages += 1
        if size is None:
            size = len(frames[0]) if len(frames) == 1 else sum(len(f) for f in frames)
        stats.bytes += size
        stats.last_message = time.time()

    def _overflowed(self, head: bytes, size: int) -> None:
        """A message the receive queue had no room for (its first bytes): counted, quarantined as ``queue-full``."""
        self._count([head], size)
        queued = self.subscription.queued_bytes
        detail = f"{size} bytes (the first {len(head)} kept); {queued} bytes wait to be handled already"
        self._reject(RejectedMessage(Rejection.QUEUE_FULL, detail), [head])

    def handle(self, frames: list[bytes]) -> None:
        """Decode, validate, route and spool one message; whatever is wrong with it stays with it."""
        self._count(frames)
        try:
            name, doc = decode_message(
                frames, serializer=self._serializer, prefix=self.prefix, max_bytes=self._max_bytes
            )
            self.ingest.accept(name, doc)
        except RejectedMessage as rejected:
            if counted(rejected.reason):
                self._reject(rejected, frames)
        except Exception as err:  # noqa: BLE001  # confined to this message, by design
            self._reject(internal_error(err), frames)

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
                log.error("cannot quarantine a rejected message (%s)", one_line(err))

    def upkeep(self) -> None:
        """Watch the connection, then `Ingest.upkeep`; never raises (a failure is logged once per episode)."""
        try:
            self._upkeep_once()
        except Exception as err:  # noqa: BLE001  # the loop must go on
            if not self._upkeep_failing:
                log.error(
                    "receiver upkeep failed (%s %s); retrying every wake",
                    one_line(err),
                    internal_error(err).detail,
                )
            self._upkeep_failing = True
        else:
            if self._upkeep_failing:
                log.warning("receiver upkeep works again")
            self._upkeep_failing = False

    def _upkeep_once(self) -> None:
        now = time.monotonic()
        if now - self._last_watch >= WATCH_INTERVAL_S:
            self._last_watch = now
            self.subscription.watch()
            self.stats.connected = self.subscription.connected
            self.stats.subscription_problem = self.subscription.problem
            self.stats.proxy_absent = self.subscription.absent
        self.ingest.upkeep()
