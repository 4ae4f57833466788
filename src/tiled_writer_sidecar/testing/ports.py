"""Free ports and deadline-bounded polling.

`free_port` asks the kernel for an unused 127.0.0.1 port (bind to port 0,
read it back, close). There is a small race until the caller binds it, so
process fixtures treat "address already in use" at start-up as retryable.
`wait_until` is the only way fixtures wait: poll a predicate every
`interval` seconds until it returns something truthy or `timeout` passes,
then raise `TimeoutError` naming `what`. There is no fixed sleep anywhere.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

LOCALHOST = "127.0.0.1"


def free_port(host: str = LOCALHOST) -> int:
    """Return a TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    what: str = "a condition",
) -> T:
    """Poll `predicate` until it returns a truthy value, and return that value.

    The predicate is always called at least once, and once more right at the
    deadline. Exceptions from the predicate propagate: a predicate that may
    fail transiently (a refused connection) must catch that itself.

    Raises:
        TimeoutError: the predicate stayed falsy for `timeout` seconds; the
            message names `what`.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(min(interval, remaining))
