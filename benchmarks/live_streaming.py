"""Live streaming: event time to a Tiled streaming subscriber's callback, and what it costs the RunEngine.

Tiled serves its catalog with the in-memory streaming cache; a consumer
subscribes with bluesky-tiled-plugins' ``subscribe_to_streams`` before the
scan (`testing.tiled_server.LiveSubscriber`, which also checks Tiled's
per-node sequence numbers for gaps and repeats). ``bp.count([det], N,
delay=1/rate)`` runs at 10 Hz and 200 Hz for N = 40 and N = 10,000 (10,000
at 10 Hz only with ``--full``: it lasts 17 minutes), written to Tiled by:

- ``sidecar``: Publisher -> bluesky-0MQ-proxy -> the sidecar daemon with
  its default settings;
- ``tiledwriter_1`` / ``tiledwriter_10000``: in-process
  ``RE.subscribe(TiledWriter(client, batch_size=...))``.

Per case: rows emitted, rows the subscriber got (and how many before the
scan ended), lag p50/p99/max (callback time - event ``time``), gaps or
repeats, and the RunEngine's cost (the scan's wall time against the same
scan with no writer; per event). Results go to ``live_streaming.json``
next to this file (or ``--out``). Run: ``python -m benchmarks.live_streaming``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NAME = "live_streaming"
TITLE = "Live streaming (event time to a Tiled subscriber's callback)"
TARGET = "p99 <= 1 s at 10 Hz and 200 Hz, 40 and 10,000 events; every row once"
WRITERS = ("sidecar", "tiledwriter_1", "tiledwriter_10000")


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def _case(
    writer: str,
    n: int,
    rate: float,
    tiled: Any,
    proxy: Any,
    sidecar: Any,
    baseline: dict[tuple[int, float], float],
) -> dict[str, Any]:
    import bluesky.plans as bp
    from bluesky_tiled_plugins import TiledWriter
    from ophyd.sim import det

    from tiled_writer_sidecar.testing import Acquisition
    from tiled_writer_sidecar.testing.tiled_server import LiveSubscriber

    subscriber = LiveSubscriber(tiled.client())
    try:
        with Acquisition.for_proxy(proxy) if writer == "sidecar" else Acquisition(None) as acq:
            if writer == "sidecar":
                acq.wait_subscribers(lambda: sidecar.messages_seen() > 0)
            else:
                acq.subscribe(TiledWriter(tiled.client(), batch_size=int(writer.rsplit("_", 1)[1])))
            (uid,) = acq.run(bp.count([det], n, delay=1 / rate))
            wall = acq.last_duration
            # The scan ends with its stop document (an in-process writer's own work at the stop
            # happens after it, inside RE(...)).
            ended = next(
                doc["time"] for name, doc in acq.documents if name == "stop" and doc["run_start"] == uid
            )
        if writer == "sidecar":
            sidecar.wait_drained([uid], timeout=600)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(subscriber.seq_nums(uid)) < n:
            time.sleep(0.05)
        lags = sorted(subscriber.lags(uid))
        arrivals = subscriber.arrivals(uid)
        base = baseline.get((n, rate))
        return {
            "writer": writer,
            "events": n,
            "rate_hz": rate,
            "rows_delivered": len(lags),
            "rows_before_scan_end": sum(a <= ended for a in arrivals),
            "lag_p50_s": _quantile(lags, 0.5),
            "lag_p99_s": _quantile(lags, 0.99),
            "lag_max_s": lags[-1] if lags else None,
            "problems": subscriber.problems(uid, n),
            "scan_wall_s": wall,
            "runengine_cost_per_event_ms": None if base is None else 1000 * (wall - base) / n,
        }
    finally:
        subscriber.disconnect()


def _baseline(n: int, rate: float) -> float:
    import bluesky.plans as bp
    from ophyd.sim import det

    from tiled_writer_sidecar.testing import Acquisition

    with Acquisition(None) as acq:
        acq.run(bp.count([det], n, delay=1 / rate))
        return acq.last_duration


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also 10,000 events at 10 Hz (17 minutes)")
    parser.add_argument("--writers", default=",".join(WRITERS))
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("live_streaming.json"))
    parser.add_argument(
        "--batch-seconds", type=float, default=None, help="the sidecar's (default: its default)"
    )
    parser.add_argument("--cases", default=None, help="N@rate,... (default 40@10,40@200,10000@200)")
    args = parser.parse_args(argv)

    from tiled_writer_sidecar.config import TiledConfig
    from tiled_writer_sidecar.testing import TiledServer, ZmqProxy
    from tiled_writer_sidecar.testing.sidecar import SidecarProcess

    batch_seconds = args.batch_seconds if args.batch_seconds is not None else TiledConfig().batch_seconds
    cases = [(40, 10.0), (40, 200.0), (10_000, 200.0)] + ([(10_000, 10.0)] if args.full else [])
    if args.cases:
        cases = [(int(n), float(r)) for n, r in (c.split("@") for c in args.cases.split(","))]
    writers = [w for w in args.writers.split(",") if w]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="live-streaming-") as tmp:
        work = Path(tmp)
        baseline = {case: _baseline(*case) for case in cases}
        with (
            TiledServer(work / "tiled", streaming_cache="memory") as tiled,
            ZmqProxy(log_path=work / "proxy.log") as proxy,
            SidecarProcess(
                work / "sidecar",
                zmq_address=proxy.out_address,
                tiled_uri=tiled.uri,
                api_key=tiled.api_key,
                settings={"tiled": {"batch_seconds": batch_seconds}},
            ) as sidecar,
        ):
            sidecar.wait_uploader_connected()
            for n, rate in cases:
                for writer in writers:
                    if writer == "tiledwriter_1" and n > 1000:
                        continue  # one request per event: 10,000 events take minutes and say nothing new
                    result = _case(writer, n, rate, tiled, proxy, sidecar, baseline)
                    results.append(result)
                    print(json.dumps(result), flush=True)
    report = {
        "name": NAME,
        "title": TITLE,
        "target": TARGET,
        "batch_seconds": batch_seconds,
        "loadavg": os.getloadavg(),
        "baseline_scan_wall_s": {f"{n}@{rate:g}Hz": s for (n, rate), s in baseline.items()},
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
