"""4. Live latency: from an event's ``time`` to its row being readable from Tiled.

A scan is published live through bluesky's `Publisher` at 10 Hz and at
200 Hz (events paced by the clock, each one's ``time`` taken as it is
published) to the sidecar daemon with Tiled up. A second thread polls Tiled
for the run's ``seq_num`` column (one ``GET /api/v1/table/full/...`` every
100 ms, as a client watching the scan would) and notes when each row first
appears; latency = that moment - the event's ``time``. The poll period and
the request time bound how much later than the truth a row can be seen
(reported as ``poll_seconds``).

Also recorded per scan, from the uploader's status file: upload failures
(Tiled answered 5xx; with SQLite-backed Tiled a concurrent read of the
table can make an append fail with "database is locked"), how many of them
were appends retried in place, and run rewrites, and the uploader's own
flush lag (age of the oldest row of each flush).
Between scans the previous run is left to finish uploading (untimed).

Configurations: the product default (``batch_seconds = 0.5``) and
``batch_seconds = 1.0`` (the default before live streaming); each rate and
configuration is run in every repetition, side by side.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx

from .common import (
    Bench,
    make_publisher,
    percentile,
    publisher_socket,
    sidecar_settings,
    start_pipelines,
    summary,
    synthetic_run,
)

NAME = "live_latency"
TITLE = "Live latency (event time to row readable in Tiled)"
TARGET = "p99 <= 1 s at 10 Hz and <= 2 s at 200 Hz"
POLL_S = 0.1
RATES = (10, 200)


class _Poller(threading.Thread):
    """Polls a run's seq_num column; remembers when each seq_num first showed up."""

    def __init__(self, tiled: Any, uid: str, expected: int) -> None:
        super().__init__(daemon=True)
        self.url = f"{tiled.uri}/api/v1/table/full/{uid}/primary/internal"
        self.headers = {"Authorization": f"Apikey {tiled.api_key}", "Accept": "application/json"}
        self.expected = expected
        self.seen: dict[int, float] = {}
        self.request_seconds: list[float] = []
        self.stop = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self.stop.is_set() and len(self.seen) < self.expected:
                t0 = time.perf_counter()
                try:
                    response = http.get(self.url, params={"column": "seq_num"}, headers=self.headers)
                except httpx.HTTPError as err:
                    self.error = repr(err)
                    response = None
                now = time.time()
                self.request_seconds.append(time.perf_counter() - t0)
                if response is not None and response.status_code == 200:
                    for seq in response.json()["seq_num"]:
                        self.seen.setdefault(int(seq), now)
                self.stop.wait(max(0.0, POLL_S - (time.perf_counter() - t0)))


def _uploader_status(pipe: Any) -> dict[str, Any]:
    try:
        return dict(json.loads((pipe.spool_dir / "uploader.json").read_text()))
    except (OSError, ValueError):
        return {}


def _scan(tiled: Any, pipe: Any, publisher: Any, rate: float, seconds: float) -> dict[str, Any]:
    n = max(2, int(rate * seconds))
    before = _uploader_status(pipe)
    documents = synthetic_run(n, live=True)
    name, start = next(documents)
    publisher(name, start)
    name, descriptor = next(documents)
    publisher(name, descriptor)
    poller = _Poller(tiled, start["uid"], n)
    poller.start()
    event_times: dict[int, float] = {}
    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        name, event = next(documents)
        event_times[event["seq_num"]] = event["time"]
        publisher(name, event)
    name, stop = next(documents)
    publisher(name, stop)
    achieved = n / (time.perf_counter() - t0)
    poller.join(timeout=60)
    poller.stop.set()
    pipe.wait_uploaded([start["uid"]], timeout=120)  # untimed: nothing left running into the next scan
    after = _uploader_status(pipe)
    lags = after.get("lag_seconds", [])[len(before.get("lag_seconds", [])) :]
    latencies = [poller.seen[s] - t for s, t in event_times.items() if s in poller.seen]
    return {
        "events": n,
        "achieved_rate": achieved,
        "rows_seen": len(latencies),
        "p50": percentile(latencies, 50) if latencies else None,
        "p99": percentile(latencies, 99) if latencies else None,
        "max": max(latencies) if latencies else None,
        "latencies": latencies,
        "poll_seconds": sum(poller.request_seconds) / max(1, len(poller.request_seconds)) + POLL_S,
        "poll_error": poller.error,
        "upload_failures": after.get("retries", 0) - before.get("retries", 0),
        "append_retries": after.get("append_retries", 0) - before.get("append_retries", 0),
        "rewrites": after.get("rewrites", 0) - before.get("rewrites", 0),
        "flush_lag_max": max(lags) if lags else None,
    }


def _specs(bench: Bench) -> tuple[dict[str, dict[str, Any] | None], dict[str, str]]:
    tiled = bench.tiled(wait=False)
    specs: dict[str, dict[str, Any] | None] = {
        "up": {"tiled_uri": tiled.uri, "api_key": tiled.api_key, "settings": sidecar_settings()},
    }
    variants = {"batch_seconds_0.5": "up"}
    if not bench.smoke:
        specs["up10"] = {
            "tiled_uri": tiled.uri,
            "api_key": tiled.api_key,
            "settings": sidecar_settings(batch_seconds=1.0),
        }
        variants["batch_seconds_1.0"] = "up10"
    return specs, variants


def prepare(bench: Bench) -> None:
    start_pipelines(bench, _specs(bench)[0], wait=False)


def run(bench: Bench) -> dict[str, Any]:
    seconds = bench.size(4.0, 1.0)
    specs, variants = _specs(bench)
    pipes = start_pipelines(bench, specs)
    tiled = bench.tiled()
    publishers = {}
    for variant, pipe_name in variants.items():
        publishers[variant] = make_publisher(pipes[pipe_name].proxy.in_address)
        pipes[pipe_name].wait_messages(publisher_socket(publishers[variant]))
        pipes[pipe_name].sidecar.wait_uploader_connected()
    keys = [f"{variant}@{rate}Hz" for variant in variants for rate in RATES]
    reps: list[dict[str, Any]] = []
    try:
        for rep in range(bench.reps):
            order = keys[rep % len(keys) :] + keys[: rep % len(keys)]
            row = {}
            for key in order:
                variant, rate = key.split("@")
                pipe = pipes[variants[variant]]
                row[key] = _scan(tiled, pipe, publishers[variant], float(rate.removesuffix("Hz")), seconds)
            reps.append(row)
            bench.log(
                f"  rep {rep + 1}: "
                + ", ".join(
                    f"{k} p50 {row[k]['p50']:.2f} p99 {row[k]['p99']:.2f} s" for k in keys if row[k]["p99"]
                )
            )
    finally:
        for publisher in publishers.values():
            publisher.close()
    out: dict[str, Any] = {"scan_seconds": seconds, "variants": list(variants), "rates": list(RATES)}
    out["upload_failures"] = {k: sum(r[k]["upload_failures"] for r in reps) for k in keys}
    out["rewrites"] = {k: sum(r[k]["rewrites"] for r in reps) for k in keys}
    out["append_retries"] = {k: sum(r[k]["append_retries"] for r in reps) for k in keys}
    for stat in ("p50", "p99", "max", "achieved_rate", "poll_seconds", "flush_lag_max"):
        out[stat] = {k: summary([r[k][stat] for r in reps if r[k][stat] is not None]) for k in keys}
    out["pooled"] = {}
    for k in keys:
        pooled = [x for r in reps for x in r[k]["latencies"]]
        out["pooled"][k] = {
            "n": len(pooled),
            "p50": percentile(pooled, 50) if pooled else None,
            "p99": percentile(pooled, 99) if pooled else None,
            "max": max(pooled) if pooled else None,
        }
    out["clean_scans"] = {}
    for k in keys:
        clean = [r[k] for r in reps if r[k]["upload_failures"] == 0 and r[k]["p99"] is not None]
        out["clean_scans"][k] = {
            "n": len(clean),
            "p50": summary([x["p50"] for x in clean]),
            "p99": summary([x["p99"] for x in clean]),
        }
    out["rows_missing"] = {k: sum(r[k]["events"] - r[k]["rows_seen"] for r in reps) for k in keys}
    out["latencies"] = {k: [x for r in reps for x in r[k]["latencies"]] for k in keys}
    for r in reps:
        for k in keys:
            r[k].pop("latencies")
    out["repetitions"] = reps
    limits = {10: 1.0, 200: 2.0}
    met = {}
    for k in keys:
        rate = int(k.split("@")[1].removesuffix("Hz"))
        p99 = out["p99"][k]["median"]
        met[k] = p99 is not None and p99 <= limits[rate]
    out["headline"] = {
        "p99_median": {k: out["p99"][k]["median"] for k in keys},
        "target_met_by": met,
        "target_met": all(met[f"batch_seconds_0.5@{r}Hz"] for r in RATES),
    }
    return out
