"""Issue 15 end to end: a burst while the proxy is frozen is lost by bluesky's Publisher, kept by deep_publisher.

Real processes: `tiled-writer-sidecar proxy` (the buffering drop-in) and the
`tiled-writer-sidecar run` daemon subscribed to it (Tiled down: its
uploader only backs off, every document stays in the spool, which is what
is counted). The publisher is bluesky's `Publisher`, called once per
document as a RunEngine calls it, in this test process.

The fault: the proxy is SIGSTOPped (a descheduled or frozen process) just
before a run of 30,000 events is published back to back, and SIGCONTed
once the whole run is published (at least 1 s after the freeze). Nothing reads the Publisher's socket meanwhile, so
what does not fit in the kernel's buffers waits in the Publisher's own
queue: 0MQ's default 1,000 messages for the stock Publisher (the control:
it must lose), `DEFAULT_QUEUE_MESSAGES` for `deep_publisher`, which must
lose nothing. Each loss is counted twice: by the proxy's own counter
(received) and in the daemon's spool (documents of the run).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import event_model
import pytest
import zmq
from bluesky.callbacks.zmq import Publisher

from tiled_writer_sidecar.publisher import deep_publisher, publisher_socket
from tiled_writer_sidecar.testing import free_port, probe_message, wait_until
from tiled_writer_sidecar.testing.proxy import SidecarProxy
from tiled_writer_sidecar.testing.sidecar import SidecarProcess

EVENTS = 30_000
PAUSE_S = 1.0

Document = tuple[str, dict[str, Any]]


def burst(events: int) -> list[Document]:
    """start, descriptor, `events` scalar events, stop: event-model documents (events keyed as compose_event's)."""
    bundle = event_model.compose_run(metadata={"plan_name": "burst"})
    desc = bundle.compose_descriptor(
        data_keys={"det": {"source": "SIM:det", "dtype": "number", "shape": []}}, name="primary"
    )
    docs: list[Document] = [("start", dict(bundle.start_doc)), ("descriptor", dict(desc.descriptor_doc))]
    now = time.time()
    for seq in range(1, events + 1):
        t = now + seq * 1e-4
        docs.append(
            (
                "event",
                {
                    "uid": str(uuid.uuid4()),
                    "time": t,
                    "data": {"det": seq * 0.5},
                    "timestamps": {"det": t},
                    "seq_num": seq,
                    "filled": {},
                    "descriptor": desc.descriptor_doc["uid"],
                },
            )
        )
    stop = bundle.compose_stop(exit_status="success", validate=False)
    stop["num_events"] = {"primary": events}
    docs.append(("stop", dict(stop)))
    return docs


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[tuple[SidecarProxy, SidecarProcess]]:
    """The project's proxy and a daemon subscribed to it, Tiled down (nothing listens at its URI)."""
    with SidecarProxy(log_path=tmp_path / "proxy.log") as proxy:
        sidecar = SidecarProcess(
            tmp_path / "sidecar",
            zmq_address=proxy.out_address,
            tiled_uri=f"http://127.0.0.1:{free_port()}",
            api_key=None,
        )
        with sidecar:
            yield proxy, sidecar


def publish_with_the_proxy_frozen(
    publisher: Publisher, proxy: SidecarProxy, sidecar: SidecarProcess, docs: list[Document]
) -> dict[str, int]:
    """Join, freeze the proxy, publish `docs`, thaw it; return what the proxy and the daemon got."""
    socket = publisher_socket(publisher)
    seen = sidecar.messages_seen()
    message = probe_message(uuid.uuid4().hex.encode())

    def joined() -> bool:
        socket.send(message)
        return sidecar.messages_seen() > seen

    wait_until(joined, 60, interval=0.1, what="the daemon receiving through the proxy")
    before_proxy = proxy.metrics()["messages_received_total"]
    before_daemon = sidecar.messages_seen()
    proxy.pause()
    try:
        paused_at = time.monotonic()
        for name, doc in docs:
            publisher(name, doc)
        time.sleep(max(0.0, PAUSE_S - (time.monotonic() - paused_at)))  # the pause *is* the fault
    finally:
        proxy.resume()

    previous: list[tuple[int, int]] = []

    def forwarded() -> int | None:
        """What the proxy received, once the daemon counted as many and both stayed put for a poll."""
        counts = (
            int(proxy.metrics()["messages_received_total"] - before_proxy),
            sidecar.messages_seen() - before_daemon,
        )
        settled = counts[1] >= counts[0] and previous[-1:] == [counts]
        previous.append(counts)
        return counts[0] if settled else None

    received = wait_until(forwarded, 90, interval=1.0, what="the daemon counting what the proxy received")
    uid = docs[0][1]["uid"]
    runs = {run["uid"]: run for run in sidecar.status()["runs"]}
    spooled = int(runs[uid]["documents"]) if uid in runs else 0
    return {"sent": len(docs), "proxy_received": received, "spooled": spooled}


def test_a_burst_while_the_proxy_is_frozen_is_kept_by_deep_publisher_and_lost_by_the_stock_one(
    pipeline: tuple[SidecarProxy, SidecarProcess],
) -> None:
    """30,000 events published while the project's proxy is SIGSTOPped: bluesky's stock Publisher
    drops what overflows its 1,000-message queue before the proxy (the control, same setup); through
    deep_publisher the proxy receives every document and the daemon spools every one."""
    proxy, sidecar = pipeline
    results: dict[str, dict[str, int]] = {}
    for kind in ("stock", "deep"):
        publisher = Publisher(proxy.in_address) if kind == "stock" else deep_publisher(proxy.in_address)
        try:
            results[kind] = publish_with_the_proxy_frozen(publisher, proxy, sidecar, burst(EVENTS))
        finally:
            publisher_socket(publisher).setsockopt(zmq.LINGER, 0)
            publisher.close()

    stock, deep = results["stock"], results["deep"]
    print(
        f"\nBURST {EVENTS} events, proxy frozen {PAUSE_S:g} s: stock Publisher lost "
        f"{stock['sent'] - stock['spooled']} ({stock['sent'] - stock['proxy_received']} before the proxy); "
        f"deep_publisher lost {deep['sent'] - deep['spooled']}",
        flush=True,
    )
    assert stock["proxy_received"] < stock["sent"], ("the control lost nothing: the fault missed", stock)
    assert deep["proxy_received"] == deep["sent"], deep
    assert deep["spooled"] == deep["sent"], deep
