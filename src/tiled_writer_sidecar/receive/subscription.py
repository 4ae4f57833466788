"""Subscription: a SUB socket on bluesky's 0MQ proxy, for the daemon and the monitor.

Contract:

- Connects (never binds) to ``[zmq] address`` and subscribes to the
  configured prefix, with a deep receive queue (``rcvhwm`` messages, a large
  kernel buffer) and CURVE when keys are configured. With `catch_up` (the
  receiver) it also subscribes to `REPLAY_TOPIC`, so the
  project's proxy replays what it sent while this process was away.
- Never sets ``ZMQ_MAXMSGSIZE``: libzmq (4.3.5, measured) treats a larger
  message as a protocol error and drops the connection for good, silently
  (DISCONNECTED, no reconnection: tests/e2e/test_hostile_round2.py). Sizes
  are the decoder's business (``max_message_bytes``: counted and
  quarantined); a multipart message is refused as it is read (`drain`).
- `watch` reads the socket's connection events; `connected` and `problem`
  (a refused CURVE handshake) hold the state, each change logged once;
  `connects` and `retries` count connections made and attempts refused
  (nothing listens yet), so a reader that looks now and then misses none.
- `absent` says, once `NO_PROXY_WARN_S` pass without a connection (nothing
  listens at the address, or a firewall drops it), that the proxy is missing,
  logged once per episode; the daemon's ``/healthz`` is then degraded.
- `wait` paces wakes: below `LOW_RATE` messages/s wakes are at least
  `WAKE_INTERVAL_S` apart, so what arrives meanwhile is handled in one batch
  (the socket's queue holds it; nothing upstream backs up). `drain` then
  hands each waiting message to a handler, at most `MAX_BATCH` per wake.
- Queued bytes are bounded (`max_queued_bytes`), not only messages: `drain`
  moves what 0MQ holds into the subscription's own queue before it handles
  any, and again after each `PULL_BYTES` (or `PULL_MESSAGES`) handled, so
  0MQ holds at most what arrives while that much is handled. A message that
  would take the queue past its bound goes to `overflow` instead, as its
  first 64 KiB and its length, never copied whole, so overflowing is cheap
  (the receiver rejects it as ``queue-full``: counted and quarantined,
  never silently lost); `overflowed` counts them. Large messages wait as
  0MQ's own buffers (``copy=False``), copied only as they are handled.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from tiled_writer_sidecar.config import ZmqConfig

log = logging.getLogger(__name__)

WAKE_INTERVAL_S = 0.01  # wakes at most this often at low rates (see `wait`)
LOW_RATE = 2000  # messages/s: below it, wakes are spaced out ...
RATE_WINDOW_S = 0.1  # ... as measured over this long
MAX_BATCH = 10_000  # messages handled per wake at most, so upkeep is never starved
RCVBUF = 8 * 2**20
#: The topic a subscriber adds to be replayed to after a reconnection (the proxy's `ReplayRing`):
#: no document starts with a NUL byte, so it matches nothing else.
REPLAY_TOPIC = b"\x00tiled-writer-sidecar/replay"
NO_PROXY_WARN_S = 5.0  # without a proxy connection this long: `absent` is set and logged
#: Bytes of messages received and not yet handled, at most (see the module docstring).
MAX_QUEUED_BYTES = 256 * 2**20
#: While draining, what 0MQ holds is moved into the queue after this many bytes or messages handled.
PULL_BYTES, PULL_MESSAGES = 2**20, 1_000
#: Bytes counted per queued message on top of its length.
QUEUE_OVERHEAD = 100

#: A message of this many bytes or more waits as 0MQ's own buffer, copied only as it is handled.
ZERO_COPY_FROM = 2**16
#: What `overflow` gets of a message the queue has no room for: its first bytes (and its length).
OVERFLOW_KEPT = 2**16

Frames = list[bytes]

_HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed (wrong server key?)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake protocol error (CURVE on one side only?)",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication refused (client key not admitted?)",
}


class Subscription:
    """The SUB socket, its connection state and wake pacing; see the module docstring."""

    def __init__(
        self,
        config: ZmqConfig,
        *,
        pace: bool = True,
        catch_up: bool = False,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        overflow: Callable[[bytes, int], None] | None = None,
    ) -> None:
        self.config = config
        self.pace = pace
        self.max_queued_bytes = max_queued_bytes
        self.overflowed = 0  # messages handed to `overflow` (the queue was full)
        self.queued_bytes_peak = 0
        self._overflow = overflow
        self._queue: deque[tuple[list[Any], int]] = deque()  # a large first frame: a zmq.Frame
        self._queued_bytes = 0
        self.connected = False
        self.problem: str | None = None
        self.connects = 0  # connections made (a reconnection counts again)
        self.retries = 0  # connection attempts that found nothing listening
        self.absent: str | None = None  # why there is no proxy connection, after NO_PROXY_WARN_S
        self._down_since = time.monotonic()
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._last_wake = 0.0
        self._rate_since = 0.0
        self._rate_count = 0
        self._slow = True
        prefix = config.prefix.encode()
        socket: zmq.Socket[bytes] = self._context.socket(zmq.SUB)
        try:
            socket.setsockopt(zmq.RCVHWM, config.rcvhwm)
            socket.setsockopt(zmq.RCVBUF, RCVBUF)
            socket.setsockopt(zmq.LINGER, 0)
            if config.curve_secret_key_file:
                from tiled_writer_sidecar.receive.curve import apply_client_curve

                apply_client_curve(socket, config)
            socket.setsockopt(zmq.SUBSCRIBE, prefix + b" " if prefix else b"")
            if catch_up:  # after the main subscription: the proxy replays once it has both
                socket.setsockopt(zmq.SUBSCRIBE, REPLAY_TOPIC)
            self._events: zmq.Socket[bytes] = socket.get_monitor_socket()
            socket.connect(config.address)
        except BaseException:
            socket.close(linger=0)
            self._context.term()
            raise
        self.socket = socket

    def wait(self, timeout_ms: int) -> bool:
        """Wait up to `timeout_ms` for a message (paced, see the module docstring); True if one waits."""
        if self._queue:
            return True
        if not self.socket.poll(timeout_ms):
            return False
        if self.pace:
            now = time.monotonic()
            if now - self._rate_since >= RATE_WINDOW_S:
                self._slow = self._rate_count < LOW_RATE * (now - self._rate_since)
                self._rate_since, self._rate_count = now, 0
            pause = self._last_wake + WAKE_INTERVAL_S - now
            if pause > 0 and self._slow:
                time.sleep(pause)
            self._last_wake = time.monotonic()
        return True

    @property
    def queued_bytes(self) -> int:
        """Bytes of the messages received and not handled yet (0MQ's own queue aside)."""
        return self._queued_bytes

    def drain(self, handle: Callable[[Frames], None], limit: int = MAX_BATCH) -> int:
        """Hand each waiting message (its frames) to `handle`, in order, at most `limit`; return how many.

        A message of more than one frame (bluesky's Publisher sends one) is
        handed over as its first frame and one empty frame: the others are
        dropped one by one as they are read, never gathered (5 million
        one-byte frames were a list of 300 MB).
        """
        self._pull()
        queue = self._queue
        count = handled = 0
        while queue and count < limit:
            frames, size = queue.popleft()
            self._queued_bytes -= size
            if not isinstance(frames[0], bytes):
                frames[0] = frames[0].bytes
            handle(frames)
            count += 1
            handled += size
            if handled >= PULL_BYTES or count % PULL_MESSAGES == 0:
                self._pull()
                handled = 0
        self._rate_count += count
        return count

    def _pull(self) -> None:
        """Move what 0MQ holds into the queue, up to `MAX_BATCH` messages; past the byte bound: `overflow`."""
        socket = self.socket
        recv, queue = socket.recv, self._queue
        for _ in range(MAX_BATCH):
            try:
                frame = recv(zmq.NOBLOCK, copy=False)  # 0MQ's buffer, not a copy, until it is handled
            except zmq.Again:
                return
            first = frame.bytes if len(frame) < ZERO_COPY_FROM else frame
            frames: list[Any] = [first]
            if frame.more:
                while recv(copy=False).more:
                    pass
                frames.append(b"")
            size = len(frame) + QUEUE_OVERHEAD
            if queue and self._queued_bytes + size > self.max_queued_bytes:
                self.overflowed += 1
                if (
                    self._overflow is not None
                ):  # its first OVERFLOW_KEPT bytes and its length: never copied whole
                    self._overflow(bytes(frame.buffer[:OVERFLOW_KEPT]), len(frame))
                elif self.overflowed == 1 or self.overflowed % 1000 == 0:
                    log.warning(
                        "receive queue full (%d bytes queued, %d bytes arrived): %d messages overflowed",
                        self._queued_bytes,
                        size,
                        self.overflowed,
                    )
                continue
            queue.append((frames, size))
            self._queued_bytes += size
            if self._queued_bytes > self.queued_bytes_peak:
                self.queued_bytes_peak = self._queued_bytes

    def watch(self) -> None:
        """Read connection events: log each change once, keep `connected` and `problem`."""
        while self._events.poll(0):
            event = zmq.Event(recv_monitor_message(self._events)["event"])
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED or (
                event == zmq.EVENT_CONNECTED and not self.config.curve_secret_key_file
            ):
                if self.problem or not self.connected:
                    log.info("subscribed to the proxy at %s", self.config.address)
                self.absent = None
                if not self.connected:
                    self.connects += 1
                self.connected, self.problem = True, None
            elif event == zmq.EVENT_DISCONNECTED:
                self.connected = False
                self._down_since = time.monotonic()
                log.warning("proxy at %s disconnected; reconnecting", self.config.address)
            elif event == zmq.EVENT_CONNECT_RETRIED:
                self.retries += 1
            elif event in _HANDSHAKE_FAILURES:
                problem = f"the proxy refused the subscription: {_HANDSHAKE_FAILURES[event]}"
                if problem != self.problem:
                    log.error("%s (check the CURVE keys in [zmq])", problem)
                self.problem = problem
        waited = time.monotonic() - self._down_since
        if not self.connected and self.absent is None and waited >= NO_PROXY_WARN_S:
            self.absent = (
                f"no connection to the proxy at {self.config.address} for {waited:.0f} s "
                f"({self.retries} attempts refused); check [zmq] address and that the proxy runs"
            )
            log.warning("%s", self.absent)

    def close(self) -> None:
        self.socket.disable_monitor()
        self._events.close(linger=0)
        self.socket.close(linger=0)
        self._context.term()
