"""`tiled-writer-sidecar proxy` with real processes: a drop-in for bluesky-0MQ-proxy that loses nothing in a burst.

Publishers are bluesky's own `Publisher` (a RunEngine with ophyd.sim, or
the Publisher called directly with event-model documents, as the RunEngine
does); subscribers are bluesky's `RemoteDispatcher` or a plain SUB socket
(0MQ's default receive high-water mark, as most live plots and GUIs have)
in their own processes, so SIGSTOP pauses them as a frozen GUI would be.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import event_model
import pytest
import zmq
from bluesky.callbacks.zmq import Publisher
from ophyd.sim import det, motor

from tiled_writer_sidecar.testing import (
    Acquisition,
    ZmqProxy,
    free_port,
    wait_until,
)
from tiled_writer_sidecar.testing.acquisition import Document
from tiled_writer_sidecar.testing.proxy import PROBE_PREFIX, SidecarProxy
from tiled_writer_sidecar.testing.sidecar import sidecar_command

EVENTS = 50_000

#: A subscriber in its own process: a SUB socket with 0MQ's defaults (RCVHWM 1000, or the one given
#: after OUT: 0 is the sidecar's deep queue, unlimited). It creates READY at the first probe frame, counts document messages until the
#: stop document or 10 s of silence, and writes what it saw as JSON to OUT.
SUBSCRIBER = """
import json, sys, zmq
address, ready, out = sys.argv[1:4]
sock = zmq.Context().socket(zmq.SUB)
sock.setsockopt(zmq.RCVHWM, int((sys.argv[4:] or ["1000"])[0]))
sock.setsockopt(zmq.SUBSCRIBE, b"")
sock.connect(address)
names, stopped, started = {}, False, False
while sock.poll(10_000 if started else 120_000):
    message = sock.recv()
    if message.startswith(b"tiled-writer-sidecar-probe "):
        open(ready, "a").close()
        continue
    started = True
    name = message.split(b" ", 2)[1].decode()
    names[name] = names.get(name, 0) + 1
    if name == "stop":
        stopped = True
        break
json.dump({"names": names, "messages": sum(names.values()), "stopped": stopped}, open(out, "w"))
"""

#: bluesky's RemoteDispatcher, unchanged, in its own process: one JSON line per document.
DISPATCHER = """
import json, pickle, sys
from bluesky.callbacks.zmq import RemoteDispatcher
address, ready, out = sys.argv[1:4]
log = open(out, "w")

def deserialize(payload):
    if not payload.startswith(b"\\x80"):  # a probe frame (hex nonce), not a pickle
        open(ready, "a").close()
    return pickle.loads(payload)

def record(name, doc):
    log.write(json.dumps([name, doc.get("uid"), doc.get("seq_num")]) + "\\n")
    log.flush()

dispatcher = RemoteDispatcher(address, deserializer=deserialize)
dispatcher.subscribe(record)
dispatcher.start()
"""


class Subscriber:
    """A subscriber script in its own process (pausable), writing what it saw to a JSON file."""

    def __init__(self, tmp_path: Path, name: str, script: str, address: str, *args: str) -> None:
        self.ready = tmp_path / f"{name}.ready"
        self.out = tmp_path / f"{name}.json"
        self.log = tmp_path / f"{name}.log"
        with self.log.open("wb") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-c", script, address, str(self.ready), str(self.out), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def pause(self) -> None:
        os.kill(self.popen.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.popen.pid, signal.SIGCONT)

    def result(self, timeout: float = 120.0) -> dict[str, Any]:
        self.popen.wait(timeout)
        assert self.popen.returncode == 0, self.log.read_text()
        return dict(json.loads(self.out.read_text()))

    def close(self) -> None:
        if self.popen.poll() is None:
            self.resume()
            self.popen.kill()
        self.popen.wait()


def burst_documents(events: int) -> list[Document]:
    """A run of `events` scalar events, composed with event-model (as a RunEngine would emit)."""
    bundle = event_model.compose_run(metadata={"plan_name": "burst", "scan_id": 1})
    docs: list[Document] = [("start", dict(bundle.start_doc))]
    desc = bundle.compose_descriptor(
        data_keys={"det": {"source": "SIM:det", "dtype": "number", "shape": []}},
        name="primary",
        object_keys={"det": ["det"]},
    )
    docs.append(("descriptor", dict(desc.descriptor_doc)))
    now = time.time()
    for i in range(1, events + 1):
        t = now + i * 1e-4
        event = desc.compose_event(
            data={"det": i * 0.5}, timestamps={"det": t}, seq_num=i, time=t, validate=False
        )
        docs.append(("event", dict(event)))
    docs.append(("stop", dict(bundle.compose_stop())))
    return docs


def wait_subscribed(publisher: Publisher, proxy: ZmqProxy, *subscribers: Subscriber) -> None:
    """Publish probe frames through `publisher` until every subscriber (and a private SUB) saw one."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, PROBE_PREFIX)
        sub.connect(proxy.out_address)

        def through() -> bool:
            publisher._socket.send(PROBE_PREFIX + b" probe probe-" + os.urandom(4).hex().encode())
            while sub.poll(20):
                sub.recv()
            return all(s.ready.exists() for s in subscribers)

        wait_until(through, 60, interval=0.05, what="subscribers receiving through the proxy")
    finally:
        context.destroy(linger=0)


def publish_pausing(publisher: Publisher, docs: list[Document], paused: Subscriber, pause_s: float) -> float:
    """Publish `docs` back to back; SIGSTOP `paused` after 2,000 of them for `pause_s` seconds.

    Returns the publishing rate in documents per second.
    """
    started = time.perf_counter()
    stopped_at: float | None = None
    for i, (name, doc) in enumerate(docs):
        if i == 2_000:
            paused.pause()
            stopped_at = time.perf_counter()
        elif stopped_at is not None and i % 200 == 0 and time.perf_counter() - stopped_at >= pause_s:
            paused.resume()
            stopped_at = None
        publisher(name, doc)
    elapsed = time.perf_counter() - started
    if stopped_at is not None:
        time.sleep(max(0.0, pause_s - (time.perf_counter() - stopped_at)))  # the pause *is* the fault
        paused.resume()
    return len(docs) / elapsed


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.fixture
def sidecar_proxy(tmp_path: Path) -> Iterator[SidecarProxy]:
    """`tiled-writer-sidecar proxy` on two free ports with its metrics endpoint, proven to forward."""
    with SidecarProxy(log_path=tmp_path / "sidecar-proxy.log") as running:
        yield running


def test_runengine_publisher_and_remote_dispatcher_work_through_it_unchanged(
    sidecar_proxy: SidecarProxy, tmp_path: Path
) -> None:
    """A RunEngine's Publisher -> the project's proxy -> bluesky's RemoteDispatcher: every document, in order."""
    dispatcher = Subscriber(tmp_path, "dispatcher", DISPATCHER, sidecar_proxy.out_address)
    try:
        with Acquisition.for_proxy(sidecar_proxy) as acq:
            acq.wait_subscribers(dispatcher.ready.exists)
            uids = acq.run(bp.count([det], 5)) + acq.run(bp.scan([det], motor, 0, 1, 7))
            emitted = [[name, doc.get("uid"), doc.get("seq_num")] for name, doc in acq.documents]

            def received() -> list[list[Any]]:
                if not dispatcher.out.exists():
                    return []
                lines = [json.loads(line) for line in dispatcher.out.read_text().splitlines() if line]
                return lines if sum(1 for line in lines if line[0] == "stop") == len(uids) else []

            got = wait_until(received, 60, what="both runs through RemoteDispatcher")
    finally:
        dispatcher.close()
    assert got == emitted


def test_the_monitor_works_through_it_unchanged(sidecar_proxy: SidecarProxy, tmp_path: Path) -> None:
    """`tiled-writer-sidecar monitor` subscribed to the project's proxy sees a whole scan: uid, events, stop."""
    config = tmp_path / "monitor.toml"
    config.write_text('[log]\nlevel = "INFO"\n')
    out, err = tmp_path / "monitor.out", tmp_path / "monitor.err"
    nobody = f"http://127.0.0.1:{free_port()}"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        args = [
            "--zmq",
            sidecar_proxy.out_address,
            "--sidecar",
            nobody,
            "--once",
            "--json",
            "--seconds",
            "120",
        ]
        monitor = subprocess.Popen(
            [*sidecar_command(), "monitor", "--config", str(config), *args],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        with Acquisition.for_proxy(sidecar_proxy) as acq:
            acq.wait_subscribers(lambda: "receiving from proxy" in err.read_text(errors="replace"))
            (uid,) = acq.run(bp.count([det], 7))
            wait_until(lambda: f"run stop uid={uid}" in err.read_text(errors="replace"), 60, what="the stop")
        monitor.send_signal(signal.SIGINT)
        assert monitor.wait(30) == 0, err.read_text()
    finally:
        if monitor.poll() is None:
            monitor.kill()
            monitor.wait()
    runs = {run["uid"]: run for run in json.loads(out.read_text())["runs"]}
    assert runs[uid]["events"] == {"primary": 7} and runs[uid]["exit_status"] == "success", runs[uid]
    assert runs[uid]["gaps"] == {}


@pytest.mark.process
def test_burst_with_a_paused_subscriber_loses_nothing_where_bluesky_proxy_drops(tmp_path: Path) -> None:
    """50,000 events back to back through bluesky's Publisher while the subscriber is SIGSTOPped for 1 s.

    The project's proxy forwards every document it received (the
    subscriber's pipe, sized from the byte budget, and then the buffer hold
    what the paused subscriber cannot take) and its metrics count
    them exactly; bluesky-0MQ-proxy in the same setup is measured side by
    side and its loss is reported, not asserted. What the proxy never
    received was dropped by the Publisher itself (its SNDHWM is 0MQ's
    default 1,000 and it has no option to change it): on a loaded machine
    its I/O thread can be descheduled long enough, with any proxy or none,
    so that part is reported, not asserted.
    """
    docs = burst_documents(EVENTS)
    results: dict[str, dict[str, Any]] = {}
    for kind in ("sidecar", "bluesky"):
        with ZmqProxy(kind=kind, log_path=tmp_path / f"proxy-{kind}.log") as proxy:
            subscriber = Subscriber(tmp_path, f"sub-{kind}", SUBSCRIBER, proxy.out_address)
            publisher = Publisher(proxy.in_address)
            try:
                wait_subscribed(publisher, proxy, subscriber)
                before = proxy.metrics() if kind == "sidecar" else {}
                rate = publish_pausing(publisher, docs, subscriber, pause_s=1.0)
                seen = subscriber.result()
                after = proxy.metrics() if kind == "sidecar" else {}
                assert proxy.pid is not None
                rss = peak_rss_mib(proxy.pid)
            finally:
                publisher.close()
                subscriber.close()
        results[kind] = {"seen": seen, "rate": rate, "before": before, "after": after, "rss": rss}

    ours = results["sidecar"]
    delta = {k: ours["after"][k] - ours["before"].get(k, 0.0) for k in ours["after"]}
    received = int(delta["messages_received_total"])
    assert ours["seen"]["messages"] == received, ("lost in or after the proxy", ours["seen"], delta)
    assert delta["messages_sent_total"] == received, delta
    assert ours["after"]["messages_dropped_total"] == 0, delta
    assert ours["after"]["buffered_messages"] == 0, delta
    assert ours["after"]["stalls_total"] == 0, delta  # paused 1 s: under --stall-seconds
    bluesky = results["bluesky"]
    print(
        f"\nBURST {EVENTS} events, subscriber paused 1 s: tiled-writer-sidecar proxy lost "
        f"{received - ours['seen']['messages']} ({len(docs) - received} dropped by the Publisher before it; "
        f"published at {ours['rate']:,.0f} docs/s, buffer peak {ours['after']['buffered_bytes_peak'] / 2**20:.1f} "
        f"MiB, proxy peak RSS {ours['rss']:.0f} MiB); bluesky-0MQ-proxy: {len(docs) - bluesky['seen']['messages']} "
        f"lost in all (published at {bluesky['rate']:,.0f} docs/s, stop "
        f"{'arrived' if bluesky['seen']['stopped'] else 'LOST'}, proxy peak RSS {bluesky['rss']:.0f} MiB)",
        flush=True,
    )


@pytest.mark.process
def test_buffer_limit_is_respected_and_the_stalled_subscriber_alone_loses(tmp_path: Path) -> None:
    """With --max-buffer-bytes 16 MiB and one subscriber stopped for a whole burst of 150,000 events
    (~45 MiB as bytes in a buffer without a limit): the buffer stays
    under its limit, the proxy's RSS stays bounded, drops are counted, and the healthy subscriber
    still gets every document the proxy received (only the stalled one misses messages, at least
    as many as counted)."""
    limit = 16 * 2**20  # the buffer (8 MiB) is the healthy one's slack, with its pipe (256 messages)
    docs = burst_documents(3 * EVENTS)
    with SidecarProxy(log_path=tmp_path / "proxy.log", max_buffer_bytes=limit) as proxy:
        # healthy: a deep receive queue, as the sidecar's: a pipe holds 256 messages (the byte budget over
        # the largest message), so a subscriber that lets 0MQ's default 1,000 fill up while the burst is
        # past the budget may be full too, and miss what is sent lossy meanwhile.
        healthy = Subscriber(tmp_path, "healthy", SUBSCRIBER, proxy.out_address, "0")
        stalled = Subscriber(tmp_path, "stalled", SUBSCRIBER, proxy.out_address)
        publisher = Publisher(proxy.in_address)
        try:
            wait_subscribed(publisher, proxy, healthy, stalled)
            assert proxy.pid is not None
            base_rss = peak_rss_mib(proxy.pid)
            before = proxy.metrics()
            stalled.pause()
            for name, doc in docs:
                publisher(name, doc)
            got = healthy.result()
            metrics = proxy.metrics()
            received = int(metrics["messages_received_total"] - before["messages_received_total"])
            rss = peak_rss_mib(proxy.pid)
            stalled.resume()
            missed = received - stalled.result()["messages"]
        finally:
            publisher.close()
            healthy.close()
            stalled.close()
    assert got["messages"] == received, (got, received, "the healthy subscriber lost messages")
    assert metrics["messages_dropped_total"] > 0, metrics
    assert metrics["overflows_total"] >= 1, metrics
    assert missed >= metrics["messages_dropped_total"], (missed, metrics)
    biggest = max(len(pickle.dumps(d)) + 16 for _, d in docs[:3])
    assert metrics["buffered_bytes_peak"] <= limit + biggest + 64, metrics
    # RSS: the buffer (4 MiB) + 0MQ's pipes, which the buffer's accounting does not see: the stalled
    # subscriber's (10,000 messages), the healthy one's, and the in pipe, which holds what the
    # forwarding loop has not moved yet (on this loaded 2-core machine it lags the Publisher by
    # tens of thousands of messages) + allocator slack. Measured: +37 to +66 MiB (the in pipe grows
    # with the machine's load). The buffer's own bound is the exact check above; this one only
    # says the process stays within a small multiple of it.
    assert rss - base_rss < 128, f"proxy RSS grew {rss - base_rss:.1f} MiB"
    print(
        f"\nLIMIT 16 MiB: dropped {metrics['messages_dropped_total']:.0f} (counted), the stalled subscriber "
        f"missed {missed}; healthy got {got['messages']}; RSS +{rss - base_rss:.1f} MiB",
        flush=True,
    )
