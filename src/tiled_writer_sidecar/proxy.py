"""`tiled-writer-sidecar proxy`: a drop-in for `bluesky-0MQ-proxy` that buffers bursts.

Same flags (``--in-address``, ``--out-address``, ``--verbose``,
``--logfile``), same address forms (a bare port binds ``tcp://0.0.0.0:PORT``,
``HOST:PORT`` and ``tcp://HOST:PORT``, ``ipc://PATH``, no address or no port
a random one) and the same wire: every message is forwarded unchanged,
multipart included, so bluesky's `Publisher` and `RemoteDispatcher`, the
sidecar and its monitor work with it as with bluesky's.

- in: a SUB socket (bind, subscribed to everything, messages up to
  `MAX_MESSAGE_BYTES`, RCVHWM `IN_HWM`) drained by a tight loop, up to
  `READ_BATCH` messages per wake, into
- the buffer: a deque bounded in bytes (``--max-buffer-bytes``; a message
  costs its length plus `MESSAGE_OVERHEAD`), sent from its head by
- out: an XPUB socket (bind, ``ZMQ_XPUB_NODROP``, SNDHWM `OUT_HWM`) that
  filters subscriptions as a PUB would (the subscription frames it reports
  are read and discarded). A message stays
  at the head until every matching subscriber has room; once the buffer is
  over its limit, a message that would block is sent lossy (NODROP off for
  that send) and counted as dropped.

Guarantees: nothing a sender does crashes the proxy or grows the buffer past
its limit; RSS is at most the base + the buffer limit + 0MQ's pipes. Why, and
what a stalled subscriber does to the others: docs/design.md, "What 0MQ
loses, and how it is reported".
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import re
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq

from .errors import ConfigError, SidecarError
from .sdnotify import Notifier
from .text import clean

log = logging.getLogger("tiled_writer_sidecar.proxy")

#: Default ``--max-buffer-bytes``: ~450,000 typical event documents (~500 bytes pickled).
DEFAULT_MAX_BUFFER_BYTES = 256 * 2**20
#: Bytes counted per buffered message on top of its length (bytes object + deque slot).
MESSAGE_OVERHEAD = 64
#: RCVHWM of the in socket (messages): a few seconds of the fastest Publisher burst.
IN_HWM = 1_000_000
#: SNDHWM of the out socket, per subscriber (messages); the buffer holds the rest.
OUT_HWM = 10_000
#: Largest message accepted on the in socket (0MQ disconnects a peer that sends more);
#: the sidecar's decoder refuses larger ones too (`wire.decode_message` max_bytes).
MAX_MESSAGE_BYTES = 64 * 2**20
#: Messages read from the in socket per wake before forwarding again.
READ_BATCH = 2_000
#: Housekeeping period (watchdog, status) in seconds.
TICK_SECONDS = 0.2
#: On SIGTERM/SIGINT, how long to keep forwarding what is buffered before closing.
SHUTDOWN_FLUSH_SECONDS = 2.0
#: Poll timeout while the head of the buffer is blocked (ms): from 1 ms doubling to this.
MAX_BLOCKED_WAIT_MS = 50

Message = bytes | tuple[bytes, ...]

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_size(text: str) -> int:
    """``"268435456"``, ``"256MiB"``, ``"256M"`` (10**6), ``"1GiB"`` -> bytes; ConfigError otherwise."""
    match = _SIZE.match(text)
    if match is None:
        raise ConfigError(f"not a size in bytes: {text!r} (e.g. 268435456, 256MiB, 1GiB)")
    unit = (match.group(2) or "").lower().removesuffix("b")
    return int(match.group(1)) * _UNITS[unit]


def normalize_address(address: str | None) -> str:
    """An address as bluesky's Proxy reads it: a 0MQ endpoint (``tcp://*`` for none)."""
    if address is None or address == "":
        return "tcp://*"
    address = address.strip()
    if address.isdigit():
        return f"tcp://0.0.0.0:{address}"
    if "://" in address:
        return address
    return f"tcp://{address}"


def _wants_random_port(endpoint: str) -> bool:
    return endpoint.startswith("tcp://") and ":" not in endpoint[len("tcp://") :]


def _size_of(message: Message) -> int:
    if isinstance(message, bytes):
        return len(message) + MESSAGE_OVERHEAD
    return sum(len(frame) for frame in message) + MESSAGE_OVERHEAD


# -- the buffer ----------------------------------------------------------------------


@dataclass
class ProxyStats:
    """Plain counters, written by the forwarding loop and read by the metrics thread."""

    received: int = 0
    received_bytes: int = 0
    sent: int = 0
    sent_bytes: int = 0
    dropped: int = 0
    overflows: int = 0
    buffered: int = 0
    buffered_bytes: int = 0
    buffered_bytes_peak: int = 0
    max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES
    blocked_sends: int = 0
    subscription_frames: int = 0
    connections: dict[str, int] = field(default_factory=lambda: {"in": 0, "out": 0})


#: ``send(message, lossy)``: True if sent, False if it would block (only when not lossy).
Sender = Callable[[Message, bool], bool]


class BurstBuffer:
    """A FIFO of messages bounded in bytes, forwarded to a `Sender` (see the module doc).

    `append` always accepts; `forward` sends from the head while the sender
    takes messages and, while the buffer is over its limit, sends lossy what
    would block. So the bytes held never exceed the limit when `forward`
    returns.
    """

    def __init__(self, max_bytes: int, stats: ProxyStats | None = None) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.low_bytes = max_bytes // 2
        self.stats = stats if stats is not None else ProxyStats()
        self.stats.max_buffer_bytes = max_bytes
        self._queue: deque[tuple[Message, int]] = deque()
        self._bytes = 0
        self._overflowing = False

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def overflowing(self) -> bool:
        """True from an overflow until the buffer is back under half its limit (for logging)."""
        return self._overflowing

    def append(self, message: Message) -> None:
        size = _size_of(message)
        self._queue.append((message, size))
        self._bytes += size
        stats = self.stats
        stats.received += 1
        stats.received_bytes += size - MESSAGE_OVERHEAD
        stats.buffered = len(self._queue)
        stats.buffered_bytes = self._bytes
        if self._bytes > stats.buffered_bytes_peak:
            stats.buffered_bytes_peak = self._bytes

    def forward(self, send: Sender) -> bool:
        """Send from the head; return True if the head is blocked (messages remain).

        Each message is sent lossless first; only if that would block while
        the buffer is over its limit is it sent lossy (and counted dropped).
        """
        queue, stats = self._queue, self.stats
        blocked = False
        while queue:
            message, size = queue[0]
            if not send(message, False):
                if self._bytes <= self.max_bytes:
                    stats.blocked_sends += 1
                    blocked = True
                    break
                if not self._overflowing:
                    self._overflowing = True
                    stats.overflows += 1
                    log.warning(
                        "buffer over its limit (%d > %d bytes): a subscriber that is full misses messages",
                        self._bytes,
                        self.max_bytes,
                    )
                send(message, True)
                stats.dropped += 1
            queue.popleft()
            self._bytes -= size
            stats.sent += 1
            stats.sent_bytes += size - MESSAGE_OVERHEAD
        if self._overflowing and self._bytes <= self.low_bytes:
            self._overflowing = False
            log.warning("buffer back under half its limit (%d bytes)", self._bytes)
        stats.buffered = len(queue)
        stats.buffered_bytes = self._bytes
        return blocked


# -- sockets ---------------------------------------------------------------------------


class AddressInUse(SidecarError):
    """The address is already bound by another process (exit 1)."""


def bind(sock: zmq.Socket[bytes], address: str | None, role: str) -> str:
    """Bind `sock` like bluesky's Proxy does; return the endpoint really bound.

    Raises `AddressInUse` (exit 1) or `ConfigError` (exit 2) with one line.
    """
    endpoint = normalize_address(address)
    try:
        if _wants_random_port(endpoint):
            sock.bind_to_random_port(endpoint)
        else:
            sock.bind(endpoint)
    except zmq.ZMQError as err:
        what = f"--{role}-address {address!r} ({endpoint})"
        if err.errno == errno.EADDRINUSE:
            raise AddressInUse(f"{what}: address already in use") from None
        if err.errno == errno.EACCES:
            raise SidecarError(f"{what}: permission denied") from None
        raise ConfigError(f"{what}: cannot bind: {err.strerror}") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--{role}-address {address!r}: {err}") from None
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode(errors="replace")  # type: ignore[union-attr]


@dataclass
class ProxyOptions:
    in_address: str | None = None
    out_address: str | None = None
    max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES
    metrics_address: str | None = None
    verbose: int = 0


class BufferingProxy:
    """The forwarding loop: in (SUB) -> `BurstBuffer` -> out (XPUB, NODROP)."""

    def __init__(self, options: ProxyOptions, notifier: Notifier | None = None) -> None:
        self.options = options
        self.stats = ProxyStats()
        self.buffer = BurstBuffer(options.max_buffer_bytes, self.stats)
        self.notifier = notifier if notifier is not None else Notifier()
        self._stop = False
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._monitors: dict[zmq.Socket[bytes], str] = {}
        try:
            self.in_socket = self._context.socket(zmq.SUB)
            self.in_socket.setsockopt(zmq.RCVHWM, IN_HWM)
            self.in_socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            self.in_socket.setsockopt(zmq.LINGER, 0)
            self.in_socket.setsockopt(zmq.SUBSCRIBE, b"")
            self.out_socket = self._context.socket(zmq.XPUB)
            self.out_socket.setsockopt(zmq.SNDHWM, OUT_HWM)
            self.out_socket.setsockopt(zmq.XPUB_NODROP, 1)
            self.out_socket.setsockopt(zmq.LINGER, int(SHUTDOWN_FLUSH_SECONDS * 1000))
            self.in_endpoint = bind(self.in_socket, options.in_address, "in")
            self.out_endpoint = bind(self.out_socket, options.out_address, "out")
            for sock, role in ((self.in_socket, "in"), (self.out_socket, "out")):
                events = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
                self._monitors[sock.get_monitor_socket(events)] = role
        except BaseException:
            self._context.destroy(linger=0)
            raise
        self._lossy = False

    # -- sending ----------------------------------------------------------------

    def _send(self, message: Message, lossy: bool) -> bool:
        out = self.out_socket
        if lossy != self._lossy:
            out.setsockopt(zmq.XPUB_NODROP, 0 if lossy else 1)
            self._lossy = lossy
        try:
            if isinstance(message, bytes):
                out.send(message, zmq.NOBLOCK)
            else:
                out.send_multipart(message, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    # -- reading ----------------------------------------------------------------

    def _read_in(self) -> None:
        sock, buffer, verbose = self.in_socket, self.buffer, self.options.verbose
        recv, append, limit = sock.recv, buffer.append, buffer.max_bytes
        for _ in range(READ_BATCH):
            try:
                frame = recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            message: Message = frame
            if sock.rcvmore:
                frames = [frame]
                while sock.rcvmore:
                    frames.append(recv())
                message = tuple(frames)
            append(message)
            if verbose:
                _log_message(message, verbose)
            if buffer.bytes > limit:
                return  # forward (lossy) before reading more: the buffer exceeds its limit by one message at most

    def _read_subscriptions(self) -> None:
        with contextlib.suppress(zmq.Again):
            for _ in range(READ_BATCH):
                self.out_socket.recv(zmq.NOBLOCK)
                self.stats.subscription_frames += 1

    def _read_monitor(self, monitor: zmq.Socket[bytes]) -> None:
        from zmq.utils.monitor import recv_monitor_message

        role = self._monitors[monitor]
        with contextlib.suppress(zmq.Again):
            while True:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
                change = 1 if event["event"] == zmq.EVENT_ACCEPTED else -1
                self.stats.connections[role] = max(0, self.stats.connections[role] + change)
                log.info(
                    "%s %s: %d connected",
                    "publisher" if role == "in" else "subscriber",
                    "connected" if change > 0 else "disconnected",
                    self.stats.connections[role],
                )

    # -- the loop ---------------------------------------------------------------

    def stop(self, *_: object) -> None:
        """Ask the loop to finish (signal handler; safe to call from one)."""
        self._stop = True

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.in_socket, zmq.POLLIN)
        poller.register(self.out_socket, zmq.POLLIN)
        for monitor in self._monitors:
            poller.register(monitor, zmq.POLLIN)
        in_socket, out_socket, buffer, send = self.in_socket, self.out_socket, self.buffer, self._send
        blocked_wait = 1
        next_tick = time.monotonic()
        status_every, next_status = 5.0, time.monotonic() + 5.0
        while not self._stop:
            if buffer.forward(send):
                timeout = blocked_wait
                blocked_wait = min(2 * blocked_wait, MAX_BLOCKED_WAIT_MS)
            else:
                timeout, blocked_wait = int(TICK_SECONDS * 1000), 1
            ready = dict(poller.poll(timeout))
            if in_socket in ready:
                self._read_in()
            if out_socket in ready:
                self._read_subscriptions()
            if len(ready) > (in_socket in ready) + (out_socket in ready):
                for monitor in self._monitors:
                    if monitor in ready:
                        self._read_monitor(monitor)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_SECONDS
                self.notifier.watchdog()
                if now >= next_status:
                    next_status = now + status_every
                    self.notifier.status(self.status_line())

    def status_line(self) -> str:
        s = self.stats
        return (
            f"in={s.received} out={s.sent} dropped={s.dropped} buffered={s.buffered} "
            f"buffered_bytes={s.buffered_bytes} subscribers={s.connections['out']}"
        )

    def flush(self, seconds: float) -> None:
        """Forward what is buffered for up to `seconds` (shutdown); what remains is unsent."""
        deadline = time.monotonic() + seconds
        while len(self.buffer) and time.monotonic() < deadline:
            if self.buffer.forward(self._send):
                time.sleep(0.005)

    def close(self) -> None:
        for monitor in self._monitors:
            monitor.close(linger=0)
        for sock in (self.in_socket, self.out_socket):
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
        self.in_socket.close(linger=0)
        self.out_socket.close()
        self._context.term()


def _log_message(message: Message, verbose: int) -> None:
    """-v: start and stop documents (decoded safely); -vvv: every message's name and size."""
    frames = [message] if isinstance(message, bytes) else list(message)
    parts = frames[0].split(b" ", 2)
    name = parts[1] if len(parts) == 3 else b"?"
    if verbose >= 3:
        log.info("%s: %d bytes", clean(name, 40), sum(len(f) for f in frames))
    if name not in (b"start", b"stop"):
        return
    from .errors import DecodeError
    from .wire import decode_message

    try:
        _, doc = decode_message(frames)
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
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s, p = self.stats, self.PREFIX
        counters = (
            ("messages_received", "Messages read from the in socket (Publishers)", s.received),
            ("messages_sent", "Messages sent on the out socket (subscribers)", s.sent),
            (
                "messages_dropped",
                "Messages sent past the buffer limit: the subscribers that were full missed them",
                s.dropped,
            ),
            ("bytes_received", "Message bytes read from the in socket", s.received_bytes),
            ("bytes_sent", "Message bytes sent on the out socket", s.sent_bytes),
            ("overflows", "Times the buffer went over its limit", s.overflows),
            ("blocked_sends", "Sends held back because a subscriber's pipe was full", s.blocked_sends),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(p + name, doc, value=value)
        gauges = (
            ("buffered_messages", "Messages in the buffer now", s.buffered),
            ("buffered_bytes", "Bytes in the buffer now (length + overhead per message)", s.buffered_bytes),
            ("buffered_bytes_peak", "Highest buffered_bytes since start", s.buffered_bytes_peak),
            ("buffer_limit_bytes", "The buffer's limit (--max-buffer-bytes)", s.max_buffer_bytes),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(p + name, doc, value=value)
        connected = GaugeMetricFamily(
            p + "connections",
            "TCP/IPC peers connected now (in: publishers, out: subscribers)",
            labels=["side"],
        )
        for side, n in sorted(s.connections.items()):
            connected.add_metric([side], n)
        yield connected


def start_metrics(address: str, stats: ProxyStats) -> Any:
    """Serve Prometheus /metrics on ``HOST:PORT`` in a thread; returns the HTTP server."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.process_collector import ProcessCollector

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--metrics-address must be HOST:PORT, not {address!r}")
    registry = CollectorRegistry()
    registry.register(ProxyCollector(stats))
    ProcessCollector(registry=registry)
    try:
        server, _thread = start_http_server(
            int(port), addr=host.strip("[]") or "127.0.0.1", registry=registry
        )
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise AddressInUse(f"--metrics-address {address}: address already in use") from None
        raise SidecarError(f"--metrics-address {address}: {err.strerror or err}") from None
    return server


# -- command line ----------------------------------------------------------------------


def run_proxy(options: ProxyOptions) -> int:
    """Bind, announce, forward until SIGTERM/SIGINT, flush, close. Returns the exit code."""
    notifier = Notifier()
    proxy = BufferingProxy(options, notifier)
    metrics = None
    try:
        if options.metrics_address:
            metrics = start_metrics(options.metrics_address, proxy.stats)
        previous = {sig: signal.signal(sig, proxy.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        print(
            f"Receiving on address {proxy.in_endpoint}; publishing to address {proxy.out_endpoint}.",
            flush=True,
        )
        log.info(
            "proxy ready: in=%s out=%s max_buffer_bytes=%d metrics=%s",
            proxy.in_endpoint,
            proxy.out_endpoint,
            options.max_buffer_bytes,
            options.metrics_address or "off",
        )
        notifier.ready(f"in={proxy.in_endpoint} out={proxy.out_endpoint}")
        try:
            proxy.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        notifier.stopping()
        proxy.flush(SHUTDOWN_FLUSH_SECONDS)
        s = proxy.stats
        log.info(
            "proxy stopped: in=%d out=%d dropped=%d unsent=%d",
            s.received,
            s.sent,
            s.dropped,
            len(proxy.buffer),
        )
        return 0
    finally:
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        proxy.close()
        notifier.close()


def options_from_args(args: argparse.Namespace) -> ProxyOptions:
    """The `proxy` subcommand's flags (see `cli`) as options; ConfigError for a bad size."""
    return ProxyOptions(
        in_address=args.in_address,
        out_address=args.out_address,
        max_buffer_bytes=parse_size(str(args.max_buffer_bytes)),
        metrics_address=args.metrics_address,
        verbose=args.verbose,
    )


def setup_proxy_logging(args: argparse.Namespace) -> None:
    """Logging for the proxy: INFO, one line per event, to stderr or ``--logfile``."""
    from .logs import TEXT_FORMAT, setup_logging

    setup_logging("INFO", "text", role="proxy")
    if args.logfile:
        handler = logging.FileHandler(args.logfile)
        handler.setFormatter(logging.Formatter("[proxy] " + TEXT_FORMAT))
        logging.getLogger().handlers[:] = [handler]
