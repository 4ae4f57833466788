"""The receiver: 0MQ frames in, durable per-run logs out. Never waits on Tiled.

One loop reads messages from the proxy as fast as they come (high receive
HWM, non-blocking reads), decodes them safely, validates them, routes each
document to its run and appends it to that run's log. Everything else it does
is cheap bookkeeping between messages: group-commit fsync, saving each run's
``received.json`` about once a second, closing runs idle for too long.

Appends are staged per run and written with one ``write`` when the loop has
drained what was waiting (`tick`), or sooner at `STAGE_RECORDS` /
`STAGE_BYTES` (``fsync = "always"``: at once). A staged document is counted
as spooled when staged; if its write fails (disk full) it is uncounted and
reported dropped, exactly as if it had been written alone. Nothing is saved
(``received.json``) or fsynced before what it covers has been written. Staged
records live only in this process: any exit through Python (signal,
exception) writes them (`close`); a SIGKILL loses at most what the current
wake staged, as it loses what still waits in the 0MQ socket's queue.

Routing follows the run structure: a start opens a run; descriptors,
resources and stream_resources name their run (``run_start``); events and
stream_datums name their descriptor, datums their resource. A document that
cannot be placed (an event before its descriptor, a stop for an unknown run,
a repeated start) is rejected with a reason and quarantined; nothing valid is
lost because of it. Gaps are found here: seq_num holes per descriptor and,
at stop, ``num_events`` per stream (see `index.Received.gaps`).

On start-up the receiver reopens the runs that were still open (their stop
had not arrived) by reading their logs back, so a restart mid-run goes on
appending to the same run and reports what was missed as an exact gap.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from .config import Config
from .errors import RejectedMessage, ValidationError
from .spool.codec import pack_document, unpack_document
from .spool.directory import SpoolDir, is_safe_uid
from .spool.index import Received
from .spool.record import HEADER_SIZE
from .spool.segment import FsyncPolicy, LogReader, LogWriter
from .stats import ReceiverStats
from .validation import validate_document
from .wire import decode_message

log = logging.getLogger(__name__)

SAVE_INTERVAL_S = 1.0
WAKE_INTERVAL_S = 0.01  # the receiver loop wakes at most this often (see poll_once)
WATCH_INTERVAL_S = 0.1  # connection events (monitor socket) are read this often
MAX_BATCH = 10_000  # messages handled per wake at most
LOW_RATE = 2000  # messages/s: below it, wakes are spaced out (see poll_once) ...
RATE_WINDOW_S = 0.1  # ... as measured over this long
STAGE_RECORDS = 500  # write a run's staged records at this many ...
STAGE_BYTES = 2**18  # ... or this many bytes, whatever the loop is doing
SPOOL_SIZE_INTERVAL_S = 2.0
CLOSED_RUN_MEMORY = 1000
# Documents small and vital enough to be kept even over the spool size limit.
CONTROL_DOCUMENTS = frozenset({"start", "descriptor", "stop", "resource", "stream_resource"})


_HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed (wrong server key?)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake protocol error (CURVE on one side only?)",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication refused (client key not admitted?)",
}


@dataclass
class OpenRun:
    received: Received
    writer: LogWriter | None
    streams: dict[str, str] = field(default_factory=dict)  # descriptor uid -> stream name
    last_seq: dict[str, int] = field(default_factory=dict)  # descriptor uid -> last seq_num
    dirty: bool = True
    staged: list[bytes] = field(default_factory=list)  # payloads counted but not yet written
    staged_names: list[str] = field(default_factory=list)
    staged_bytes: int = 0


class Receiver:
    """Subscribes to the proxy and spools what arrives; see the module docstring."""

    def __init__(
        self, config: Config, spool: SpoolDir, stats: ReceiverStats, *, subscribe: bool = True
    ) -> None:
        self.config = config
        self.spool = spool
        self.stats = stats
        self.fsync = FsyncPolicy(
            config.spool.fsync, config.spool.fsync_interval_ms / 1000, config.spool.fsync_records
        )
        self.prefix = config.zmq.prefix.encode()
        self._serializer = config.zmq.serializer
        self._max_bytes = config.zmq.max_message_bytes
        self._stage_now = config.spool.fsync == "always"
        self._max_spool_bytes = config.spool.max_bytes
        self.runs: dict[str, OpenRun] = {}
        self.run_of_descriptor: dict[str, str] = {}
        self.run_of_resource: dict[str, str] = {}
        self.closed_runs: dict[str, None] = {}
        self.closed_descriptors: dict[str, str] = {}  # descriptor uid -> its closed run
        self.unsaved_closed: list[OpenRun] = []  # closed, but received.json not yet saved
        self._last_save = 0.0
        self._last_wake = 0.0
        self._rate_since = 0.0
        self._rate_count = 0
        self._slow = True
        self._last_watch = 0.0
        self._last_size_check = 0.0
        self._context = zmq.Context()
        self._monitor: zmq.Socket[bytes] | None = None
        self.socket = self._make_socket() if subscribe else None
        self._reopen_runs()

    # ----------------------------------------------------------------- socket
    def _make_socket(self) -> zmq.Socket[bytes]:
        socket: zmq.Socket[bytes] = self._context.socket(zmq.SUB)
        socket.setsockopt(zmq.RCVHWM, self.config.zmq.rcvhwm)
        # No ZMQ_MAXMSGSIZE: libzmq treats a larger message as a protocol error and
        # drops the connection to the proxy for good. decode_message enforces
        # max_message_bytes instead (counted and quarantined like any bad message).
        socket.setsockopt(zmq.RCVBUF, 8 * 2**20)
        socket.setsockopt(zmq.LINGER, 0)
        if self.config.zmq.curve_secret_key_file:
            from .curve import apply_client_curve

            apply_client_curve(socket, self.config.zmq)
        socket.setsockopt(zmq.SUBSCRIBE, self.prefix + b" " if self.prefix else b"")
        self._monitor = socket.get_monitor_socket()
        socket.connect(self.config.zmq.address)
        return socket

    def _watch_connection(self) -> None:
        """Log connection changes and refused handshakes (CURVE) once each; keep the state for /healthz."""
        while self._monitor is not None and self._monitor.poll(0):
            event = zmq.Event(recv_monitor_message(self._monitor)["event"])
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED or (
                event == zmq.EVENT_CONNECTED and not self.config.zmq.curve_secret_key_file
            ):
                if self.stats.subscription_problem or not self.stats.connected:
                    log.info("subscribed to the proxy at %s", self.config.zmq.address)
                self.stats.connected, self.stats.subscription_problem = True, None
            elif event == zmq.EVENT_DISCONNECTED:
                self.stats.connected = False
                log.warning("proxy at %s disconnected; reconnecting", self.config.zmq.address)
            elif event in _HANDSHAKE_FAILURES:
                problem = f"the proxy refused the subscription: {_HANDSHAKE_FAILURES[event]}"
                if problem != self.stats.subscription_problem:
                    log.error("%s (check the CURVE keys in [zmq])", problem)
                self.stats.subscription_problem = problem

    def close(self) -> None:
        for run in [*self.runs.values(), *self.unsaved_closed]:
            self._save(run)  # writes what is staged first
            if run.writer is not None:
                run.writer.close()
        if self.socket is not None:
            self.socket.disable_monitor()
            if self._monitor is not None:
                self._monitor.close(linger=0)
            self.socket.close(linger=0)
        self._context.term()

    # ------------------------------------------------------------- main loop
    def poll_once(self, timeout_ms: int = 100) -> int:
        """Wait up to `timeout_ms` for a message, then receive everything waiting; return how many.

        At low rates (a RunEngine's few hundred events/s) each wake costs far
        more than a document (poll, 0MQ signalling, a write per run, upkeep),
        so while fewer than `LOW_RATE` messages/s arrive (measured over
        `RATE_WINDOW_S`) wakes are at least `WAKE_INTERVAL_S` apart: what
        arrives meanwhile waits in this socket's queue (filled by 0MQ's I/O
        thread, RCVHWM deep, so nothing upstream backs up) and is handled in
        one batch. Above that rate the loop never pauses (a sender that
        waits for the spool, like the flow-controlled benchmark, would be
        slowed down by it).
        """
        socket = self.socket
        assert socket is not None, "a Receiver made with subscribe=False has no socket"
        count = 0
        if socket.poll(timeout_ms):
            now = time.monotonic()
            if now - self._rate_since >= RATE_WINDOW_S:
                self._slow = self._rate_count < LOW_RATE * (now - self._rate_since)
                self._rate_since, self._rate_count = now, 0
            pause = self._last_wake + WAKE_INTERVAL_S - now
            if pause > 0 and self._slow:
                time.sleep(pause)
            self._last_wake = time.monotonic()
            count = self._drain(socket)
            self._rate_count += count
        self.tick()
        return count

    def _drain(self, socket: zmq.Socket[bytes]) -> int:
        """Handle the messages waiting (at most `MAX_BATCH`, so upkeep is never starved)."""
        count = 0
        recv = socket.recv_multipart
        while count < MAX_BATCH:
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.handle(frames)
            count += 1
        return count

    def handle(self, frames: list[bytes]) -> None:
        """Decode, validate, route and spool one message."""
        stats = self.stats
        stats.messages += 1
        stats.bytes += len(frames[0]) if len(frames) == 1 else sum(len(f) for f in frames)
        stats.last_message = time.time()
        try:
            name, doc = decode_message(
                frames, serializer=self._serializer, prefix=self.prefix, max_bytes=self._max_bytes
            )
            self.accept(name, doc)
        except RejectedMessage as rejected:
            if rejected.reason == "prefix-mismatch":
                return
            self._reject(rejected, b"".join(frames))

    def accept(self, name: str, doc: dict[str, Any]) -> None:
        """Validate, route and spool one decoded document (raises RejectedMessage)."""
        validate_document(name, doc)
        self._route(name, doc)

    def _reject(self, rejected: RejectedMessage, raw: bytes) -> None:
        self.stats.rejected[rejected.reason] += 1
        count = self.stats.rejected[rejected.reason]
        if count == 1 or count % 1000 == 0:
            log.warning(
                "message rejected reason=%s count=%d bytes=%d detail=%s",
                rejected.reason,
                count,
                len(raw),
                rejected.detail[:200],
            )
        self.spool.quarantine(rejected.reason, raw)

    # --------------------------------------------------------------- routing
    def _route(self, name: str, doc: dict[str, Any]) -> None:
        if name == "event":  # most of what arrives: its run and seq_num looked up directly
            run = self.runs.get(self.run_of_descriptor.get(doc["descriptor"], ""))
            if run is not None:
                self._count_event(run, doc["descriptor"], doc["seq_num"])
                self._append(run, name, doc)
                return
        if name == "start":
            self._open_run(doc)
            return
        run = self._run_for(name, doc)
        if name == "descriptor":
            run.streams[doc["uid"]] = doc.get("name", "primary")
            self.run_of_descriptor[doc["uid"]] = run.received.uid
        elif name in ("resource", "stream_resource"):
            self.run_of_resource[doc["uid"]] = run.received.uid
        elif name == "event":
            self._count_event(run, doc["descriptor"], doc["seq_num"])
        elif name == "event_page":
            self._count_events(run, doc["descriptor"], list(doc["seq_num"]))
        self._append(run, name, doc)
        if name == "stop":
            run.received.stop_received = True
            run.received.exit_status = doc.get("exit_status")
            run.received.expected_events = dict(doc.get("num_events") or {})
            self._close_run(run, "stop")

    def _run_for(self, name: str, doc: dict[str, Any]) -> OpenRun:
        """The open run a non-start document belongs to, or a ValidationError."""
        if name in ("descriptor", "stop", "resource", "stream_resource"):
            uid = doc.get("run_start")
            if uid is None and len(self.runs) >= 1:
                uid = next(reversed(self.runs))  # legacy resources may lack run_start
        elif name in ("event", "event_page", "stream_datum"):
            uid = self.run_of_descriptor.get(doc["descriptor"])
            if uid is None and doc["descriptor"] in self.closed_descriptors:
                raise ValidationError("after-stop", f"run {self.closed_descriptors[doc['descriptor']]}")
            if uid is None:
                raise ValidationError(f"{name}-before-descriptor", f"descriptor {doc['descriptor']}")
        elif name == "datum" or name == "datum_page":
            uid = self.run_of_resource.get(doc["resource"])
            if uid is None:
                raise ValidationError("datum-before-resource", f"resource {doc['resource']}")
        else:
            raise ValidationError("unknown-document", name)
        run = self.runs.get(uid) if isinstance(uid, str) else None
        if run is None:
            reason = "after-stop" if uid in self.closed_runs else f"{name}-for-unknown-run"
            raise ValidationError(reason, f"run {uid}")
        return run

    def _count_event(self, run: OpenRun, descriptor: str, seq: int) -> None:
        """`_count_events` for one event, short for the usual case: the next seq_num."""
        last = run.last_seq.get(descriptor, 0)
        if seq != last + 1:
            self._count_events(run, descriptor, [seq])
            return
        stream = run.streams[descriptor]
        events = run.received.events
        events[stream] = events.get(stream, 0) + 1
        run.last_seq[descriptor] = seq

    def _count_events(self, run: OpenRun, descriptor: str, seq_nums: list[int]) -> None:
        stream = run.streams[descriptor]
        events = run.received.events
        events[stream] = events.get(stream, 0) + len(seq_nums)
        last = run.last_seq.get(descriptor, 0)
        for seq in seq_nums:
            if seq > last + 1:
                missing = seq - last - 1
                run.received.missing[stream] = run.received.missing.get(stream, 0) + missing
                self.stats.gaps += missing
                log.warning(
                    "gap run=%s stream=%s missing=%d seq_num %d..%d",
                    run.received.uid,
                    stream,
                    missing,
                    last + 1,
                    seq - 1,
                )
            last = max(last, seq)
        run.last_seq[descriptor] = last

    def _open_run(self, doc: dict[str, Any]) -> None:
        uid = doc["uid"]
        if not is_safe_uid(uid):
            raise ValidationError("unsafe-uid", repr(uid)[:80])
        run_dir = self.spool.run_dir(uid)
        if uid in self.runs or uid in self.closed_runs or run_dir.exists():
            raise ValidationError("repeated-start", uid)
        received = Received(
            uid=uid,
            scan_id=doc.get("scan_id"),
            plan_name=doc.get("plan_name"),
            start_time=doc.get("time"),
        )
        try:
            writer = LogWriter(run_dir, self.config.spool.segment_bytes, self.fsync)
            received.save(run_dir)
        except OSError as err:
            self._spool_trouble(f"cannot create run {uid} in the spool: {err.strerror}")
            self.stats.dropped += 1
            return
        run = OpenRun(received, writer)
        self.runs[uid] = run
        self.stats.runs_started += 1
        log.info("run start uid=%s scan_id=%s plan=%s", uid, received.scan_id, received.plan_name)
        self._append(run, "start", doc)

    def _append(self, run: OpenRun, name: str, doc: dict[str, Any]) -> None:
        """Stage one document in its run's log and count it (see `_flush` for a failed write)."""
        payload = pack_document(name, doc)
        stats = self.stats
        size = HEADER_SIZE + len(payload)
        limit = self._max_spool_bytes
        if limit and name not in CONTROL_DOCUMENTS and stats.spool_bytes + len(payload) > limit:
            self._drop(run, f"spool is at its max_bytes limit ({limit} bytes)")
            return
        assert run.writer is not None
        run.staged.append(payload)
        run.staged_names.append(name)
        run.staged_bytes += size
        received = run.received
        received.documents += 1
        received.bytes += size
        received.last_received = time.time()
        run.dirty = True
        stats.documents[name] += 1
        stats.spool_bytes += size
        if self._stage_now or len(run.staged) >= STAGE_RECORDS or run.staged_bytes >= STAGE_BYTES:
            self._flush(run)

    def _flush(self, run: OpenRun) -> None:
        """Write a run's staged records; uncount and drop those the disk refused."""
        if not run.staged or run.writer is None:
            return
        payloads, names = run.staged, run.staged_names
        run.staged, run.staged_names, run.staged_bytes = [], [], 0
        result = run.writer.append_many(payloads)
        for index, err in result.failed:
            self._uncount(run, names[index], HEADER_SIZE + len(payloads[index]))
            self._drop(run, f"spool write failed: {err.strerror}")
        if result.sync_error is not None:
            self._spool_trouble(f"fsync failed: {result.sync_error.strerror}")
        limit = self.config.spool.max_bytes
        if (
            not result.failed
            and not self.stats.spool_writable
            and not (limit and self.stats.spool_bytes >= limit)
        ):
            self.stats.spool_writable = True
            log.warning("spool writable again; spooling resumed")

    def _uncount(self, run: OpenRun, name: str, size: int) -> None:
        """Undo `_append`'s counting for a staged document that could not be written."""
        run.received.documents -= 1
        run.received.bytes -= size
        self.stats.documents[name] -= 1
        self.stats.spool_bytes -= size

    def _drop(self, run: OpenRun, why: str) -> None:
        run.received.dropped += 1
        run.dirty = True
        self.stats.dropped += 1
        self._spool_trouble(f"dropping documents of run {run.received.uid}: {why}")

    def _spool_trouble(self, why: str) -> None:
        """Say loudly, once per episode, that documents are being lost."""
        if self.stats.spool_writable:
            self.stats.spool_writable = False
            log.error("SPOOL NOT WRITABLE: %s; free space or fix the spool, spooling resumes by itself", why)

    def close_open_runs(self, reason: str) -> None:
        for run in list(self.runs.values()):
            self._close_run(run, reason)

    def _close_run(self, run: OpenRun, reason: str) -> None:
        run.received.closed = True
        run.received.close_reason = reason
        self._flush(run)
        if run.writer is not None:
            try:
                run.writer.close()
            except OSError as err:
                self._spool_trouble(f"cannot fsync run {run.received.uid}: {err.strerror}")
            run.writer = None
        self._save(run)
        if run.dirty:
            self.unsaved_closed.append(run)  # retried by tick() until the disk has room
        uid = run.received.uid
        del self.runs[uid]
        self.closed_runs[uid] = None
        while len(self.closed_runs) > CLOSED_RUN_MEMORY:
            del self.closed_runs[next(iter(self.closed_runs))]
        # Documents arriving late for this run will be rejected as "after-stop".
        self.run_of_descriptor = {d: r for d, r in self.run_of_descriptor.items() if r != uid}
        self.run_of_resource = {d: r for d, r in self.run_of_resource.items() if r != uid}
        for descriptor in run.streams:
            self.closed_descriptors[descriptor] = uid
        while len(self.closed_descriptors) > CLOSED_RUN_MEMORY:
            del self.closed_descriptors[next(iter(self.closed_descriptors))]
        problems = run.received.problems()
        log.info(
            "run closed uid=%s documents=%d %s",
            uid,
            run.received.documents,
            "problems=" + "; ".join(problems) if problems else "complete",
        )

    def _save(self, run: OpenRun) -> None:
        self._flush(run)  # received.json never counts a record that is not in the log
        if not run.dirty:
            return
        try:
            run.received.save(self.spool.run_dir(run.received.uid))
            run.dirty = False
        except OSError as err:
            self._spool_trouble(f"cannot save the state of run {run.received.uid}: {err.strerror}")

    # ------------------------------------------------------------ upkeep
    def tick(self) -> None:
        """Periodic bookkeeping between messages."""
        now = time.monotonic()
        if now - self._last_watch >= WATCH_INTERVAL_S:
            self._last_watch = now
            self._watch_connection()
        for run in self.runs.values():
            self._flush(run)
            if run.writer is not None:
                try:
                    run.writer.maybe_sync()
                except OSError as err:
                    self._spool_trouble(f"fsync failed: {err.strerror}")
        if now - self._last_save >= SAVE_INTERVAL_S:
            self._last_save = now
            timeout = self.config.spool.run_timeout_seconds
            for run in list(self.runs.values()):
                if timeout and time.time() - run.received.last_received > timeout:
                    self._close_run(run, f"no document for {timeout:.0f} s")
                else:
                    self._save(run)
            for run in list(self.unsaved_closed):
                self._save(run)
                if not run.dirty:
                    self.unsaved_closed.remove(run)
        if now - self._last_size_check >= SPOOL_SIZE_INTERVAL_S:
            self._last_size_check = now
            self.stats.spool_bytes = self.spool.total_bytes()

    def _reopen_runs(self) -> None:
        """Reopen runs whose stop had not arrived when the last receiver stopped."""
        for view in self.spool.runs():
            if view.received.closed:
                self.closed_runs[view.uid] = None
                continue
            received = view.received
            run = OpenRun(received, None)
            received.documents = 0
            received.bytes = 0
            received.events = {}
            received.missing = {}
            reader = LogReader(view.directory)
            for payload in reader.read():
                name, doc = unpack_document(payload)
                received.documents += 1
                received.bytes += len(payload) + HEADER_SIZE
                if name == "descriptor":
                    run.streams[doc["uid"]] = doc.get("name", "primary")
                    self.run_of_descriptor[doc["uid"]] = received.uid
                elif name in ("resource", "stream_resource"):
                    self.run_of_resource[doc["uid"]] = received.uid
                elif name in ("event", "event_page"):
                    seqs = [doc["seq_num"]] if name == "event" else list(doc["seq_num"])
                    self._count_events(run, doc["descriptor"], seqs)
            run.writer = LogWriter(view.directory, self.config.spool.segment_bytes, self.fsync)
            if run.writer.truncated_bytes:
                log.warning(
                    "run %s: truncated a torn tail of %d bytes left by a crash",
                    received.uid,
                    run.writer.truncated_bytes,
                )
            self.runs[received.uid] = run
            self._save(run)
            log.info("run reopened uid=%s documents=%d", received.uid, received.documents)
