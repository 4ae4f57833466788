"""`tiled-writer-sidecar proxy`: a drop-in for `bluesky-0MQ-proxy` that buffers bursts.

Every flag of bluesky's proxy with the same meaning (addresses, ``--in-mode``
/ ``--out-mode``, CURVE on either side, ``-v``, ``--logfile``: see
`proxy.sockets`) and the same wire, so bluesky's `Publisher` and
`RemoteDispatcher`, the sidecar and its monitor work with it unchanged.

- in: a SUB socket, subscribed to everything, drained by a tight loop, up to
  `READ_BATCH` messages per wake. bluesky sends one frame per document; a
  multipart message is refused (counted) and its frames are thrown away
  `DISCARD_BATCH` per wake, so even millions of frames never stall the loop.
- the buffer (`proxy.buffer`): bounded in bytes; a subscriber that stops
  reading holds the others back for ``--stall-seconds`` at most.
- out: an XPUB socket (``ZMQ_XPUB_NODROP``; subscriptions filtered as a PUB
  would, and read for `proxy.replay`'s catch-up of a restarted sidecar).
- Memory, in bytes: ``--max-buffer-bytes`` B is split between the buffer
  (B/2), the replay ring (B/4) and each 0MQ pipe (B/4: the in socket's and
  each subscriber's). Every pipe's HWM is `PIPE_MESSAGES`, set once when its
  socket is made and never changed (libzmq 4.3.5 crashed in its I/O thread
  when a live pipe's HWM change raced a disconnecting subscriber). A message
  is at most B/16 (`max_message_bytes`, ``ZMQ_MAXMSGSIZE`` on the in socket;
  64 MiB at most): a pipe holds at most B/4 while messages are at most
  B/4 / `PIPE_MESSAGES` (256 KiB by default: every bluesky document but
  inline images), and `PIPE_MESSAGES` of the largest otherwise. Pipes share
  one copy of a message (0MQ counts references), so subscribers that stall
  together cost one share.
  ``ZMQ_MAXMSGSIZE`` bounds a subscription on the out socket too.

Why, and what each subscriber misses: docs/design.md, "What 0MQ loses, and
how it is reported".
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from zmq.utils.monitor import recv_monitor_message

from tiled_writer_sidecar.daemon.sdnotify import Notifier
from tiled_writer_sidecar.documents.wire import decode_message
from tiled_writer_sidecar.errors import ConfigError, DecodeError
from tiled_writer_sidecar.text import clean
from tiled_writer_sidecar.tools.proxy.buffer import (
    DEFAULT_STALL_SECONDS,
    MESSAGE_OVERHEAD,
    BurstBuffer,
    Message,
    ProxyStats,
    parse_size,
)
from tiled_writer_sidecar.tools.proxy.metrics import raise_fd_limit, start_metrics
from tiled_writer_sidecar.tools.proxy.peers import Peers
from tiled_writer_sidecar.tools.proxy.replay import DEFAULT_REPLAY_MARGIN, DEFAULT_REPLAY_SECONDS, ReplayRing
from tiled_writer_sidecar.tools.proxy.sockets import (
    AddressInUse,
    Gatekeeper,
    SideOptions,
    apply_client,
    attach,
    normalize_address,
)

__all__ = [
    "MESSAGE_OVERHEAD",
    "AddressInUse",
    "BufferingProxy",
    "BurstBuffer",
    "Message",
    "ProxyOptions",
    "ProxyStats",
    "normalize_address",
    "parse_size",
]

log = logging.getLogger("tiled_writer_sidecar.proxy")

#: Default ``--max-buffer-bytes``: ~450,000 typical event documents (~500 bytes pickled) in all.
DEFAULT_MAX_BUFFER_BYTES = 256 * 2**20
#: Largest message accepted on the in socket (0MQ disconnects a peer that sends more);
#: the sidecar's decoder refuses larger ones too (`wire.decode_message` max_bytes).
MAX_MESSAGE_BYTES = 64 * 2**20
#: Largest subscription frame accepted on the out socket (a subscriber sending more is
#: disconnected): bluesky subscribes to a prefix, a few bytes.
MAX_SUBSCRIPTION_BYTES = 1024
#: Every pipe's HWM (messages), set once per socket: a pipe holds at most this many of the largest message.
PIPE_MESSAGES = 256  # fewer: a healthy subscriber fell behind a burst (docs/design.md)
#: The smallest ``--max-buffer-bytes``: a pipe's share must hold `PIPE_MESSAGES` messages of 4 KiB.
MIN_BUFFER_BYTES = 4 * PIPE_MESSAGES * 4096  # 4 MiB
#: Messages read from the in socket per wake before forwarding again.
READ_BATCH = 2_000
#: Frames of a refused multipart message thrown away per wake.
DISCARD_BATCH = 20_000
#: Housekeeping period (watchdog, status, subscriber sampling) in seconds.
TICK_SECONDS = 0.2
#: On SIGTERM/SIGINT, how long to keep forwarding what is buffered before closing.
SHUTDOWN_FLUSH_SECONDS = 2.0
#: Over its limit, the buffer waits this long for room before a send goes lossy (see `proxy.buffer`).
OVER_GRACE_S = 0.2
#: Poll timeout while the head of the buffer is blocked (ms): from 1 ms doubling to this.
MAX_BLOCKED_WAIT_MS = 50


@dataclass
class ProxyOptions:
    in_side: SideOptions = field(default_factory=lambda: SideOptions("in"))
    out_side: SideOptions = field(default_factory=lambda: SideOptions("out"))
    max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES
    stall_seconds: float = DEFAULT_STALL_SECONDS
    replay_seconds: float = DEFAULT_REPLAY_SECONDS
    replay_margin: float = DEFAULT_REPLAY_MARGIN
    metrics_address: str | None = None
    verbose: int = 0

    @property
    def buffer_bytes(self) -> int:
        return self.max_buffer_bytes // 2

    @property
    def pipe_bytes(self) -> int:
        return self.max_buffer_bytes // 4

    @property
    def max_message_bytes(self) -> int:
        """The largest message accepted: a quarter of a pipe's share (module doc); a drop-in proxy
        must not disconnect a publisher for an ordinary document of a few MiB."""
        return min(MAX_MESSAGE_BYTES, self.pipe_bytes // 4)

    @property
    def pipe_bound_message_bytes(self) -> int:
        """Messages up to this size keep every pipe within its share (`PIPE_MESSAGES` of them fill it)."""
        return self.pipe_bytes // PIPE_MESSAGES

    def check(self) -> None:
        """ConfigError in one line for a budget too small to be split (see the module doc)."""
        if self.max_buffer_bytes < MIN_BUFFER_BYTES:
            raise ConfigError(
                f"--max-buffer-bytes {self.max_buffer_bytes} is too small (at least {MIN_BUFFER_BYTES})"
            )
        for side in (self.in_side, self.out_side):
            side.check()


class BufferingProxy:
    """The forwarding loop: in (SUB) -> `BurstBuffer` -> out (XPUB, NODROP); see the module doc."""

    def __init__(self, options: ProxyOptions, notifier: Notifier | None = None) -> None:
        self.options = options
        self.stats = ProxyStats()
        self.peers = Peers(self.stats.missed)
        self.ring = ReplayRing(options.replay_seconds, options.max_buffer_bytes // 4, options.replay_margin)
        self.buffer = BurstBuffer(
            options.buffer_bytes,
            self.stats,
            stall_seconds=options.stall_seconds,
            over_grace=OVER_GRACE_S,
            on_sent=self._sent,
            on_drop=self.peers.skipped,
        )
        self.notifier = notifier if notifier is not None else Notifier()
        self._stop = False
        self._discarding = False
        self._now = time.monotonic()
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._gate = Gatekeeper(self._context)
        self._monitors: dict[zmq.Socket[bytes], str] = {}
        try:
            options.check()
            # Every option before the socket has a pipe, never after (the module doc: HWMs).
            self.in_socket = self._context.socket(zmq.SUB)
            self.in_socket.setsockopt(zmq.MAXMSGSIZE, options.max_message_bytes)
            self.in_socket.setsockopt(zmq.RCVHWM, PIPE_MESSAGES)
            self.in_socket.setsockopt(zmq.LINGER, 0)
            self.in_socket.setsockopt(zmq.SUBSCRIBE, b"")
            self.out_socket = self._context.socket(zmq.XPUB)
            self.out_socket.setsockopt(zmq.XPUB_NODROP, 1)
            self.out_socket.setsockopt(zmq.XPUB_VERBOSER, 1)
            self.out_socket.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_BYTES)
            self.out_socket.setsockopt(zmq.LINGER, int(SHUTDOWN_FLUSH_SECONDS * 1000))
            self.out_socket.setsockopt(zmq.SNDHWM, PIPE_MESSAGES)
            self.stats.pipe_hwm = PIPE_MESSAGES
            for sock, side in ((self.in_socket, options.in_side), (self.out_socket, options.out_side)):
                if side.binds:
                    self._gate.admit(sock, side)
                else:
                    apply_client(sock, side)
            self.in_endpoint = attach(self.in_socket, options.in_side)
            self.out_endpoint = attach(self.out_socket, options.out_side)
            events = zmq.EVENT_ACCEPTED | zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
            for sock, role in ((self.in_socket, "in"), (self.out_socket, "out")):
                self._monitors[sock.get_monitor_socket(events)] = role
        except BaseException:
            self._gate.stop()
            self._context.destroy(linger=0)
            raise
        self._lossy = False

    # -- sending ----------------------------------------------------------------

    def _send(self, message: Message, lossy: bool) -> bool:
        out = self.out_socket
        if lossy != self._lossy:  # the XPUB's own flag (xsetsockopt): no pipe hears of it
            out.setsockopt(zmq.XPUB_NODROP, 0 if lossy else 1)
            self._lossy = lossy
        try:
            out.send(message, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _sent(self, message: Message, size: int, replayed: bool) -> None:
        self.peers.sent()
        if not replayed:
            self.ring.record(message, size, self._now)

    # -- reading ----------------------------------------------------------------

    def _read_in(self) -> None:
        sock, buffer, verbose = self.in_socket, self.buffer, self.options.verbose
        recv, more, append, limit, now = (
            sock.recv,
            sock.getsockopt,
            buffer.append,
            buffer.max_bytes,
            self._now,
        )
        if self._discarding and not self._discard():
            return
        if buffer.bytes > limit:
            return  # nothing more until the buffer is within its limit (its grace, then lossy sends)
        for _ in range(READ_BATCH):
            try:
                message = recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if more(zmq.RCVMORE):  # (the `rcvmore` property costs 3 us more per message)
                self.stats.refused["multipart"] += 1
                log.warning("a multipart message was refused (bluesky sends one frame per document)")
                self._discarding = True
                if not self._discard():
                    return
                continue
            append(message, now)
            if verbose:
                _log_message(message, verbose)
            if buffer.bytes > limit:
                return  # forward (lossy) before reading more: the buffer exceeds its limit by one message at most

    def _discard(self) -> bool:
        """Throw away up to `DISCARD_BATCH` frames of a refused message; True once it is all gone.

        Frames are readable as they arrive (a message's end may not have come yet)."""
        recv = self.in_socket.recv
        try:
            for _ in range(DISCARD_BATCH):
                if not recv(zmq.NOBLOCK, copy=False).more:
                    self._discarding = False
                    return True
        except zmq.Again:
            pass
        return False

    def _read_subscriptions(self) -> None:
        with contextlib.suppress(zmq.Again):
            for _ in range(READ_BATCH):
                frame = self.out_socket.recv(zmq.NOBLOCK)
                self.stats.subscription_frames += 1
                replay = self.ring.subscription(frame, self._now)
                if replay:
                    self.buffer.prepend(replay, self._now)
                    self.stats.replays += 1
                    self.stats.replayed += len(replay)

    def _read_monitor(self, monitor: zmq.Socket[bytes]) -> None:
        role = self._monitors[monitor]
        with contextlib.suppress(zmq.Again):
            while True:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
                kind, fd = event["event"], event["value"]
                endpoint = event["endpoint"].decode(errors="replace")
                change = -1 if kind == zmq.EVENT_DISCONNECTED else 1
                peer = None
                if role == "out" and kind == zmq.EVENT_ACCEPTED:
                    peer = self.peers.accepted(fd, endpoint)
                elif role == "out" and kind == zmq.EVENT_DISCONNECTED:
                    peer = self.peers.disconnected(fd)
                self.stats.connections[role] = max(0, self.stats.connections[role] + change)
                missed = self.stats.missed.get(peer or "", 0)
                log.info(
                    "%s %s%s: %d connected%s",
                    "publisher" if role == "in" else "subscriber",
                    "connected" if change > 0 else "disconnected",
                    f" ({peer})" if peer else "",
                    self.stats.connections[role],
                    f"; it missed {missed} messages" if change < 0 and missed else "",
                )

    # -- the loop ---------------------------------------------------------------

    def stop(self, *_: object) -> None:
        """Ask the loop to finish (signal handler; safe to call from one)."""
        self._stop = True

    def run(self) -> None:
        poller, full = zmq.Poller(), zmq.Poller()  # full: the buffer is over its limit, the in side waits
        poller.register(self.in_socket, zmq.POLLIN)
        for each in (poller, full):
            each.register(self.out_socket, zmq.POLLIN)
            for monitor in self._monitors:
                each.register(monitor, zmq.POLLIN)
        in_socket, out_socket, buffer, send = self.in_socket, self.out_socket, self.buffer, self._send
        blocked_wait = 1
        next_tick = time.monotonic()
        status_every, next_status = 5.0, time.monotonic() + 5.0
        stats = self.stats
        while not self._stop:
            self._now = time.monotonic()
            sent = stats.sent
            if buffer.forward(send, self._now):
                # A pipe holds few messages, and libzmq hears that one has room again only when the loop
                # calls into it (a zero poll does): while sends progress, go again at once; else back off.
                if stats.sent != sent:
                    timeout, blocked_wait = 0, 1
                else:
                    timeout, blocked_wait = blocked_wait, min(2 * blocked_wait, MAX_BLOCKED_WAIT_MS)
            else:
                timeout, blocked_wait = int(TICK_SECONDS * 1000), 1
            if self._discarding:
                timeout = 0
            ready = dict((full if buffer.bytes > buffer.max_bytes else poller).poll(timeout))
            self._now = time.monotonic()
            if in_socket in ready or self._discarding:
                self._read_in()
            if out_socket in ready:
                self._read_subscriptions()
            if len(ready) > (in_socket in ready) + (out_socket in ready):
                for monitor in self._monitors:
                    if monitor in ready:
                        self._read_monitor(monitor)
            if self._now >= next_tick:
                next_tick = self._now + TICK_SECONDS
                self.notifier.watchdog()
                self.peers.sample()
                if self._now >= next_status:
                    next_status = self._now + status_every
                    self.notifier.status(self.status_line())

    def status_line(self) -> str:
        s = self.stats
        return (
            f"in={s.received} out={s.sent} dropped={s.dropped} buffered={s.buffered} "
            f"buffered_bytes={s.buffered_bytes} subscribers={s.connections['out']}"
        )

    def flush(self, seconds: float) -> int:
        """Forward what is buffered for up to `seconds` (shutdown); what remains counts as dropped."""
        deadline = time.monotonic() + seconds
        while len(self.buffer) and time.monotonic() < deadline:
            self._now = time.monotonic()
            if self.buffer.forward(self._send, self._now):
                time.sleep(0.005)
        unsent = self.buffer.discard()
        self.stats.unsent_at_shutdown += unsent
        self.stats.dropped += unsent
        return unsent

    def close(self) -> None:
        for monitor in self._monitors:
            monitor.close(linger=0)
        for sock in (self.in_socket, self.out_socket):
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
        self.in_socket.close(linger=0)
        self.out_socket.close()
        self._gate.stop()
        self._context.term()


def _log_message(message: bytes, verbose: int) -> None:
    """-v: start and stop documents (decoded safely); -vvv: every message's name and size."""
    parts = message.split(b" ", 2)
    name = parts[1] if len(parts) == 3 else b"?"
    if verbose >= 3:
        log.info("%s: %d bytes", clean(name, 40), len(message))
    if name not in (b"start", b"stop"):
        return
    try:
        _, doc = decode_message([message])
    except DecodeError as err:
        log.info("%s: undecodable (%s)", clean(name, 40), err.reason)
        return
    keys = ("uid", "scan_id", "plan_name") if name == b"start" else ("run_start", "exit_status", "num_events")
    log.info("%s: %s", name.decode(), " ".join(f"{k}={clean(doc.get(k), 80)}" for k in keys))


# -- metrics ---------------------------------------------------------------------------


class ProxyCollector:
    """Prometheus metrics read from `ProxyStats` at scrape time."""

    PREFIX = "tiled_writer_sidecar_proxy_"

    def __init__(self, stats: ProxyStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        s, p = self.stats, self.PREFIX
        counters = (
            ("messages_received", "Messages read from the in socket (Publishers)", s.received),
            ("messages_sent", "Messages sent on the out socket (subscribers)", s.sent),
            (
                "messages_dropped",
                "Messages at least one subscriber missed (sent lossy past the buffer limit or to a stalled "
                "subscriber), and messages still buffered at shutdown",
                s.dropped,
            ),
            (
                "messages_unsent_at_shutdown",
                "Messages still buffered when the proxy stopped",
                s.unsent_at_shutdown,
            ),
            (
                "messages_replayed",
                "Messages sent again to a restarted subscriber (the replay ring)",
                s.replayed,
            ),
            ("replays", "Catch-ups of a restarted subscriber", s.replays),
            ("bytes_received", "Message bytes read from the in socket", s.received_bytes),
            ("bytes_sent", "Message bytes sent on the out socket", s.sent_bytes),
            ("overflows", "Times the buffer went over its limit", s.overflows),
            ("stalls", "Times a subscriber that stopped reading was switched to lossy", s.stalls),
            ("blocked_sends", "Sends held back because a subscriber's pipe was full", s.blocked_sends),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(p + name, doc, value=value)
        refused = CounterMetricFamily(
            p + "messages_refused", "Messages refused on the in socket", labels=["reason"]
        )
        for reason, n in sorted(s.refused.items()):
            refused.add_metric([reason], n)
        yield refused
        missed = CounterMetricFamily(
            p + "subscriber_messages_missed",
            "Messages each subscriber (HOST:PORT) missed; 'unattributed' when no stalled one explains a miss",
            labels=["subscriber"],
        )
        for name, n in sorted(list(s.missed.items())):
            missed.add_metric([name], n)
        yield missed
        oldest = s.oldest_buffered_at
        gauges = (
            ("buffered_messages", "Messages in the buffer now", float(s.buffered)),
            ("buffered_bytes", "Bytes in the buffer now (length + overhead per message)", s.buffered_bytes),
            ("buffered_bytes_peak", "Highest buffered_bytes since start", s.buffered_bytes_peak),
            ("buffer_limit_bytes", "The buffer's limit (half of --max-buffer-bytes)", s.max_buffer_bytes),
            (
                "oldest_buffered_age_seconds",
                "Age of the oldest message in the buffer (0 when empty)",
                0.0 if oldest is None else max(0.0, time.monotonic() - oldest),
            ),
            ("pipe_hwm_messages", "Each subscriber pipe's HWM now (from its byte share)", s.pipe_hwm),
        )
        for gauge, text, level in gauges:
            yield GaugeMetricFamily(p + gauge, text, value=level)
        connected = GaugeMetricFamily(
            p + "connections",
            "TCP/IPC peers connected now (in: publishers, out: subscribers)",
            labels=["side"],
        )
        for side, n in sorted(s.connections.items()):
            connected.add_metric([side], n)
        yield connected


def metrics_registry(stats: ProxyStats) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(ProxyCollector(stats))
    ProcessCollector(registry=registry)
    return registry


# -- command line ----------------------------------------------------------------------


def run_proxy(options: ProxyOptions) -> int:
    """Bind, announce, forward until SIGTERM/SIGINT, flush, close. Returns the exit code."""
    raise_fd_limit()
    notifier = Notifier()
    proxy = BufferingProxy(options, notifier)
    metrics = None
    try:
        if options.metrics_address:
            metrics = start_metrics(options.metrics_address, metrics_registry(proxy.stats))
        previous = {sig: signal.signal(sig, proxy.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        print(
            f"Receiving on address {proxy.in_endpoint}; publishing to address {proxy.out_endpoint}.",
            file=sys.__stdout__,  # bluesky-0MQ-proxy's announcement, on stdout (other stray output is logged)
            flush=True,
        )
        log.info(
            "proxy ready: in=%s (%s) out=%s (%s) max_buffer_bytes=%d max_message_bytes=%d stall_seconds=%g "
            "replay_seconds=%g metrics=%s",
            proxy.in_endpoint,
            options.in_side.mode,
            proxy.out_endpoint,
            options.out_side.mode,
            options.max_buffer_bytes,
            options.max_message_bytes,
            options.stall_seconds,
            options.replay_seconds,
            options.metrics_address or "off",
        )
        notifier.ready(f"in={proxy.in_endpoint} out={proxy.out_endpoint}")
        try:
            proxy.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        notifier.stopping()
        unsent = proxy.flush(SHUTDOWN_FLUSH_SECONDS)
        s = proxy.stats
        log.info("proxy stopped: in=%d out=%d dropped=%d unsent=%d", s.received, s.sent, s.dropped, unsent)
        return 0
    finally:
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        proxy.close()
        notifier.close()


def _side(args: argparse.Namespace, role: str) -> SideOptions:
    def get(name: str) -> Any:
        return getattr(args, f"{role}_{name}", None)

    allow = get("curve_allow")
    return SideOptions(
        role=role,
        address=get("address"),
        mode=get("mode") or "bind",
        curve_secret=get("curve_secret"),
        curve_client_keys=get("curve_client_keys"),
        curve_allow=None if allow is None else tuple(allow),
        client_secret=get("client_secret"),
        server_public=get("server_public"),
    )


def options_from_args(args: argparse.Namespace) -> ProxyOptions:
    """The `proxy` subcommand's flags (see `cli`) as options; ConfigError for a bad size."""
    return ProxyOptions(
        in_side=_side(args, "in"),
        out_side=_side(args, "out"),
        max_buffer_bytes=parse_size(str(args.max_buffer_bytes)),
        stall_seconds=float(args.stall_seconds),
        replay_seconds=float(args.replay_seconds),
        replay_margin=float(args.replay_margin),
        metrics_address=args.metrics_address,
        verbose=args.verbose,
    )


def setup_proxy_logging(args: argparse.Namespace) -> None:
    """Logging for the proxy: INFO, one line per event, to stderr or ``--logfile``."""
    from tiled_writer_sidecar.logs import TEXT_FORMAT, setup_logging

    setup_logging("INFO", "text", role="proxy")
    if args.logfile:
        handler = logging.FileHandler(args.logfile)
        handler.setFormatter(logging.Formatter("[proxy] " + TEXT_FORMAT))
        logging.getLogger().handlers[:] = [handler]
