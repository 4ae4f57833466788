"""The one HTTP server of both processes: the receiver's ``/metrics`` + ``/healthz``, the proxy's ``/metrics``.

A client, however slow or hostile, costs the process at most one thread and
one descriptor per connection served, never its other descriptors:

- a thread per connection, at most `max_connections` at once; a connection
  over the cap is accepted and closed at once, counted in `refused` (a scraper
  retries at its next interval; nothing waits in the listen queue for a slot);
- each read or write of a connection waits at most `READ_TIMEOUT_S`, and the
  connection is hung up `DEADLINE_S` after it was accepted, however it trickles;
- out of file descriptors (``accept`` fails with EMFILE/ENFILE): one
  descriptor is held in reserve; it is released, the waiting client accepted
  and closed at once, the reserve taken back, counted in `fd_exhausted`, so
  the listener never spins. Should the reserve be lost (another thread took
  the descriptor), accepting pauses `ACCEPT_PAUSE_S` after each failure;
- refusals and exhaustion are logged at the first and every 1000th; a client
  that goes away is one debug line, any other handler error one info line,
  never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tiled_writer_sidecar.text import one_line

log = logging.getLogger(__name__)

#: A client silent this long (per read or write) is dropped: half-sent requests hold nothing for long.
READ_TIMEOUT_S = 5.0
#: ... and hung up this long after it connected, however it trickles.
DEADLINE_S = 15.0
#: After a failed accept with no reserve descriptor to fall back on, the next accept waits this long.
ACCEPT_PAUSE_S = 0.5
#: Refusals and descriptor exhaustion are logged at the first and every this many.
LOG_EVERY = 1000
#: The serving thread looks for a `stop` this often.
POLL_S = 0.1


class BoundedHTTPServer(ThreadingHTTPServer):
    """`handler` on `address`, bounded as the module docstring states; `name` starts each log line."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        name: str,
        max_connections: int,
        read_timeout_s: float = READ_TIMEOUT_S,
        deadline_s: float = DEADLINE_S,
    ) -> None:
        self.name = name
        self.read_timeout_s = read_timeout_s
        self.deadline_s = deadline_s
        self.refused = 0
        self.fd_exhausted = 0
        self._slots = threading.BoundedSemaphore(max_connections)
        self._reserve: int | None = None
        self._thread: threading.Thread | None = None
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self._reserve = os.open(os.devnull, os.O_RDONLY)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        """Serve in a daemon thread named `name`."""
        self._thread = threading.Thread(
            target=self.serve_forever, args=(POLL_S,), name=self.name, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving (if started) and close the listener and the reserve descriptor."""
        if self._thread is not None:
            self.shutdown()
            self._thread = None
        self.server_close()

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as err:
            if err.errno in (errno.EMFILE, errno.ENFILE):
                self._out_of_descriptors()
            raise

    def _out_of_descriptors(self) -> None:
        """Close the client waiting to be accepted with the reserve descriptor, or pause (module docstring)."""
        self.fd_exhausted += 1
        if self.fd_exhausted == 1 or self.fd_exhausted % LOG_EVERY == 0:
            log.warning("%s: no file descriptor left, a client was closed (%d)", self.name, self.fd_exhausted)
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
            self.socket.setblocking(False)  # the client may have gone meanwhile: never wait for another
            with contextlib.suppress(OSError):
                client, _ = self.socket.accept()
                client.close()
            self.socket.setblocking(True)
        try:
            self._reserve = os.open(os.devnull, os.O_RDONLY)
        except OSError:
            time.sleep(ACCEPT_PAUSE_S)  # no reserve: pause rather than spin on a pending client

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            if self.refused == 1 or self.refused % LOG_EVERY == 0:
                log.warning("%s: all connections busy, a client was refused (%d)", self.name, self.refused)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        deadline = threading.Timer(self.deadline_s, _hang_up, (request,))
        deadline.daemon = True
        try:
            request.settimeout(self.read_timeout_s)
            deadline.start()
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        gone = isinstance(error, (BrokenPipeError, ConnectionResetError, TimeoutError))  # the client's doing
        log.log(
            logging.DEBUG if gone else logging.INFO,
            "%s client %s: %s",
            self.name,
            client_address[0] if client_address else "?",
            one_line(error) if error is not None else "connection failed",
        )

    def server_close(self) -> None:
        super().server_close()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None


def _hang_up(connection: socket.socket) -> None:
    """End a connection past its deadline: its thread's next read or write fails at once."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


__all__ = ["ACCEPT_PAUSE_S", "DEADLINE_S", "READ_TIMEOUT_S", "BoundedHTTPServer"]
