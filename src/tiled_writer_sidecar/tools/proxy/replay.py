"""Catch-up for a known subscriber that went away: a ring of what was sent, replayed when it is back.

A subscriber makes itself known by subscribing, on top of its own
subscription, to `REPLAY_TOPIC` (the sidecar's receiver does; no document
starts with a NUL byte, so the topic matches nothing). The out socket
reports every subscription and unsubscription (``ZMQ_XPUB_VERBOSER``); when
the last connection holding the topic goes (a restart, a crash: 0MQ
unsubscribes a closed pipe), the time is noted; when the topic is
subscribed again, every message sent since ``departure - margin`` that the
ring still holds is sent again, ahead of what waits. The margin covers what
the old process had received but not yet kept (its socket's queue when it
was stopped or killed).

The replay goes to every subscriber whose subscription matches (0MQ PUB
cannot address one), so a monitor or live plot connected meanwhile sees
those documents twice; the sidecar drops what it already has. The ring
keeps the last `seconds` of sent messages, at most `max_bytes` (oldest
forgotten first); a subscriber away longer than the ring reaches gets what
is left, and the shortfall is logged (the sidecar's gap detection counts it).
"""

from __future__ import annotations

import logging
from collections import deque

from tiled_writer_sidecar.receive.subscription import REPLAY_TOPIC

log = logging.getLogger("tiled_writer_sidecar.proxy")

#: Default ``--replay-seconds`` (how far back the ring reaches) and ``--replay-margin``.
DEFAULT_REPLAY_SECONDS = 300.0
DEFAULT_REPLAY_MARGIN = 10.0


class ReplayRing:
    """Sent messages of the last `seconds` (at most `max_bytes`), and who holds `REPLAY_TOPIC`."""

    def __init__(self, seconds: float, max_bytes: int, margin: float = DEFAULT_REPLAY_MARGIN) -> None:
        self.seconds, self.max_bytes, self.margin = seconds, max_bytes, margin
        self._ring: deque[tuple[float, bytes, int]] = deque()
        self._bytes = 0
        self._holders = 0
        self._departed: float | None = None
        self._forgotten_until = float("-inf")  # arrival of the newest message forgotten

    @property
    def enabled(self) -> bool:
        return self.seconds > 0 and self.max_bytes > 0

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def record(self, message: bytes, size: int, now: float) -> None:
        """Keep a sent message; forget what is older than `seconds` or past `max_bytes`."""
        if not self.enabled:
            return
        ring = self._ring
        ring.append((now, message, size))
        self._bytes += size
        horizon = now - self.seconds
        while ring and (self._bytes > self.max_bytes or ring[0][0] < horizon):
            at, _, size = ring.popleft()
            self._bytes -= size
            self._forgotten_until = at

    def subscription(self, frame: bytes, now: float) -> list[bytes] | None:
        """Read one subscription frame of the out socket; the messages to replay, if any."""
        if not frame or frame[1:] != REPLAY_TOPIC:
            return None
        if frame[0] == 0:
            self._holders = max(0, self._holders - 1)
            if self._holders == 0:
                self._departed = now
                log.info("the replayed subscriber went away: keeping up to %.0f s for it", self.seconds)
            return None
        self._holders += 1
        departed, self._departed = self._departed, None
        if departed is None or not self.enabled:
            return None
        since = departed - self.margin
        messages = [message for at, message, _ in self._ring if at >= since]
        log.info(
            "the replayed subscriber is back after %.1f s: replaying %d messages sent since %.1f s before "
            "it left%s",
            now - departed,
            len(messages),
            self.margin,
            " (INCOMPLETE: older messages were forgotten)" if self._forgotten_until >= since else "",
        )
        return messages
