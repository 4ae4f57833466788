"""bluesky's `Publisher` with a send queue deep enough for a burst: `deep_publisher`.

`deep_publisher` builds bluesky's own `Publisher`, unchanged (same arguments,
same wire: ``prefix name pickle``, so `RemoteDispatcher`, bluesky-0MQ-proxy
and the sidecar see no difference), then sets its socket's ``ZMQ_SNDHWM`` to
`queue_messages`. The connection already made and every reconnection take
the new value, so nothing is reconnected; what is published while the proxy
is away is queued, up to `queue_messages`, and delivered when it is back.
``ZMQ_SNDBUF`` is left alone.

The one private attribute used is ``Publisher._socket``; it is checked, and a
bluesky without it fails at once with one line (`IncompatibleDependency`)
naming the supported versions. Why, and what it cannot save:
docs/design.md, "What 0MQ loses, and how it is reported".
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any, TypeVar

import zmq
from bluesky.callbacks.zmq import Publisher

from .errors import ConfigError, IncompatibleDependency

_P = TypeVar("_P", bound=Publisher)

#: Default send queue, in messages (one message = one document). A 200,000-event run
#: (~200,003 documents) fits whole even when the proxy reads nothing during it. Memory
#: is only used while the proxy lags: ~370 bytes per typical scalar event (271 bytes
#: pickled + ~100 bytes of 0MQ bookkeeping), so ~90 MiB when full.
DEFAULT_QUEUE_MESSAGES = 250_000
#: What 0MQ's own default holds (ZMQ_SNDHWM), for comparison.
ZMQ_DEFAULT_SNDHWM = 1_000
#: bluesky versions whose Publisher keeps its PUB socket at ``_socket`` (as pyproject.toml).
SUPPORTED_BLUESKY = "bluesky >=1.14"
#: libzmq applies a changed SNDHWM to already-connected pipes from this version on.
MIN_LIBZMQ = (4, 2)
#: libzmq's bookkeeping per queued message (zmq_msg_t slot + allocation header), measured.
MESSAGE_OVERHEAD_BYTES = 100


def deep_publisher(
    address: str | tuple[str, int],
    *,
    queue_messages: int = DEFAULT_QUEUE_MESSAGES,
    **publisher_kwargs: Any,
) -> Publisher:
    """bluesky's `Publisher(address, **publisher_kwargs)` whose send queue holds `queue_messages`.

    Use it where you would use `Publisher`::

        RE.subscribe(deep_publisher("localhost:5577"))

    Memory: at most ``queue_messages x (pickled document size + ~100 bytes)``
    in the RunEngine's process, and only while the proxy falls behind or is
    down (the queue is empty otherwise). A typical scalar event pickles to
    ~270 bytes, so the default (250,000) costs ~90 MiB when full; events with
    hundreds of fields (~10 kB each) would cost ~2.5 GiB, so lower
    `queue_messages` for those. When the queue is full, PUB drops further
    documents as it does at 0MQ's default of 1,000; the sidecar reports the
    gap.

    On close, 0MQ's default linger (wait until queued documents are sent)
    is kept, as with bluesky's Publisher.
    """
    publisher = Publisher(address, **publisher_kwargs)
    try:
        deepen(publisher, queue_messages=queue_messages)
    except BaseException:
        publisher.close()  # type: ignore[no-untyped-call]
        raise
    return publisher


def deepen(publisher: _P, *, queue_messages: int = DEFAULT_QUEUE_MESSAGES) -> _P:
    """Give an existing (connected) `Publisher` a send queue of `queue_messages`; return it.

    For Publishers made elsewhere (a subclass, a profile's own); the
    connection it already has is deepened in place, nothing is dropped or
    reconnected. See `deep_publisher` for the memory cost.
    """
    if isinstance(queue_messages, bool) or not isinstance(queue_messages, int) or queue_messages < 1:
        raise ConfigError(f"queue_messages must be a positive number of messages, not {queue_messages!r}")
    socket = publisher_socket(publisher)
    if zmq.zmq_version_info() < MIN_LIBZMQ:
        raise IncompatibleDependency(
            f"libzmq {zmq.zmq_version()} does not change the queue of a connected socket; "
            f"deep_publisher needs libzmq >={'.'.join(map(str, MIN_LIBZMQ))} (pyzmq's wheels bundle 4.3)"
        )
    socket.setsockopt(zmq.SNDHWM, queue_messages)
    return publisher


def publisher_socket(publisher: Publisher) -> zmq.Socket[Any]:
    """The Publisher's PUB socket (``Publisher._socket``), or `IncompatibleDependency` in one line."""
    socket = getattr(publisher, "_socket", None)
    if not isinstance(socket, zmq.Socket) or socket.closed or socket.type != zmq.PUB:
        raise IncompatibleDependency(
            f"bluesky {version('bluesky')}'s Publisher has no open PUB socket at _socket; "
            f"deep_publisher supports {SUPPORTED_BLUESKY}"
        )
    return socket


def send_queue(publisher: Publisher) -> int:
    """The Publisher's send queue in messages (its socket's SNDHWM; 0MQ's default is 1,000)."""
    return int(publisher_socket(publisher).getsockopt(zmq.SNDHWM))
