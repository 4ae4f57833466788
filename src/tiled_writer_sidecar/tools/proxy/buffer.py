"""The proxy's buffer: a FIFO bounded in bytes, and the rule that isolates a stalled subscriber.

Messages wait at the head until every matching subscriber has room (the out
socket is an XPUB with ``ZMQ_XPUB_NODROP``, so a send that would block says
so). A message that would block is sent *lossy* instead — NODROP off for
that one send: libzmq then skips only the subscribers whose pipe is full,
every other one gets it — when either

- the head has been blocked for `stall_seconds` (a subscriber that stopped
  reading: from then on, as long as sends keep blocking, every message goes
  lossy at once; the first lossless send that goes through ends it), or
- the buffer is over its byte limit (``max_bytes``) and the head has been
  blocked for `over_grace` (the proxy: 0.2 s, so a healthy subscriber whose
  small pipe is momentarily full as a large buffer drains into it does not
  miss messages; the proxy reads nothing more while over the limit).

So a stalled subscriber holds the others back for `stall_seconds` at most,
and the bytes held exceed the limit by one message at most. Each lossy
send is one message that at least one subscriber missed (`ProxyStats.dropped`).
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tiled_writer_sidecar.errors import ConfigError

log = logging.getLogger("tiled_writer_sidecar.proxy")

#: Bytes counted per buffered message on top of its length (bytes object + deque slot).
MESSAGE_OVERHEAD = 64
#: Default ``--stall-seconds``.
DEFAULT_STALL_SECONDS = 5.0

Message = bytes

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_size(text: str) -> int:
    """``"268435456"``, ``"256MiB"``, ``"256M"`` (10**6), ``"1GiB"`` -> bytes; ConfigError otherwise."""
    match = _SIZE.match(text)
    if match is None:
        raise ConfigError(f"not a size in bytes: {text!r} (e.g. 268435456, 256MiB, 1GiB)")
    unit = (match.group(2) or "").lower().removesuffix("b")
    return int(match.group(1)) * _UNITS[unit]


@dataclass
class ProxyStats:
    """Plain counters, written by the forwarding loop and read by the metrics thread."""

    received: int = 0
    received_bytes: int = 0
    sent: int = 0
    sent_bytes: int = 0
    dropped: int = 0
    overflows: int = 0
    stalls: int = 0
    buffered: int = 0
    buffered_bytes: int = 0
    buffered_bytes_peak: int = 0
    oldest_buffered_at: float | None = None  # time.monotonic() of the head's arrival
    max_buffer_bytes: int = 0
    blocked_sends: int = 0
    subscription_frames: int = 0
    refused: dict[str, int] = field(default_factory=lambda: {"multipart": 0})
    unsent_at_shutdown: int = 0
    replayed: int = 0
    replays: int = 0
    pipe_hwm: int = 0
    connections: dict[str, int] = field(default_factory=lambda: {"in": 0, "out": 0})
    missed: dict[str, int] = field(default_factory=dict)  # per subscriber (see peers.py)


#: ``send(message, lossy)``: True if sent, False if it would block (only when not lossy).
Sender = Callable[[Message, bool], bool]
#: Hears of every message sent (after `forward` sent it): ``(message, size, replayed)``.
SentHook = Callable[[Message, int, bool], None]
#: Hears of every lossy send that some subscriber missed.
DropHook = Callable[[], None]


def _ignore_sent(message: Message, size: int, replayed: bool) -> None:
    pass


def _ignore_drop() -> None:
    pass


class BurstBuffer:
    """A FIFO of messages bounded in bytes, forwarded to a `Sender` (see the module doc)."""

    def __init__(
        self,
        max_bytes: int,
        stats: ProxyStats | None = None,
        *,
        stall_seconds: float = DEFAULT_STALL_SECONDS,
        over_grace: float = 0.0,
        on_sent: SentHook = _ignore_sent,
        on_drop: DropHook = _ignore_drop,
    ) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.low_bytes = max_bytes // 2
        self.stall_seconds = stall_seconds
        self.over_grace = over_grace
        self.stats = stats if stats is not None else ProxyStats()
        self.stats.max_buffer_bytes = max_bytes
        self.on_sent, self.on_drop = on_sent, on_drop
        # (message, size, arrival time, replayed)
        self._queue: deque[tuple[Message, int, float, bool]] = deque()
        self._bytes = 0
        self._overflowing = False
        self._blocked_since: float | None = None
        self._stalled = False

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def overflowing(self) -> bool:
        """True from an overflow until the buffer is back under half its limit (for logging)."""
        return self._overflowing

    @property
    def stalled(self) -> bool:
        """True while a subscriber that stopped reading is being skipped (see the module doc)."""
        return self._stalled

    def append(self, message: Message, now: float, *, replayed: bool = False) -> None:
        size = len(message) + MESSAGE_OVERHEAD
        self._queue.append((message, size, now, replayed))
        self._bytes += size
        stats = self.stats
        if not replayed:
            stats.received += 1
            stats.received_bytes += size - MESSAGE_OVERHEAD
        self._update_stats()
        if self._bytes > stats.buffered_bytes_peak:
            stats.buffered_bytes_peak = self._bytes

    def prepend(self, messages: list[Message], now: float) -> None:
        """Put `messages` (a replay) at the head, in their order, ahead of what waits."""
        for message in reversed(messages):
            size = len(message) + MESSAGE_OVERHEAD
            self._queue.appendleft((message, size, now, True))
            self._bytes += size
        self._update_stats()

    def _update_stats(self) -> None:
        stats, queue = self.stats, self._queue
        stats.buffered = len(queue)
        stats.buffered_bytes = self._bytes
        stats.oldest_buffered_at = queue[0][2] if queue else None

    def forward(self, send: Sender, now: float) -> bool:
        """Send from the head; return True if the head is blocked (messages remain)."""
        queue, stats = self._queue, self.stats
        blocked = False
        while queue:
            message, size, _, replayed = queue[0]
            if send(message, False):
                if self._stalled:
                    self._stalled = False
                    log.warning("every subscriber has room again: sends are lossless again")
                self._blocked_since = None
            else:
                if self._blocked_since is None:
                    self._blocked_since = now
                over = self._bytes > self.max_bytes
                if over and not self._stalled and now - self._blocked_since < self.over_grace:
                    stats.blocked_sends += 1
                    blocked = True
                    break
                if not over and not self._stalled:
                    if now - self._blocked_since < self.stall_seconds:
                        stats.blocked_sends += 1
                        blocked = True
                        break
                    self._stalled = True
                    stats.stalls += 1
                    log.warning(
                        "a subscriber has not read for %.1f s: it misses messages until it reads again",
                        now - self._blocked_since,
                    )
                elif over and not self._overflowing:
                    self._overflowing = True
                    stats.overflows += 1
                    log.warning(
                        "buffer over its limit (%d > %d bytes): a subscriber that is full misses messages",
                        self._bytes,
                        self.max_bytes,
                    )
                send(message, True)
                stats.dropped += 1
                self.on_drop()
            queue.popleft()
            self._bytes -= size
            stats.sent += 1
            stats.sent_bytes += size - MESSAGE_OVERHEAD
            self.on_sent(message, size, replayed)
        if self._overflowing and self._bytes <= self.low_bytes:
            self._overflowing = False
            log.warning("buffer back under half its limit (%d bytes)", self._bytes)
        self._update_stats()
        return blocked

    def discard(self) -> int:
        """Empty the buffer (shutdown); return how many messages were in it."""
        count = len(self._queue)
        self._queue.clear()
        self._bytes = 0
        self._update_stats()
        return count
