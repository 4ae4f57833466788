"""Who the out socket's subscribers are, and how many messages each one missed.

0MQ's XPUB does not say which subscriber a lossy send skipped, nor that it
goes on skipping it: a full pipe is taken out of the send set until its
reader has drained it to half, and sends succeed meanwhile without it. The
kernel tells which one it is: libzmq fills a pipe only once the
subscriber's TCP connection takes no more, so a subscriber that stopped
reading has bytes in its socket's send queue (``SIOCOUTQ``) that do not
move. Each connection is known from the socket monitor (descriptor, peer
``HOST:PORT``); `sample` (every tick) notes each one's queue, and one whose
queue is non-empty and unchanged since the previous tick is *stalled*; so
is, when no tick has seen one yet, one whose queue holds at least half its
send buffer at the lossy send.

A lossy send marks every stalled subscriber *skipped* (none: counted once
as ``unattributed``); each message sent while a subscriber is skipped,
that one included, counts as missed by it, until a tick sees its queue
move. So the count is over by what is sent between libzmq taking messages
for it again and that tick, and short by what is sent after its queue
moved and before libzmq re-admits its pipe (once half of it is read):
within one tick's messages at each end (docs/design.md).
`ProxyStats.dropped` counts the lossy sends.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import struct
import termios

log = logging.getLogger("tiled_writer_sidecar.proxy")

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
        self._stalled: dict[int, str] = {}
        self._skipped: dict[int, str] = {}

    def accepted(self, fd: int, endpoint: str) -> str:
        name = _peer_name(fd, f"{endpoint}#{fd}")
        self._names[fd] = name
        self._queued[fd] = 0
        self.missed.setdefault(name, 0)
        self._trim()
        return name

    def disconnected(self, fd: int) -> str | None:
        self._queued.pop(fd, None)
        self._stalled.pop(fd, None)
        self._skipped.pop(fd, None)
        return self._names.pop(fd, None)

    def sample(self) -> None:
        """Note each connection's send queue; stalled: non-empty and unchanged since the last sample."""
        stalled = {}
        for fd, name in self._names.items():
            queued = _send_queue(fd)
            if queued > 0 and queued == self._queued.get(fd):
                stalled[fd] = name
            self._queued[fd] = queued
        self._stalled = stalled
        for fd in [fd for fd in self._skipped if fd not in stalled]:
            name = self._skipped.pop(fd)
            log.warning(
                "subscriber %s reads again; it missed %d messages so far", name, self.missed.get(name, 0)
            )

    def skipped(self) -> None:
        """A lossy send: the stalled subscribers are skipped from now on (see the module doc)."""
        stalled = self._stalled or self._full_now()
        if not stalled:
            self.missed[UNATTRIBUTED] = self.missed.get(UNATTRIBUTED, 0) + 1
            return
        for fd, name in stalled.items():
            if fd not in self._skipped:
                self._skipped[fd] = name
                log.warning("subscriber %s stopped reading: it misses messages until it reads again", name)

    def _full_now(self) -> dict[int, str]:
        """Connections whose send queue holds at least half their send buffer (no tick has seen them yet)."""
        full = {}
        for fd, name in self._names.items():
            queued = _send_queue(fd)
            with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
                if queued > 0 and 2 * queued >= sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2:
                    full[fd] = name
        return full

    def sent(self) -> None:
        """One message sent: missed by every skipped subscriber."""
        if self._skipped:
            missed = self.missed
            for name in self._skipped.values():
                missed[name] = missed.get(name, 0) + 1

    def _trim(self) -> None:
        connected = set(self._names.values())
        for name in list(self.missed):
            if len(self.missed) <= MAX_SUBSCRIBERS_SHOWN:
                break
            if name not in connected and name != UNATTRIBUTED:
                del self.missed[name]
