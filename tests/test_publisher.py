"""`tiled_writer_sidecar.publisher`: bluesky's Publisher with a deep send queue, on the real libzmq.

Everything runs in this process with real 0MQ sockets on 127.0.0.1 (no
proxy process): the socket option is what was asked, libzmq applies it to
the connection `Publisher.__init__` already made (the premise of the
design), a queue survives a proxy restart, bad arguments and an
incompatible bluesky fail in one line, and the wire is bluesky's: the same
frames as the stock Publisher, read back by bluesky's `RemoteDispatcher`.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import event_model
import pytest
import zmq
from bluesky.callbacks.zmq import Publisher, RemoteDispatcher

from tiled_writer_sidecar.publisher import (
    DEFAULT_QUEUE_MESSAGES,
    ZMQ_DEFAULT_SNDHWM,
    IncompatibleBluesky,
    PublisherConfigError,
    deep_publisher,
    deepen,
    send_queue,
)
from tiled_writer_sidecar.testing import DocumentRecorder, free_port, wait_until

Document = tuple[str, dict[str, Any]]

#: More messages than 0MQ's default queue plus what the kernel's socket buffers hold.
OVERFLOW = 30_000


def a_run(events: int, *, padding: int = 0) -> list[Document]:
    """start, descriptor, `events` events (each with `padding` bytes of text), stop (event-model)."""
    bundle = event_model.compose_run(metadata={"plan_name": "test_publisher"})
    docs: list[Document] = [("start", dict(bundle.start_doc))]
    desc = bundle.compose_descriptor(
        data_keys={
            "det": {"source": "SIM:det", "dtype": "number", "shape": []},
            "note": {"source": "SIM:note", "dtype": "string", "shape": []},
        },
        name="primary",
    )
    docs.append(("descriptor", dict(desc.descriptor_doc)))
    now = time.time()
    for i in range(1, events + 1):
        event = desc.compose_event(
            data={"det": i * 0.5, "note": "x" * padding},
            timestamps={"det": now, "note": now},
            seq_num=i,
            time=now,
            validate=False,
        )
        docs.append(("event", dict(event)))
    docs.append(("stop", dict(bundle.compose_stop())))
    return docs


class BoundSub:
    """A SUB bound to a port, as the proxy's `in` socket is; `stalled` keeps 0MQ from reading ahead."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], port: int, *, stalled: bool = False) -> None:
        self.socket = context.socket(zmq.SUB)
        if stalled:  # a proxy that does not read: 10 messages, a 4 KiB kernel buffer
            self.socket.setsockopt(zmq.RCVHWM, 10)
            self.socket.setsockopt(zmq.RCVBUF, 4096)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.bind(f"tcp://127.0.0.1:{port}")

    def wait_joined(self, publisher: Publisher) -> None:
        """Send probe frames until one arrives (PUB drops everything before the subscription)."""

        def arrived() -> bool:
            publisher._socket.send(b"probe")
            return bool(self.socket.poll(20))

        wait_until(arrived, 10, interval=0.0, what="the publisher's subscription")
        while self.socket.poll(100):
            self.socket.recv()

    def serving(self, make: Callable[[], Publisher]) -> Publisher:
        """`make()` run in a thread while this socket is polled, as a proxy's loop polls its in socket
        (a SUB sends its subscription to a new peer only when its own thread calls into 0MQ)."""
        made: list[Publisher] = []
        maker = threading.Thread(target=lambda: made.append(make()), daemon=True)
        maker.start()
        while maker.is_alive():
            self.socket.poll(5, zmq.POLLOUT)
        assert made, "the Publisher was not made"
        return made[0]

    def drain(self, quiet_ms: int = 1_000) -> list[bytes]:
        """Every frame until none arrived for `quiet_ms`."""
        frames = []
        while self.socket.poll(quiet_ms):
            frames.append(self.socket.recv())
        return frames

    def close(self) -> None:
        self.socket.close(linger=0)


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def publishers() -> Iterator[list[Publisher]]:
    """A list the test appends its Publishers to; each is closed in teardown."""
    made: list[Publisher] = []
    yield made
    for publisher in made:
        publisher._socket.setsockopt(zmq.LINGER, 0)  # never wait on a peer the test closed
        publisher.close()


def test_the_socket_gets_the_asked_queue_and_the_stock_one_keeps_0mqs(publishers: list[Publisher]) -> None:
    """deep_publisher's PUB socket has SNDHWM = queue_messages (default DEFAULT_QUEUE_MESSAGES);
    bluesky's own Publisher has 0MQ's 1,000; Publisher's own arguments pass through."""
    address = f"127.0.0.1:{free_port()}"
    default = deep_publisher(address, connect_timeout=0)
    asked = deep_publisher(address, queue_messages=12_345, prefix=b"beamline", connect_timeout=0)
    stock = Publisher(address)
    publishers += [default, asked, stock]

    assert send_queue(default) == DEFAULT_QUEUE_MESSAGES
    assert send_queue(asked) == 12_345
    assert asked._prefix == b"beamline" and asked.address == f"tcp://{address}"
    assert send_queue(stock) == ZMQ_DEFAULT_SNDHWM == 1_000
    assert deepen(stock, queue_messages=7) is stock and send_queue(stock) == 7


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "1000"])
def test_a_bad_queue_size_is_a_config_error(bad: Any) -> None:
    """queue_messages must be a positive int (0 would mean 'no limit' to 0MQ): one-line PublisherConfigError."""
    with pytest.raises(PublisherConfigError, match="queue_messages must be a positive number") as err:
        deep_publisher(f"127.0.0.1:{free_port()}", queue_messages=bad, connect_timeout=0)
    assert "\n" not in str(err.value)


def test_a_publisher_without_its_pub_socket_fails_in_one_line_naming_bluesky(
    publishers: list[Publisher],
) -> None:
    """A bluesky whose Publisher keeps no PUB socket at `_socket` (renamed, or already closed)
    raises IncompatibleBluesky with one line naming the installed and the supported bluesky."""
    renamed = Publisher(f"127.0.0.1:{free_port()}")
    publishers.append(renamed)
    socket = renamed._socket
    del renamed._socket
    try:
        with pytest.raises(IncompatibleBluesky) as err:
            deepen(renamed)
    finally:
        renamed._socket = socket
    message = str(err.value)
    assert "\n" not in message and "_socket" in message and "bluesky >=1.14" in message, message

    closed = Publisher(f"127.0.0.1:{free_port()}")
    closed.close()
    with pytest.raises(IncompatibleBluesky, match="no open PUB socket"):
        deepen(closed)


@pytest.mark.parametrize("deep", [False, True], ids=["stock", "deep"])
def test_the_first_documents_after_creation_arrive_only_with_deep_publisher(
    context: zmq.Context[zmq.Socket[bytes]], publishers: list[Publisher], deep: bool
) -> None:
    """0MQ's slow joiner: 5 starts sent right after a stock Publisher is made are dropped (its PUB has
    no subscription yet); deep_publisher returns once the peer has subscribed, so all 5 arrive, and
    it returns within its connect_timeout."""
    port = free_port()
    peer = BoundSub(context, port)
    started = time.monotonic()
    publisher = peer.serving(
        lambda: deep_publisher(f"127.0.0.1:{port}") if deep else Publisher(f"127.0.0.1:{port}")
    )
    waited = time.monotonic() - started
    publishers.append(publisher)
    starts = [("start", {"uid": f"run-{i}", "time": 0.0}) for i in range(5)]
    for name, doc in starts:
        publisher(name, doc)
    frames = peer.drain(quiet_ms=500)
    peer.close()
    if deep:
        assert frames == [b" ".join([b"", name.encode(), _pickle(doc)]) for name, doc in starts]
        assert waited < 2.0 and send_queue(publisher) == DEFAULT_QUEUE_MESSAGES
    else:
        assert frames == []


def test_without_a_subscriber_deep_publisher_waits_connect_timeout_and_warns(
    publishers: list[Publisher], caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing listens: deep_publisher gives up after connect_timeout with one warning and works on."""
    started = time.monotonic()
    publisher = deep_publisher(f"127.0.0.1:{free_port()}", connect_timeout=0.3)
    publishers.append(publisher)
    assert 0.3 <= time.monotonic() - started < 5
    assert [r.levelname for r in caplog.records if "no subscriber" in r.message] == ["WARNING"]
    publisher("start", {"uid": "nobody-listens", "time": 0.0})


@pytest.mark.process
def test_deep_publisher_imports_nothing_of_the_sidecar_but_itself() -> None:
    """Installed alone into a RunEngine's environment it needs bluesky and pyzmq only: importing it
    loads no other tiled_writer_sidecar module and none of the sidecar's own dependencies."""
    code = (
        "import sys, tiled_writer_sidecar.publisher as p; "
        "print(sorted(m for m in sys.modules if m.startswith('tiled_writer_sidecar') "
        "or m.split('.')[0] in ('tiled', 'httpx', 'prometheus_client', 'bluesky_tiled_plugins')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == ["['tiled_writer_sidecar',", "'tiled_writer_sidecar.publisher']"], (
        done.stdout
    )


@pytest.mark.parametrize("deep", [False, True], ids=["stock", "deep"])
def test_a_connected_publisher_is_deepened_in_place(
    context: zmq.Context[zmq.Socket[bytes]], publishers: list[Publisher], deep: bool
) -> None:
    """libzmq applies SNDHWM to the connection Publisher.__init__ already made (no reconnect needed):
    while the peer does not read, the stock Publisher drops what overflows 1,000 messages plus the
    kernel's buffers; the same Publisher deepened after it joined delivers all 30,000, in order."""
    port = free_port()
    peer = BoundSub(context, port, stalled=True)
    publisher = Publisher(f"127.0.0.1:{port}")
    publishers.append(publisher)
    peer.wait_joined(publisher)
    if deep:
        deepen(publisher, queue_messages=OVERFLOW + 1)

    docs = a_run(OVERFLOW - 3, padding=300)
    for name, doc in docs:
        publisher(name, doc)
    frames = peer.drain()
    peer.close()

    if deep:
        assert frames == [b" ".join([b"", name.encode(), _pickle(doc)]) for name, doc in docs]
    else:
        assert 0 < len(frames) < len(docs) // 2, f"the stock Publisher delivered {len(frames)} of {len(docs)}"


@pytest.mark.parametrize("deep", [False, True], ids=["stock", "deep"])
def test_what_is_published_while_the_proxy_restarts_is_delivered_when_it_is_back(
    context: zmq.Context[zmq.Socket[bytes]], publishers: list[Publisher], deep: bool
) -> None:
    """The peer (a proxy's in socket) goes away after the subscription and comes back on the same
    port: a deep Publisher kept the 5,000 documents published meanwhile and delivers them all; the
    stock one keeps at most its 1,000."""
    port = free_port()
    peer = BoundSub(context, port)
    publisher = deep_publisher(f"127.0.0.1:{port}") if deep else Publisher(f"127.0.0.1:{port}")
    publishers.append(publisher)
    peer.wait_joined(publisher)
    peer.close()

    docs = a_run(5_000 - 3)
    for name, doc in docs:
        publisher(name, doc)
    back = BoundSub(context, port)
    frames = back.drain(quiet_ms=3_000)
    back.close()

    names = [frame.split(b" ", 2)[1].decode() for frame in frames]
    if deep:
        assert names == [name for name, _ in docs]
    else:
        assert len(frames) <= ZMQ_DEFAULT_SNDHWM, len(frames)


def test_same_frames_as_the_stock_publisher(
    context: zmq.Context[zmq.Socket[bytes]], publishers: list[Publisher]
) -> None:
    """Byte for byte, a deep Publisher sends what bluesky's Publisher sends (prefix name pickle)."""
    docs = a_run(20)
    frames: dict[bool, list[bytes]] = {}
    for deep in (False, True):
        port = free_port()
        peer = BoundSub(context, port)
        publisher = peer.serving(
            lambda port=port, deep=deep: (
                deep_publisher(f"127.0.0.1:{port}", prefix=b"bl1")
                if deep
                else Publisher(f"127.0.0.1:{port}", prefix=b"bl1")
            )
        )
        publishers.append(publisher)
        peer.wait_joined(publisher)
        for name, doc in docs:
            publisher(name, doc)
        frames[deep] = peer.drain(quiet_ms=500)
        peer.close()
    assert frames[True] == frames[False]
    assert len(frames[True]) == len(docs) and frames[True][0].startswith(b"bl1 start ")


def test_remote_dispatcher_receives_every_document_unchanged(
    context: zmq.Context[zmq.Socket[bytes]], publishers: list[Publisher]
) -> None:
    """deep_publisher -> a forwarder (XSUB/XPUB, as bluesky's proxy) -> bluesky's RemoteDispatcher:
    every document of a run arrives, equal and in order."""
    front, back = context.socket(zmq.XSUB), context.socket(zmq.XPUB)
    in_port = front.bind_to_random_port("tcp://127.0.0.1")
    out_port = back.bind_to_random_port("tcp://127.0.0.1")
    control, steer = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    control.bind("inproc://steer")
    steer.connect("inproc://steer")
    forwarder = threading.Thread(target=zmq.proxy_steerable, args=(front, back, None, control), daemon=True)
    forwarder.start()

    dispatcher = RemoteDispatcher(f"127.0.0.1:{out_port}")
    recorder = DocumentRecorder()
    dispatcher.subscribe(recorder)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            dispatcher.start()
        except asyncio.CancelledError:
            pass
        except BaseException as err:  # noqa: BLE001 - reported by the test below
            errors.append(err)

    listener = threading.Thread(target=serve, daemon=True)
    listener.start()
    try:
        publisher = deep_publisher(f"127.0.0.1:{in_port}")
        publishers.append(publisher)
        (warm_up,) = a_run(0)[:1]

        def joined() -> bool:
            publisher(*warm_up)
            return len(recorder) > 0

        wait_until(joined, 30, interval=0.05, what="RemoteDispatcher receiving")
        recorder.clear()
        docs = a_run(200)
        for name, doc in docs:
            publisher(name, doc)
        got = wait_until(
            lambda: (
                [d for d in recorder.documents if d[0] != "start" or d[1]["uid"] != warm_up[1]["uid"]]
                if any(name == "stop" for name, _ in recorder.documents)
                else None
            ),
            30,
            what="the stop document",
        )
    finally:
        dispatcher.loop.call_soon_threadsafe(_cancel_all, dispatcher.loop)
        listener.join(10)
        steer.send(b"TERMINATE")
        forwarder.join(10)
        for socket in (front, back, control, steer):
            socket.close(linger=0)
    assert not errors, errors
    assert got == docs


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    for task in asyncio.all_tasks(loop):
        task.cancel()


def _pickle(doc: dict[str, Any]) -> bytes:
    import pickle

    return pickle.dumps(doc)
