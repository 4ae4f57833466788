"""Who the out socket's subscribers are, and which of them a lossy send skipped.

0MQ's XPUB does not say which subscriber's pipe was full when a lossy send
skipped it. The kernel does: libzmq stops filling a pipe only when the
subscriber's TCP connection takes no more, so a subscriber that stopped
reading has bytes waiting in its socket's send queue (``SIOCOUTQ``) that do
not move. Each connection is known from the socket monitor (its descriptor
and peer ``HOST:PORT``); `sample` (every tick) notes each one's queue, and a
connection whose queue is non-empty and unchanged since the previous sample
is *stalled*. `missed` adds one to every stalled subscriber per lossy send,
or to ``unattributed`` when none is (a pipe full past its byte share while
the connection still moves). Exact when one subscriber stalls at a time (the
sleeping laptop); `ProxyStats.dropped` counts every lossy send exactly.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import termios

#: Label of misses no stalled connection explains.
UNATTRIBUTED = "unattributed"
#: Subscribers kept in the per-subscriber metric (connected ones first, then the latest gone).
MAX_SUBSCRIBERS_SHOWN = 64


def _peer_name(fd: int, fallback: str) -> str:
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
        peer = sock.getpeername()
        if isinstance(peer, tuple):
            return f"{peer[0]}:{peer[1]}"
        return str(peer) or fallback
    return fallback


def _send_queue(fd: int) -> int:
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except OSError:
        return -1


class Peers:
    """The out socket's connections (by descriptor) and their misses, kept in `missed`."""

    def __init__(self, missed: dict[str, int]) -> None:
        self.missed = missed
        self._names: dict[int, str] = {}
        self._queued: dict[int, int] = {}
        self._stalled: list[str] = []

    def accepted(self, fd: int, endpoint: str) -> str:
        name = _peer_name(fd, f"{endpoint}#{fd}")
        self._names[fd] = name
        self._queued[fd] = 0
        self.missed.setdefault(name, 0)
        self._trim()
        return name

    def disconnected(self, fd: int) -> str | None:
        self._queued.pop(fd, None)
        return self._names.pop(fd, None)

    def sample(self) -> None:
        """Note each connection's send queue; stalled: non-empty and unchanged since the last sample."""
        stalled = []
        for fd, name in self._names.items():
            queued = _send_queue(fd)
            if queued > 0 and queued == self._queued.get(fd):
                stalled.append(name)
            self._queued[fd] = queued
        self._stalled = stalled

    def skipped(self) -> None:
        """One lossy send: count it for every stalled subscriber (or as unattributed)."""
        missed = self.missed
        for name in self._stalled or (UNATTRIBUTED,):
            missed[name] = missed.get(name, 0) + 1

    def _trim(self) -> None:
        connected = set(self._names.values())
        for name in list(self.missed):
            if len(self.missed) <= MAX_SUBSCRIBERS_SHOWN:
                break
            if name not in connected and name != UNATTRIBUTED:
                del self.missed[name]
