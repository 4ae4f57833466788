"""7. Bursts through bluesky's own Publisher: `tiled-writer-sidecar proxy` vs `bluesky-0MQ-proxy`.

Two pipelines side by side, identical but for the proxy: bluesky's
`Publisher` (pickle, called once per document as the RunEngine's callback
is) -> the proxy -> a `tiled-writer-sidecar run` daemon (Tiled down, so its
uploader only backs off and the receiver has the machine). In each
repetition, for each burst (a run of 50,000 and of 200,000 events published
back to back, and 50,000 with the daemon SIGSTOPped for 1 s after the first
2,000 documents, as a descheduled or frozen subscriber would be), both
proxies get the same documents one after the other (order alternating).

Measured per burst: the publishing rate, documents lost (sent - records in
the run's spool log, read back and CRC-checked, once the spool stopped
growing), the proxy's peak RSS during the burst (VmRSS sampled every
20 ms from /proc), and for the project's proxy its own counters: what it
received (sent - received = dropped by the Publisher before any proxy, at
its 1,000-message high-water mark), dropped, and its buffer's peak.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .common import (
    Bench,
    Pipeline,
    dead_tiled_uri,
    make_publisher,
    publisher_socket,
    rss_mib,
    segment_bytes,
    sidecar_settings,
    spool_records,
    summary,
    synthetic_run,
)

NAME = "burst"
TITLE = "Bursts through bluesky's Publisher (project proxy vs bluesky-0MQ-proxy)"
TARGET = "0 documents lost with tiled-writer-sidecar proxy for bursts of 50,000 and 200,000 events"
KINDS = ("sidecar", "bluesky")
PROXY_LABEL = {"sidecar": "tiled-writer-sidecar proxy", "bluesky": "bluesky-0MQ-proxy"}
SETTLE_S = 2.0
PAUSE_S = 1.0
PAUSE_AFTER = 2_000


class RssSampler:
    """Peak VmRSS of `pid` while running (a thread reading /proc every 20 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_mib(pid) or 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mib(self.pid) or 0.0)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib(self.pid) or 0.0)


def _pipelines(bench: Bench, *, wait: bool = True) -> dict[str, Pipeline]:
    """One proxy of each kind with a daemon subscribed to it (started once per benchmark run)."""
    from tiled_writer_sidecar.testing import ZmqProxy, wait_until
    from tiled_writer_sidecar.testing.sidecar import SidecarProcess

    pipes: dict[str, Pipeline] = bench.shared.setdefault("burst_pipelines", {})
    for kind in KINDS:
        if kind in pipes:
            continue
        proxy = bench.enter(ZmqProxy(kind=kind, log_path=bench.workdir / f"burst-proxy-{kind}.log"))
        sidecar = SidecarProcess(
            bench.workdir / f"burst-sidecar-{kind}",
            zmq_address=proxy.out_address,
            tiled_uri=dead_tiled_uri(),
            api_key=None,
            settings=sidecar_settings(),
        )
        sidecar.process.spawn()
        bench._stack.callback(sidecar.terminate)
        pipes[kind] = Pipeline(f"burst-{kind}", proxy, sidecar)
    if wait:
        for pipe in pipes.values():
            wait_until(pipe.sidecar._answers, 180, what=f"{pipe.name}: sidecar health")
    return pipes


def prepare(bench: Bench) -> None:
    """Start the proxies and spawn the daemons now, so they import while other comparisons run."""
    _pipelines(bench, wait=False)


def _wait_spooled(pipe: Pipeline, uid: str, deadline_s: float = 600.0) -> int:
    """Records of run `uid` once the spool stopped growing (closed and quiet, or quiet for 3 s)."""
    run_dir = pipe.spool_dir / "runs" / uid
    size, changed = -1, time.monotonic()
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        now_size, now = segment_bytes(run_dir), time.monotonic()
        if now_size != size:
            size, changed = now_size, now
        else:
            quiet = now - changed
            received, _ = pipe.run_state(uid) if run_dir.exists() else (None, None)
            if (received is not None and received.closed and quiet >= 0.5) or quiet >= SETTLE_S + 1:
                break
        pipe.sidecar._alive()
        time.sleep(0.02)
    return spool_records(pipe.spool_dir).get(uid, 0) if run_dir.exists() else 0


def _burst(pipe: Pipeline, kind: str, events: int, scan_id: int, pause: bool) -> dict[str, Any]:
    documents = list(synthetic_run(events, scan_id=scan_id))
    uid = str(documents[0][1]["uid"])
    publisher = make_publisher(pipe.proxy.in_address)
    try:
        pipe.wait_messages(publisher_socket(publisher))
        before = pipe.proxy.metrics() if kind == "sidecar" else {}
        paused_at: float | None = None
        with RssSampler(int(pipe.proxy.pid)) as rss:
            t0 = time.perf_counter()
            for i, (name, doc) in enumerate(documents):
                if pause and i == PAUSE_AFTER:
                    pipe.sidecar.process.pause()
                    paused_at = time.perf_counter()
                elif paused_at is not None and i % 200 == 0 and time.perf_counter() - paused_at >= PAUSE_S:
                    pipe.sidecar.process.resume()
                    paused_at = None
                publisher(name, doc)
            published = time.perf_counter() - t0
            if paused_at is not None:
                time.sleep(max(0.0, PAUSE_S - (time.perf_counter() - paused_at)))  # the pause is the fault
                pipe.sidecar.process.resume()
            spooled = _wait_spooled(pipe, uid)
    finally:
        publisher.close()
    row: dict[str, Any] = {
        "documents": len(documents),
        "publish_rate": len(documents) / published,
        "spooled": spooled,
        "lost": len(documents) - spooled,
        "proxy_peak_rss_mib": rss.peak,
    }
    if kind == "sidecar":
        after = pipe.proxy.metrics()
        received = int(after["messages_received_total"] - before["messages_received_total"])
        row["proxy_received"] = received
        row["lost_before_proxy"] = len(documents) - received
        row["proxy_dropped"] = int(after["messages_dropped_total"] - before["messages_dropped_total"])
        row["buffer_peak_mib"] = after["buffered_bytes_peak"] / 2**20
    return row


def run(bench: Bench) -> dict[str, Any]:
    sizes = [bench.size(50_000, 2_000), bench.size(200_000, 5_000)]
    pipes = _pipelines(bench)
    for pipe in pipes.values():
        pipe.wait_uploader_settled()
    bursts = [(f"{size}", size, False) for size in sizes] + [(f"paused_{sizes[0]}", sizes[0], True)]
    reps = []
    scan_id = 7000
    for rep in range(bench.reps):
        row: dict[str, Any] = {}
        order = KINDS if rep % 2 == 0 else KINDS[::-1]
        for label, size, pause in bursts:
            for kind in order:
                scan_id += 1
                row[f"{kind}_{label}"] = _burst(pipes[kind], kind, size, scan_id, pause)
        reps.append(row)
        bench.log(
            f"  rep {rep + 1}: "
            + ", ".join(
                f"{k} lost {v['lost']} at {v['publish_rate']:,.0f} docs/s, RSS {v['proxy_peak_rss_mib']:.0f} MiB"
                for k, v in row.items()
            )
        )
    keys = list(reps[0])
    out: dict[str, Any] = {
        "sizes": sizes,
        "pause_s": PAUSE_S,
        "publish_rate": {k: summary([r[k]["publish_rate"] for r in reps]) for k in keys},
        "lost": {k: sum(r[k]["lost"] for r in reps) for k in keys},
        "documents": {k: sum(r[k]["documents"] for r in reps) for k in keys},
        "proxy_peak_rss_mib": {k: summary([r[k]["proxy_peak_rss_mib"] for r in reps]) for k in keys},
        "lost_before_proxy": {
            k: sum(r[k]["lost_before_proxy"] for r in reps) for k in keys if k.startswith("sidecar")
        },
        "proxy_dropped": {
            k: sum(r[k]["proxy_dropped"] for r in reps) for k in keys if k.startswith("sidecar")
        },
        "buffer_peak_mib": {
            k: summary([r[k]["buffer_peak_mib"] for r in reps]) for k in keys if k.startswith("sidecar")
        },
        "repetitions": reps,
    }
    ours = [k for k in keys if k.startswith("sidecar")]
    out["headline"] = {
        "lost": out["lost"],
        "lost_in_or_after_proxy": {k: out["lost"][k] - out["lost_before_proxy"][k] for k in ours},
        "target_met": not any(out["lost"][k] for k in ours),
    }
    return out
