"""ZmqProxy: bluesky's own bluesky-0MQ-proxy forwards Publisher frames and restarts."""

from __future__ import annotations

import os
import pickle
import signal
from collections.abc import Iterator
from typing import Any

import bluesky.plans as bp
import pytest
import zmq
from ophyd.sim import det

from tiled_writer_sidecar.testing import (
    PROBE_PREFIX,
    Acquisition,
    ZmqProxy,
    is_probe,
    probe_message,
)


class RawSubscriber:
    """A bare zmq SUB socket on the proxy's out address (no bluesky code)."""

    def __init__(self, address: str) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(address)
        self.probes = 0

    def saw_probe(self) -> bool:
        """Drain what arrived; True once a probe came through."""
        while self.socket.poll(timeout=0):
            if is_probe(self.socket.recv()):
                self.probes += 1
        return self.probes > 0

    def documents_until_stop(self, timeout_ms: int = 10_000) -> list[tuple[str, Any]]:
        """Decode Publisher frames (`prefix name pickle`) up to a stop document."""
        documents: list[tuple[str, Any]] = []
        while not documents or documents[-1][0] != "stop":
            if not self.socket.poll(timeout=timeout_ms):
                raise TimeoutError(f"no stop document; got {[n for n, _ in documents]}")
            message = self.socket.recv()
            if is_probe(message):
                continue
            prefix, name, payload = message.split(b" ", 2)
            assert prefix == b""
            documents.append((name.decode(), pickle.loads(payload)))
        return documents

    def close(self) -> None:
        self.context.destroy(linger=0)


@pytest.fixture
def subscriber(proxy: ZmqProxy) -> Iterator[RawSubscriber]:
    sub = RawSubscriber(proxy.out_address)
    yield sub
    sub.close()


def run_and_receive(acq: Acquisition, sub: RawSubscriber) -> None:
    """Every document of a count reaches the raw SUB, equal and in order."""
    acq.recorder.clear()
    (uid,) = acq.run(bp.count([det], 3))
    received = sub.documents_until_stop()
    assert received == acq.documents
    assert [name for name, _ in received] == ["start", "descriptor"] + ["event"] * 3 + ["stop"]
    assert received[0][1]["uid"] == uid


def test_addresses_are_localhost_and_in_publisher_form(proxy: ZmqProxy) -> None:
    """in_address is what Publisher takes, out_address a full tcp:// URL."""
    assert proxy.in_address == f"127.0.0.1:{proxy.in_port}"
    assert proxy.out_address == f"tcp://127.0.0.1:{proxy.out_port}"
    assert proxy.in_port != proxy.out_port
    assert proxy.startup_times and proxy.startup_times[0] < proxy.startup_timeout


def test_forwards_publisher_documents_to_raw_sub(
    proxy: ZmqProxy, acquisition: Acquisition, subscriber: RawSubscriber
) -> None:
    """A RunEngine's Publisher frames pass through the proxy unchanged."""
    acquisition.wait_subscribers(subscriber.saw_probe)
    run_and_receive(acquisition, subscriber)


def test_restart_keeps_ports_and_peers_reconnect(
    proxy: ZmqProxy, acquisition: Acquisition, subscriber: RawSubscriber
) -> None:
    """After restart() on the same ports, the same Publisher and SUB work again."""
    ports = (proxy.in_port, proxy.out_port)
    old_pid = proxy.pid

    proxy.restart()

    assert (proxy.in_port, proxy.out_port) == ports
    assert proxy.pid != old_pid
    subscriber.probes = 0
    acquisition.wait_subscribers(subscriber.saw_probe)
    run_and_receive(acquisition, subscriber)


def test_kill_then_start_again(proxy: ZmqProxy, acquisition: Acquisition, subscriber: RawSubscriber) -> None:
    """SIGKILL (a crash) and start() on the same ports; forwarding resumes."""
    assert proxy.kill() == -signal.SIGKILL
    assert not proxy.running

    proxy.start(probe=False)

    acquisition.wait_subscribers(subscriber.saw_probe)
    run_and_receive(acquisition, subscriber)


def test_stop_reaps_the_whole_process_group(proxy: ZmqProxy) -> None:
    """After stop() nothing of the group is left to signal."""
    pid = proxy.pid
    assert pid is not None
    proxy.stop()
    assert not proxy.running
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_probe_frames_look_like_publisher_frames() -> None:
    """A probe splits like `prefix name payload`, with a prefix no Publisher uses."""
    message = probe_message(b"abc")
    assert message.split(b" ", 2) == [PROBE_PREFIX, b"probe", b"abc"]
    assert is_probe(message)
    assert not is_probe(b" start " + pickle.dumps({}))
