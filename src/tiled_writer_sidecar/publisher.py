"""bluesky's `Publisher` with a send queue deep enough for a burst, that loses no first document.

`deep_publisher` builds bluesky's own `Publisher` (same arguments, same wire:
``prefix name pickle``, so `RemoteDispatcher`, bluesky-0MQ-proxy and the
sidecar see no difference), then

- waits, up to `connect_timeout` seconds, until the proxy has subscribed:
  0MQ's PUB drops whatever it sends before the subscriber's subscription has
  reached it (the "slow joiner"), so documents sent right after a plain
  Publisher is made are lost. A PUB cannot tell when that happened; an XPUB,
  which speaks the same wire, can (it receives the subscription), so the
  Publisher's socket is replaced by an XPUB with the same options and
  address before anything is sent. Measured cost: a few milliseconds with a
  proxy listening; the whole `connect_timeout` (then one warning) without.
- sets the socket's ``ZMQ_SNDHWM`` to `queue_messages`: what is published
  while the proxy is away is queued, up to `queue_messages`, and delivered
  when it is back. ``ZMQ_SNDBUF`` is left alone.

Only bluesky and pyzmq are imported (this module must install into a
RunEngine's environment alone). The one private attribute used is
``Publisher._socket``; it is checked, and a bluesky without it fails at once
with one line (`IncompatibleBluesky`) naming the supported versions. Why, and
what it cannot save: docs/design.md, "What 0MQ loses, and how it is reported".
"""

from __future__ import annotations

import logging
import time
from importlib.metadata import version
from typing import Any, TypeVar

import zmq
from bluesky.callbacks.zmq import Publisher

log = logging.getLogger("tiled_writer_sidecar.publisher")

_P = TypeVar("_P", bound=Publisher)

#: Default ``connect_timeout`` (seconds): how long `deep_publisher` waits for the proxy's subscription.
DEFAULT_CONNECT_TIMEOUT = 2.0
#: Socket options copied from bluesky's PUB to the XPUB that replaces it.
_COPIED_OPTIONS = (zmq.SNDHWM, zmq.LINGER, zmq.SNDBUF)
_CURVE_OPTIONS = (zmq.CURVE_PUBLICKEY, zmq.CURVE_SECRETKEY, zmq.CURVE_SERVERKEY)


class PublisherConfigError(ValueError):
    """A bad argument to `deep_publisher` / `deepen` (one line)."""


class IncompatibleBluesky(RuntimeError):
    """The installed bluesky's Publisher lacks what `deep_publisher` relies on (one line)."""


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


def deep_publisher(
    address: str | tuple[str, int],
    *,
    queue_messages: int = DEFAULT_QUEUE_MESSAGES,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
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

    It returns once the proxy has subscribed, or after `connect_timeout`
    seconds (0: do not wait, keep bluesky's PUB socket), so the documents
    sent next are not dropped by 0MQ's slow joiner (the module doc).

    On close, 0MQ's default linger (wait until queued documents are sent)
    is kept, as with bluesky's Publisher.
    """
    if (
        isinstance(connect_timeout, bool)
        or not isinstance(connect_timeout, int | float)
        or connect_timeout < 0
    ):
        raise PublisherConfigError(f"connect_timeout must be >= 0 seconds, not {connect_timeout!r}")
    publisher = Publisher(address, **publisher_kwargs)
    try:
        deepen(publisher, queue_messages=queue_messages)
        if connect_timeout > 0:
            wait_subscribed(publisher, connect_timeout)
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
        raise PublisherConfigError(
            f"queue_messages must be a positive number of messages, not {queue_messages!r}"
        )
    socket = publisher_socket(publisher)
    if zmq.zmq_version_info() < MIN_LIBZMQ:
        raise IncompatibleBluesky(
            f"libzmq {zmq.zmq_version()} does not change the queue of a connected socket; "
            f"deep_publisher needs libzmq >={'.'.join(map(str, MIN_LIBZMQ))} (pyzmq's wheels bundle 4.3)"
        )
    socket.setsockopt(zmq.SNDHWM, queue_messages)
    return publisher


def wait_subscribed(publisher: Publisher, timeout: float) -> float:
    """Swap the Publisher's PUB for an XPUB and wait up to `timeout` s for a subscription; seconds waited.

    Nothing is lost by the swap (nothing has been sent yet: call it right after
    the Publisher is made). Without a subscription in time, one warning.
    """
    old = publisher_socket(publisher)
    started = time.monotonic()
    xpub = old.context.socket(zmq.XPUB)
    try:
        for option in _COPIED_OPTIONS:
            xpub.setsockopt(option, old.getsockopt(option))
        if old.getsockopt(zmq.MECHANISM) == zmq.CURVE:
            for option in _CURVE_OPTIONS:
                xpub.setsockopt(option, old.getsockopt(option))
        xpub.connect(publisher.address)
    except BaseException:
        xpub.close(linger=0)
        raise
    old.close(linger=0)
    publisher._socket = xpub
    if xpub.poll(int(timeout * 1000)):
        xpub.recv()  # the subscription (it has reached the trie that filters what is sent)
    else:
        log.warning(
            "no subscriber at %s after %.1f s: documents sent before the proxy subscribes are dropped",
            publisher.address,
            timeout,
        )
    return time.monotonic() - started


def publisher_socket(publisher: Publisher) -> zmq.Socket[Any]:
    """The Publisher's socket (``Publisher._socket``: bluesky's PUB, or the XPUB that replaced it),
    or `IncompatibleBluesky` in one line."""
    socket = getattr(publisher, "_socket", None)
    if not isinstance(socket, zmq.Socket) or socket.closed or socket.type not in (zmq.PUB, zmq.XPUB):
        raise IncompatibleBluesky(
            f"bluesky {version('bluesky')}'s Publisher has no open PUB socket at _socket; "
            f"deep_publisher supports {SUPPORTED_BLUESKY}"
        )
    return socket


def send_queue(publisher: Publisher) -> int:
    """The Publisher's send queue in messages (its socket's SNDHWM; 0MQ's default is 1,000)."""
    return int(publisher_socket(publisher).getsockopt(zmq.SNDHWM))
