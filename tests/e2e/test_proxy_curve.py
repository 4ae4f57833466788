"""Issue 22: `tiled-writer-sidecar proxy` with bluesky-0MQ-proxy's CURVE and mode flags, real processes.

Keys are bluesky's format (``zmq.auth.create_certificates``: ``NAME.key``
public, ``NAME.key_secret`` both). bluesky's own `Publisher` (with
`ClientCurve`) publishes to a proxy that is a CURVE server on both sides;
a second proxy chained behind it uses ``--in-mode connect`` as a CURVE
client (``--in-client-secret``, ``--in-server-public``); bluesky's own
`RemoteDispatcher` (with `ClientCurve`) reads the far end. A publisher whose
key is not admitted, or whose address is not in ``--in-curve-allow``, gets
nothing through.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth
from bluesky.callbacks.zmq import ClientCurve, Publisher, RemoteDispatcher

from tiled_writer_sidecar.testing import DocumentRecorder, wait_until
from tiled_writer_sidecar.testing.proxy import SidecarProxy


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """Certificates: name -> secret file; ``admitted`` -> folder of the admitted public keys."""
    made: dict[str, Path] = {}
    admitted = tmp_path / "admitted"
    admitted.mkdir()
    (tmp_path / "keys").mkdir()
    for name in ("proxy", "chained", "publisher", "dispatcher", "stranger"):
        public, secret = zmq.auth.create_certificates(tmp_path / "keys", name)
        made[name] = Path(secret)
        made[f"{name}.public"] = Path(public)
        if name != "stranger":
            (admitted / f"{name}.key").write_bytes(Path(public).read_bytes())
    made["admitted"] = admitted
    return made


def server_flags(side: str, keys: dict[str, Path], *allow: str) -> list[str]:
    flags = [
        f"--{side}-curve-secret",
        str(keys["proxy"]),
        f"--{side}-curve-client-keys",
        str(keys["admitted"]),
    ]
    return [*flags, f"--{side}-curve-allow", *allow] if allow else flags


class Dispatcher:
    """bluesky's RemoteDispatcher (CURVE client) in a thread, recording what it gets."""

    def __init__(self, address: str, secret: Path, server_public: Path) -> None:
        self.recorder = DocumentRecorder()
        self.dispatcher = RemoteDispatcher(address, curve_config=ClientCurve(secret, server_public))
        self.dispatcher.subscribe(self.recorder)  # type: ignore[no-untyped-call]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.dispatcher.start()  # type: ignore[no-untyped-call]
        except asyncio.CancelledError:
            pass

    def close(self) -> None:
        loop = self.dispatcher.loop
        loop.call_soon_threadsafe(lambda: [task.cancel() for task in asyncio.all_tasks(loop)])
        self.thread.join(10)


def publish_until_received(publisher: Publisher, dispatcher: Dispatcher, uid: str) -> list[tuple[str, Any]]:
    """A start/stop pair, repeated until the dispatcher has one (the chain joins at its own pace)."""

    def through() -> bool:
        publisher("start", {"uid": uid, "time": 0.0})
        return any(doc.get("uid") == uid for _, doc in dispatcher.recorder.documents)

    wait_until(through, 60, interval=0.2, what="a document through the CURVE chain")
    dispatcher.recorder.clear()
    stop = {"uid": f"{uid}-stop", "run_start": f"{uid}-run", "time": 2.0, "exit_status": "success"}
    docs = [("start", {"uid": f"{uid}-run", "time": 1.0}), ("stop", stop)]
    for name, doc in docs:
        publisher(name, doc)
    wait_until(lambda: len(dispatcher.recorder) >= len(docs), 30, what="the run through the chain")
    return docs


@pytest.fixture
def chain(keys: dict[str, Path], tmp_path: Path) -> Iterator[tuple[SidecarProxy, SidecarProxy]]:
    """front: CURVE server on both sides; back: connects to front's out as a CURVE client, serves CURVE."""
    front = SidecarProxy(
        log_path=tmp_path / "front.log", extra_args=[*server_flags("in", keys), *server_flags("out", keys)]
    )
    with front:
        back = SidecarProxy(
            in_port=front.out_port,  # back's in connects to front's out
            log_path=tmp_path / "back.log",
            extra_args=[
                "--in-mode",
                "connect",
                "--in-client-secret",
                str(keys["chained"]),
                "--in-server-public",
                str(keys["proxy.public"]),
                *server_flags("out", keys),
            ],
        )
        with back:
            yield front, back


def test_bluesky_publisher_and_remote_dispatcher_round_trip_through_curve_proxies(
    chain: tuple[SidecarProxy, SidecarProxy], keys: dict[str, Path]
) -> None:
    """Publisher (CURVE) -> proxy (bind, CURVE server both sides) -> proxy (--in-mode connect, CURVE
    client; CURVE server out) -> RemoteDispatcher (CURVE): every document arrives, equal and in order."""
    front, back = chain
    publisher = Publisher(front.in_address, curve_config=ClientCurve(keys["publisher"], keys["proxy.public"]))
    dispatcher = Dispatcher(back.out_address, keys["dispatcher"], keys["proxy.public"])
    try:
        docs = publish_until_received(publisher, dispatcher, "curve")
        warm_up = {"uid": "curve", "time": 0.0}
        assert [d for d in dispatcher.recorder.documents if d[1] != warm_up] == docs
    finally:
        dispatcher.close()
        publisher.close()  # type: ignore[no-untyped-call]


@pytest.mark.process
@pytest.mark.parametrize("who", ["key-not-admitted", "address-not-allowed"])
def test_a_publisher_not_admitted_gets_nothing_through(
    who: str, keys: dict[str, Path], tmp_path: Path
) -> None:
    """--in-curve-client-keys refuses a key it does not hold; --in-curve-allow refuses an address not
    listed (only 127.0.0.1's publisher is not on it): while an admitted publisher's documents come
    out of the proxy, none of the refused one's do."""
    allow = ("127.0.0.1",) if who == "key-not-admitted" else ("127.0.0.2",)
    refused_secret = keys["stranger"] if who == "key-not-admitted" else keys["publisher"]
    extra = server_flags("in", keys, *allow)
    with SidecarProxy(log_path=tmp_path / "proxy.log", extra_args=extra) as proxy:
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(proxy.out_address)
        refused = Publisher(proxy.in_address, curve_config=ClientCurve(refused_secret, keys["proxy.public"]))
        admitted = None
        if who == "key-not-admitted":  # the same address with an admitted key is served
            admitted = Publisher(
                proxy.in_address, curve_config=ClientCurve(keys["publisher"], keys["proxy.public"])
            )
        seen: list[bytes] = []
        try:

            def served() -> bool:
                refused("start", {"uid": "refused", "time": 0.0})
                if admitted is not None:
                    admitted("start", {"uid": "admitted", "time": 0.0})
                while sub.poll(50):
                    seen.append(sub.recv())
                return admitted is None or any(b"admitted" in m for m in seen)

            wait_until(served, 60, interval=0.1, what="the admitted publisher's documents")
            for _ in range(20):
                served()
            assert not any(b"refused" in m for m in seen), "a refused publisher's document came through"
            assert "handshake" in proxy.log_tail(400).lower() or proxy.metrics()[
                "messages_received_total"
            ] == (sum(b"admitted" in m for m in seen))
        finally:
            refused.close()  # type: ignore[no-untyped-call]
            if admitted is not None:
                admitted.close()  # type: ignore[no-untyped-call]
            context.destroy(linger=0)
