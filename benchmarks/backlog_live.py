"""11. Backlog + live: a 1,000-run backlog drained while a 10 Hz scan streams to a Tiled subscriber.

Real processes with the product's default settings: Tiled with its
in-memory streaming cache, bluesky's proxy, the sidecar daemon, a RunEngine
(ophyd.sim ``det``) publishing through bluesky's Publisher, and
bluesky-tiled-plugins' ``subscribe_to_streams`` on Tiled's root
(`testing.tiled_server.LiveSubscriber`). Two phases, each with its own
sidecar:

- **idle**: an empty spool; one 10 Hz scan of ``window * 10`` events;
- **drain**: ``runs`` runs of ``events`` events each are spooled by the
  receiver's own `Ingest` before the sidecar starts (as if acquired while
  Tiled was unreachable), then the sidecar starts (Tiled is back) and, once
  the drain is under way, windows of ``window`` seconds alternate: no scan,
  scan, no scan, scan, no scan.

One subscriber per phase, connected before it and kept through every
window, so the windows with and without a scan differ by the scan only. It
follows the ``primary`` stream (``subscribe_to_streams``' filter, as a live
plot does); the backlog's runs name their one stream ``backlog``, so the
subscriber is told of each of them but reads none of their rows (a
consumer of every backlog row would measure itself: the subscriber runs in
this process, beside the RunEngine).

Per scan: event -> subscriber lag p50/p99/max (callback time - event
``time``), rows delivered, and the time from the stop document to the run
being readable in Tiled (its ``stop`` metadata and every row). Drain rate:
runs uploaded per second over each window, from ``uploader.json``
(`UploaderStatus.runs_uploaded`, sampled every 0.25 s; the live run is
uploaded after its window ends, so it is not counted). The ratio is each
scan window's rate over the mean of its two neighbours (taken in the same
drain, so the machine's load drifts little between them).

Standalone: ``python -m benchmarks.backlog_live [--runs N] [--events M]
[--window S] [--smoke]`` runs only this comparison through `benchmarks.run`
(its entry merged into ``benchmarks/results.json``, RESULTS.md regenerated).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .common import spawn_streaming_tiled, synthetic_run

NAME = "backlog_live"
TITLE = "Live lane during a backlog drain (1,000 runs spooled while Tiled was down, a 10 Hz scan)"
TARGET = (
    "live p99 <= 0.5 s idle and <= 1 s during the drain; readable within seconds of the stop; "
    "drain rate with the scan >= 80% of without"
)
OWN_TILED = True
RATE_HZ = 10.0
RUNS, EVENTS, WINDOW_S = 1000, 20, 30.0
SMOKE_RUNS, SMOKE_EVENTS, SMOKE_WINDOW_S = 30, 5, 3.0
IDLE_P99_TARGET_S, DRAIN_P99_TARGET_S, RATIO_TARGET = 0.5, 1.0, 0.8
PHASES = ("off", "on", "off", "on", "off")
WARM_RUNS = 5  # the drain is "under way" once this many runs are uploaded
BACKLOG_STREAM = "backlog"


def make_backlog(root: Path, runs: int, events: int) -> dict[str, Any]:
    """Spool `runs` runs of `events` events (stream `BACKLOG_STREAM`) through the receiver's `Ingest`."""
    from tiled_writer_sidecar.config import SpoolConfig
    from tiled_writer_sidecar.receive.counters import ReceiverStats
    from tiled_writer_sidecar.receive.ingest import Ingest
    from tiled_writer_sidecar.spool.directory import SpoolDir

    ingest = Ingest(SpoolConfig(dir=str(root)), SpoolDir(root), ReceiverStats())
    started = time.perf_counter()
    documents = 0
    for i in range(runs):
        for name, doc in synthetic_run(events, scan_id=i + 1):
            if name == "descriptor":
                doc = {**doc, "name": BACKLOG_STREAM}
            elif name == "stop":
                doc = {**doc, "num_events": {BACKLOG_STREAM: events}}
            ingest.accept(name, doc)
            documents += 1
    ingest.shutdown()
    return {
        "runs": runs,
        "events": runs * events,
        "documents": documents,
        "seconds": time.perf_counter() - started,
    }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


class DrainSampler:
    """``uploader.json``'s ``(updated, runs_uploaded, rows)``, sampled in a thread."""

    def __init__(self, spool_dir: Path) -> None:
        self.spool_dir = spool_dir
        self.samples: list[tuple[float, int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="drain-sampler")

    def __enter__(self) -> DrainSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        from tiled_writer_sidecar.spool.state_files import UploaderStatus

        while not self._stop.wait(0.25):
            status = UploaderStatus.load(self.spool_dir)
            if status is None or (self.samples and status.updated <= self.samples[-1][0]):
                continue
            self.samples.append((status.updated, status.runs_uploaded, status.rows, status.backlog_runs))

    def uploaded(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def rate(self, start: float, end: float) -> dict[str, Any]:
        """Runs/s and rows/s between the last sample at or before `start` and the first at or after `end`."""
        before = [s for s in self.samples if s[0] <= start] or self.samples[:1]
        after = [s for s in self.samples if s[0] >= end] or self.samples[-1:]
        a, b = before[-1], after[0]
        seconds = b[0] - a[0]
        return {
            "start": start,
            "end": end,
            "seconds": seconds,
            "runs": b[1] - a[1],
            "runs_per_s": (b[1] - a[1]) / seconds if seconds > 0 else None,
            "rows_per_s": (b[2] - a[2]) / seconds if seconds > 0 else None,
            "backlog_left": b[3],
        }


def _readable(client: Any, uid: str, events: int) -> bool:
    from tiled_writer_sidecar.testing.tiled_readback import read_stream

    try:
        node = client[uid]
        if not node.metadata.get("stop"):
            return False
        return len(read_stream(client, uid, "primary", arrays=False)) >= events
    except Exception:  # noqa: BLE001 - not there yet (KeyError, 404, a table still being written)
        return False


def live_scan(
    acq: Any, client: Any, subscriber: Any, events: int, *, timeout: float = 300.0
) -> dict[str, Any]:
    """One 10 Hz scan seen by `subscriber` (on Tiled's root): lag quantiles and stop -> readable."""
    import bluesky.plans as bp
    from ophyd.sim import det

    started = time.time()
    (uid,) = acq.run(bp.count([det], events, delay=1 / RATE_HZ))
    stop = next(doc for name, doc in acq.documents if name == "stop" and doc["run_start"] == uid)
    deadline = time.monotonic() + timeout
    readable_at = None
    while time.monotonic() < deadline:
        if _readable(client, uid, events):
            readable_at = time.time()
            break
        time.sleep(0.1)
    while time.monotonic() < deadline and len(subscriber.seq_nums(uid)) < events:
        time.sleep(0.05)
    lags = sorted(subscriber.lags(uid))
    arrivals = subscriber.arrivals(uid)
    return {
        "uid": uid,
        "events": events,
        "start": started,
        "stop": stop["time"],
        "rows_delivered": len(lags),
        "rows_before_stop": sum(a <= stop["time"] for a in arrivals),
        "lag_p50_s": _quantile(lags, 0.5),
        "lag_p99_s": _quantile(lags, 0.99),
        "lag_max_s": lags[-1] if lags else None,
        "problems": subscriber.problems(uid, events),
        "stop_to_readable_s": None if readable_at is None else readable_at - stop["time"],
    }


@contextlib.contextmanager
def _subscriber(client: Any) -> Iterator[Any]:
    from tiled_writer_sidecar.testing.tiled_server import LiveSubscriber

    subscriber = LiveSubscriber(client, streams={"primary": None})
    try:
        yield subscriber
    finally:
        subscriber.disconnect()


def _sidecar(directory: Path, proxy: Any, tiled: Any) -> Any:
    from tiled_writer_sidecar.config import TiledConfig
    from tiled_writer_sidecar.testing.sidecar import SidecarProcess

    defaults = TiledConfig()  # SidecarProcess shortens these for tests: the product's defaults here
    return SidecarProcess(
        directory,
        zmq_address=proxy.out_address,
        tiled_uri=tiled.uri,
        api_key=tiled.api_key,
        settings={
            "tiled": {
                "batch_seconds": defaults.batch_seconds,
                "backoff_max_seconds": defaults.backoff_max_seconds,
            }
        },
    )


def measure(
    work: Path,
    tiled: Any,
    *,
    runs: int,
    events: int,
    window: float,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    from tiled_writer_sidecar.testing import Acquisition, ZmqProxy, wait_until

    scan_events = max(2, round(window * RATE_HZ))
    result: dict[str, Any] = {"runs": runs, "events_per_run": events, "window_s": window, "rate_hz": RATE_HZ}
    tiled.wait_ready()
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(ZmqProxy(log_path=work / "proxy.log"))
        acq = stack.enter_context(Acquisition.for_proxy(proxy))
        # Idle: no backlog.
        client = tiled.client()
        with _subscriber(client) as subscriber, _sidecar(work / "idle", proxy, tiled) as sidecar:
            sidecar.wait_uploader_connected()
            acq.wait_subscribers(lambda: sidecar.messages_seen() > 0)
            result["idle"] = live_scan(acq, client, subscriber, scan_events)
        log(f"  idle: p99 {result['idle']['lag_p99_s']} s, readable {result['idle']['stop_to_readable_s']} s")
        # Drain: the backlog spooled first (Tiled down), then the sidecar starts (Tiled back).
        backlog = make_backlog(work / "drain" / "spool", runs, events)
        log(f"  backlog: {runs} runs x {events} events spooled in {backlog['seconds']:.0f} s")
        windows: list[dict[str, Any]] = []
        with (
            _subscriber(client) as subscriber,
            _sidecar(work / "drain", proxy, tiled) as sidecar,
            DrainSampler(sidecar.spool_dir) as sampler,
        ):
            sidecar.wait_uploader_connected()
            acq.wait_subscribers(lambda: sidecar.messages_seen() > 0)
            wait_until(
                lambda: sampler.uploaded() >= min(WARM_RUNS, runs // 4), 600, what="the drain to start"
            )
            for phase in PHASES:
                if phase == "on":
                    scan = live_scan(acq, client, subscriber, scan_events)
                    start, end = scan["start"], scan["stop"]
                else:
                    scan, start = None, time.time()
                    time.sleep(window)
                    end = time.time()
                time.sleep(1.5)  # the next uploader.json sample after `end` (written once a second)
                entry = {"phase": phase, **sampler.rate(start, end)}
                if scan is not None:
                    entry["scan"] = scan
                windows.append(entry)
                log(
                    f"  {phase}: {entry['runs_per_s']} runs/s, backlog left {entry['backlog_left']}"
                    + (
                        ""
                        if scan is None
                        else f"; p99 {scan['lag_p99_s']} s, readable {scan['stop_to_readable_s']} s"
                    )
                )
        result["backlog"] = backlog
        result["windows"] = windows
    result["headline"] = headline_figures(result)
    return result


def headline_figures(r: dict[str, Any]) -> dict[str, Any]:
    windows = r["windows"]
    ratios = []
    for i, w in enumerate(windows):
        if w["phase"] != "on":
            continue
        around = [windows[j]["runs_per_s"] for j in (i - 1, i + 1) if 0 <= j < len(windows)]
        around = [v for v in around if v]
        if around and w["runs_per_s"] is not None:
            ratios.append(w["runs_per_s"] / statistics.mean(around))
    scans = [w["scan"] for w in windows if "scan" in w]
    off = [w["runs_per_s"] for w in windows if w["phase"] == "off" and w["runs_per_s"] is not None]
    on = [w["runs_per_s"] for w in windows if w["phase"] == "on" and w["runs_per_s"] is not None]
    drain_p99 = max((s["lag_p99_s"] for s in scans if s["lag_p99_s"] is not None), default=None)
    readable = [s["stop_to_readable_s"] for s in scans]
    idle = r["idle"]
    ran_out = bool(windows) and windows[-1]["backlog_left"] == 0
    every_row = all(s["rows_delivered"] == s["events"] and not s["problems"] for s in [idle, *scans])
    return {
        "idle_p50_s": idle["lag_p50_s"],
        "idle_p99_s": idle["lag_p99_s"],
        "idle_stop_to_readable_s": idle["stop_to_readable_s"],
        "drain_p50_s": max((s["lag_p50_s"] for s in scans if s["lag_p50_s"] is not None), default=None),
        "drain_p99_s": drain_p99,
        "drain_stop_to_readable_s": readable,
        "runs_per_s_without_scan": statistics.mean(off) if off else None,
        "runs_per_s_with_scan": statistics.mean(on) if on else None,
        "ratios": ratios,
        "ratio": min(ratios) if ratios else None,
        "backlog_ran_out": ran_out,
        "every_row_once": every_row,
        "target_met": bool(ratios)
        and not ran_out
        and every_row
        and idle["lag_p99_s"] is not None
        and idle["lag_p99_s"] <= IDLE_P99_TARGET_S
        and drain_p99 is not None
        and drain_p99 <= DRAIN_P99_TARGET_S
        and min(ratios) >= RATIO_TARGET,
    }


# ------------------------------------------------------------------ make bench


def prepare(bench: Any) -> None:
    """Spawn this comparison's streaming Tiled now: it imports while other comparisons run."""
    spawn_streaming_tiled(bench, "backlog_live_tiled")


def run(bench: Any) -> dict[str, Any]:
    """The comparison under `benchmarks.run` (sizes from ``bench.shared`` when run standalone)."""
    if "backlog_live_tiled" not in bench.shared:
        prepare(bench)
    tiled = bench.shared["backlog_live_tiled"]
    work = bench.workdir / "backlog-live"
    work.mkdir(parents=True, exist_ok=True)
    options = bench.shared.get("backlog_live", {})
    try:
        return measure(
            work,
            tiled,
            runs=options.get("runs") or bench.size(RUNS, SMOKE_RUNS),
            events=options.get("events") or bench.size(EVENTS, SMOKE_EVENTS),
            window=options.get("window") or bench.size(int(WINDOW_S), int(SMOKE_WINDOW_S)),
            log=bench.log,
        )
    finally:
        tiled.close()  # its streaming cache holds every row in memory; later comparisons need none


# ------------------------------------------------------------------ RESULTS.md


def _s(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def headline(c: dict[str, Any]) -> str:
    h = c["headline"]
    return (
        f"live p99 idle {_s(h['idle_p99_s'])} s, during the drain {_s(h['drain_p99_s'])} s; "
        f"drain {_s(h['runs_per_s_with_scan'])} runs/s with the scan vs {_s(h['runs_per_s_without_scan'])} "
        f"without (worst ratio {_s(h['ratio'])}); stop -> readable during the drain "
        + ", ".join(f"{_s(v, 1)} s" for v in h["drain_stop_to_readable_s"])
    )


def section(c: dict[str, Any]) -> list[str]:
    rows = [
        "| window | scan | drain runs/s | drain rows/s | backlog left | lag p50 s | lag p99 s | lag max s "
        "| rows live / total | stop -> readable s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    idle = c["idle"]
    rows.append(
        f"| idle (no backlog) | {idle['events']} events @ {c['rate_hz']:g} Hz | - | - | 0 | {_s(idle['lag_p50_s'])} "
        f"| {_s(idle['lag_p99_s'])} | {_s(idle['lag_max_s'])} | {idle['rows_before_stop']} / "
        f"{idle['rows_delivered']} | {_s(idle['stop_to_readable_s'])} |"
    )
    for n, w in enumerate(c["windows"], 1):
        scan = w.get("scan")
        lag = (
            f"{_s(scan['lag_p50_s'])} | {_s(scan['lag_p99_s'])} | {_s(scan['lag_max_s'])} | "
            f"{scan['rows_before_stop']} / {scan['rows_delivered']} | {_s(scan['stop_to_readable_s'])}"
            if scan
            else "- | - | - | - | -"
        )
        rows.append(
            f"| {n} ({_s(w['seconds'], 1)} s) | {'yes' if scan else 'no'} | {_s(w['runs_per_s'])} "
            f"| {_s(w['rows_per_s'], 0)} | {w['backlog_left']} | {lag} |"
        )
    h = c["headline"]
    return [
        f"Backlog: {c['runs']:,} runs x {c['events_per_run']} events, spooled by the receiver's `Ingest` before the "
        f"sidecar starts (Tiled was down; their stream is `backlog`); then windows of {c['window_s']:g} s alternate without and with a "
        f"{c['rate_hz']:g} Hz scan (RunEngine -> Publisher -> proxy -> sidecar, default settings), a "
        "`subscribe_to_streams` subscriber on Tiled's root (stream `primary`, connected through every window). Drain rate from `uploader.json` over each window; "
        "the ratio is a scan window's rate over the mean of its two neighbours.",
        "",
        *rows,
        "",
        f"Ratios (with / without the scan): {', '.join(_s(r) for r in h['ratios'])} (target >= {RATIO_TARGET:g}); "
        f"every row exactly once: {'yes' if h['every_row_once'] else 'NO'}"
        + (
            "; the backlog ran out before the last window: rerun with more --runs"
            if h["backlog_ran_out"]
            else "."
        )
        + _load(c),
    ]


def _load(c: dict[str, Any]) -> str:
    load = c.get("loadavg") or {}
    before, after = load.get("before"), load.get("after")
    if not before or not after:
        return ""
    return f" Machine load (1 min) {before[0]:.1f} before, {after[0]:.1f} after (2 cores, shared)."


def analysis(c: dict[str, Any], _all: dict[str, Any]) -> list[str]:
    h = c["headline"]
    scans = [w["scan"] for w in c["windows"] if "scan" in w]
    twice = [p for s in scans for p in s["problems"] if "delivered twice" in p]
    return [
        "- Open runs have their own lane (a worker beyond the backlog's), so the scan's rows wait for their own "
        f"stream's previous append, not for the backlog: p99 {_s(h['idle_p99_s'])} s idle vs {_s(h['drain_p99_s'])} s "
        "during the drain. What the drain adds is Tiled's time per request while it also writes the backlog, "
        "and CPU: 2 cores shared by Tiled, the sidecar's two processes, the RunEngine and the subscriber "
        "(and, on this machine, other jobs: see the load).",
        "- Both lanes write to one Tiled on SQLite, which serialises writes: an append that meets the backlog's "
        "write is answered 500 (`database is locked`) and retried, and Tiled streams the refused rows anyway"
        + (f" ({'; '.join(twice)} at the subscriber)" if twice else "")
        + f". The drain's rate falls with the scan ({_s(h['runs_per_s_with_scan'])} vs "
        f"{_s(h['runs_per_s_without_scan'])} runs/s) for the same reason.",
    ]


# ------------------------------------------------------------------ standalone


def main(argv: list[str] | None = None) -> int:
    from . import run as bench_run

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.backlog_live", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--runs", type=int, help=f"backlog runs (default {RUNS:,})")
    parser.add_argument("--events", type=int, help=f"events per backlog run (default {EVENTS})")
    parser.add_argument("--window", type=float, help=f"seconds per window (default {WINDOW_S:g})")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (checks it runs)")
    parser.add_argument("--results", type=Path, help="results JSON (default benchmarks/results.json)")
    args = parser.parse_args(argv)
    forwarded = ["--only", NAME, "--reps", "1"]
    if args.smoke:
        forwarded.append("--smoke")
    if args.results:
        forwarded += ["--results", str(args.results)]
    options = {"runs": args.runs, "events": args.events, "window": args.window}
    return bench_run.main(forwarded, shared={NAME: options})


if __name__ == "__main__":
    sys.exit(main())
