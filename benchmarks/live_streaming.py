"""8. Live streaming: event time to a Tiled streaming subscriber's callback, and what it costs the RunEngine.

Tiled serves its catalog with the in-memory streaming cache; a consumer
subscribes with bluesky-tiled-plugins' ``subscribe_to_streams`` before the
scan (`testing.tiled_server.LiveSubscriber`, which also checks Tiled's
per-node sequence numbers for gaps and repeats). ``bp.count([det], N,
delay=1/rate)`` is written to Tiled by:

- ``sidecar``: Publisher -> bluesky-0MQ-proxy -> the sidecar daemon with
  its default settings;
- ``tiledwriter_1`` / ``tiledwriter_10000``: in-process
  ``RE.subscribe(TiledWriter(client, batch_size=...))``.

Cases (`FULL_CASES`): 40 events at 10 Hz and 200 Hz and 10,000 at 200 Hz
for every writer (``tiledwriter_1`` only up to 1,000 events: one request
per event, 10,000 take minutes and say nothing new), and 10,000 at 10 Hz
for the sidecar only: that scan lasts 1,000 s, and each in-process writer
would add another 17 minutes to show what 10,000 at 200 Hz already shows
(batch 10000 holds every row until the stop; batch 1 costs the RunEngine a
request per event). ``--smoke`` runs 20 events at 50 Hz, sidecar only.

Per case: rows emitted, rows the subscriber got (and how many before the
scan ended), lag p50/p99/max (callback time - event ``time``), gaps or
repeats, and the RunEngine's cost per event: the scan's wall time per event
minus a no-writer scan's at the same rate. That baseline is a short scan
(``--baseline-events``, default 200): with a fixed ``delay`` the
RunEngine's time per event does not depend on how many events the scan has,
so 10,000 events at 10 Hz need no 1,000 s baseline scan.

Under ``make bench`` it is the ``live_streaming`` comparison. Standalone,
``python -m benchmarks.live_streaming [--cases N@rate,...] [--writers ...]``
writes ``live_streaming.json`` next to this file (or ``--out``), rewritten
after each case; ``python -m benchmarks.merge FILE...`` puts such files'
rows into ``results.json`` (`merged_comparison`: later files replace the
same case and writer; sidecar rows only at the current default
``batch_seconds``) and regenerates RESULTS.md, as ``benchmarks.run --only``
does.
``live_streaming_batch_seconds.json`` holds the sidecar's ``batch_seconds``
sweep (0.5 vs 0.25) that chose the default 0.5; ``live_streaming_live_lane.json``
the sidecar's short cases again once a waiting run woke on its log's growth
(before, on ``received.json``, saved once a second): merged last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .common import rounded, spawn_streaming_tiled

NAME = "live_streaming"
TITLE = "Live streaming (event time to a Tiled subscriber's callback)"
TARGET = "sidecar p99 <= 1 s at 10 Hz and 200 Hz, 40 and 10,000 events; every row exactly once"
WRITERS = ("sidecar", "tiledwriter_1", "tiledwriter_10000")
P99_TARGET_S = 1.0
Case = tuple[int, float, tuple[str, ...]]
FULL_CASES: list[Case] = [
    (40, 10.0, WRITERS),
    (40, 200.0, WRITERS),
    (10_000, 200.0, WRITERS),
    (10_000, 10.0, ("sidecar",)),
]
SMOKE_CASES: list[Case] = [(20, 50.0, ("sidecar",))]
HERE = Path(__file__).resolve().parent
SWEEP = HERE / "live_streaming_batch_seconds.json"


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def _runs(writer: str, n: int) -> bool:
    """tiledwriter_1 makes one request per event: 10,000 events take minutes and say nothing new."""
    return not (writer == "tiledwriter_1" and n > 1000)


def _case(
    writer: str,
    n: int,
    rate: float,
    tiled: Any,
    proxy: Any,
    sidecar: Any,
    baseline: dict[float, float],
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
        base = baseline.get(rate)  # the no-writer RunEngine's seconds per event at this rate
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
            "runengine_cost_per_event_ms": None if base is None else 1000 * (wall / n - base),
        }
    finally:
        subscriber.disconnect()


def _baseline(n: int, rate: float) -> float:
    """The no-writer RunEngine's wall time per event for ``n`` events at ``rate``."""
    import bluesky.plans as bp
    from ophyd.sim import det

    from tiled_writer_sidecar.testing import Acquisition

    with Acquisition(None) as acq:
        acq.run(bp.count([det], n, delay=1 / rate))
        return acq.last_duration / n


def measure(
    work: Path,
    cases: list[Case],
    *,
    batch_seconds: float,
    baseline_events: int = 200,
    log: Callable[[str], None] = print,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    tiled: Any = None,
) -> dict[str, Any]:
    """Run `cases` (events, rate, writers) against one streaming Tiled, proxy and sidecar.

    ``tiled`` is a spawned `TiledServer` with a streaming cache (its owner
    stops it), or None to start one in ``work``.
    """
    from tiled_writer_sidecar.testing import TiledServer, ZmqProxy
    from tiled_writer_sidecar.testing.sidecar import SidecarProcess

    counts: dict[float, int] = {}
    for n, rate, _writers in cases:
        counts[rate] = min(counts.get(rate, n), n, baseline_events)
    baseline = {rate: _baseline(n, rate) for rate, n in counts.items()}
    log(
        "  no-writer baseline, ms per event: "
        + ", ".join(f"{r:g} Hz {1000 * s:.2f}" for r, s in baseline.items())
    )
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if tiled is None:
            tiled = stack.enter_context(TiledServer(work / "tiled", streaming_cache="memory"))
        else:
            tiled.wait_ready()
        proxy = stack.enter_context(ZmqProxy(log_path=work / "proxy.log"))
        sidecar = stack.enter_context(
            SidecarProcess(
                work / "sidecar",
                zmq_address=proxy.out_address,
                tiled_uri=tiled.uri,
                api_key=tiled.api_key,
                settings={"tiled": {"batch_seconds": batch_seconds}},
            )
        )
        sidecar.wait_uploader_connected()
        for n, rate, writers in cases:
            for writer in writers:
                if not _runs(writer, n):
                    continue
                result = _case(writer, n, rate, tiled, proxy, sidecar, baseline)
                result["loadavg"] = list(os.getloadavg())
                result["baseline_events"] = counts[rate]
                results.append(result)
                log(
                    f"  {n}@{rate:g}Hz {writer}: {result['rows_delivered']}/{n} rows, "
                    f"{result['rows_before_scan_end']} live, p99 {result['lag_p99_s']} s"
                )
                if on_result is not None:
                    on_result(_entry(results, batch_seconds, baseline, counts))
    return _entry(results, batch_seconds, baseline, counts)


def _entry(
    results: list[dict[str, Any]],
    batch_seconds: float,
    baseline: dict[float, float],
    counts: dict[float, int],
) -> dict[str, Any]:
    return {
        "name": NAME,
        "title": TITLE,
        "target": TARGET,
        "batch_seconds": batch_seconds,
        "loadavg": list(os.getloadavg()),
        "baseline_events": {f"{rate:g}Hz": n for rate, n in counts.items()},
        "baseline_per_event_ms": {f"{rate:g}Hz": 1000 * s for rate, s in baseline.items()},
        "results": results,
        "headline": headline_figures(results, batch_seconds),
    }


def _key(r: dict[str, Any]) -> str:
    return f"{r['events']}@{r['rate_hz']:g}Hz"


def _once(r: dict[str, Any]) -> bool:
    return r["rows_delivered"] == r["events"] and not r["problems"]


def headline_figures(results: list[dict[str, Any]], batch_seconds: float) -> dict[str, Any]:
    """The sidecar's p99 per case, whether every row came exactly once, and the target."""
    sidecar = [r for r in results if r["writer"] == "sidecar"]
    p99 = {_key(r): r["lag_p99_s"] for r in sidecar}
    once = all(_once(r) for r in results)
    return {
        "batch_seconds": batch_seconds,
        "sidecar_p99_s": p99,
        "sidecar_rows_live": {_key(r): [r["rows_before_scan_end"], r["events"]] for r in sidecar},
        "every_row_once": once,
        "target_met": bool(sidecar)
        and once
        and all(v is not None and v <= P99_TARGET_S for v in p99.values()),
    }


# ------------------------------------------------------------------ make bench


def prepare(bench: Any) -> None:
    """Spawn the streaming Tiled server now: it imports while the other comparisons start."""
    spawn_streaming_tiled(bench, "live_streaming_tiled")


def run(bench: Any) -> dict[str, Any]:
    """The comparison under `benchmarks.run` (cases: `FULL_CASES`, or `SMOKE_CASES` with --smoke)."""
    from tiled_writer_sidecar.config import TiledConfig

    tiled = bench.shared.get("live_streaming_tiled")
    work = bench.workdir / "live-streaming"
    work.mkdir(parents=True, exist_ok=True)
    try:
        entry = measure(
            work,
            SMOKE_CASES if bench.smoke else FULL_CASES,
            batch_seconds=TiledConfig().batch_seconds,
            baseline_events=bench.size(200, 20),
            log=bench.log,
            tiled=tiled,
        )
    finally:
        if tiled is not None:
            tiled.close()  # its streaming cache holds every row in memory; the later comparisons need none
    for key in ("name", "title", "target"):
        entry.pop(key)
    return entry


# ------------------------------------------------------------------ RESULTS.md


def headline(c: dict[str, Any]) -> str:
    """The summary line of RESULTS.md."""
    h = c["headline"]
    return (
        "sidecar p99 "
        + ", ".join(f"{k} {_s(v)} s" for k, v in h["sidecar_p99_s"].items())
        + f" (batch_seconds {h['batch_seconds']:g}); every row exactly once: {'yes' if h['every_row_once'] else 'NO'}"
    )


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _cost(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}"


def section(c: dict[str, Any]) -> list[str]:
    """The section of RESULTS.md: one row per case and writer."""
    rows = [
        "| case | writer | rows emitted | delivered live (before the scan ended) | delivered total "
        "| lag p50 s | lag p99 s | lag max s | gaps/repeats | RunEngine cost ms/event | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(c["results"], key=lambda r: (r["events"], r["rate_hz"], WRITERS.index(r["writer"]))):
        problems = "; ".join(r["problems"]) or "0"
        load = r.get("loadavg")
        rows.append(
            f"| {r['events']:,} @ {r['rate_hz']:g} Hz | {r['writer']} | {r['events']:,} | "
            f"{r['rows_before_scan_end']:,} | {r['rows_delivered']:,} | {_s(r['lag_p50_s'])} | "
            f"{_s(r['lag_p99_s'])} | {_s(r['lag_max_s'])} | {problems} | "
            f"{_cost(r['runengine_cost_per_event_ms'])} | {'-' if not load else f'{load[0]:.1f}'} |"
        )
    short = sorted(
        {(r["events"], r["rate_hz"], r["baseline_events"]) for r in c["results"] if r.get("baseline_events")}
    )
    base = "; ".join(f"{n:,} @ {rate:g} Hz: {b:,} events" for n, rate, b in short if b != n)
    lines = [
        f"Sidecar `batch_seconds` = {c['batch_seconds']:g} (its default). Lag = the subscriber's callback time "
        "minus the event's `time`. RunEngine cost = the scan's wall time per event minus a no-writer scan's at the "
        "same rate, of the same length unless shorter here"
        + (f" ({base})" if base else "")
        + ": with a fixed delay the RunEngine's time per event does not depend on the scan's length. It is "
        "noise-level (a few ms either way) unless the writer works inside the RunEngine's callbacks. "
        "10,000 events at 10 Hz (1,000 s) run for the sidecar only: the in-process writers' behaviour at "
        "10,000 events is shown at 200 Hz, and each would add another 17 minutes; `tiledwriter_1` runs only up "
        "to 1,000 events (one request per event).",
        "",
        *rows,
    ]
    sources = c.get("sources")
    if sources:
        lines += [
            "",
            "Rows come from standalone runs of `python -m benchmarks.live_streaming`, merged by `python -m benchmarks.merge`:",
        ]
        lines += [f"- {s}" for s in sources]
    lines += ["", *_sweep_lines()]
    return lines


def _sweep_lines() -> list[str]:
    """The batch_seconds sweep that chose the default (sidecar only), from its JSON file."""
    if not SWEEP.exists():
        return []
    sweep = json.loads(SWEEP.read_text())
    by_setting: dict[float, list[str]] = {}
    for run_ in sweep.get("runs", []):
        for r in run_["results"]:
            by_setting.setdefault(run_["batch_seconds"], []).append(f"{_key(r)} p99 {_s(r['lag_p99_s'])} s")
    return [
        f"`batch_seconds` sweep (`benchmarks/{SWEEP.name}`; {sweep.get('note', '')}): "
        + "; ".join(f"**{b:g} s**: " + ", ".join(v) for b, v in sorted(by_setting.items()))
        + ". The default is 0.5 s."
    ]


def analysis(c: dict[str, Any], _all: dict[str, Any]) -> list[str]:
    """What limits it (RESULTS.md), quoting the numbers."""
    by = {(r["writer"], _key(r)): r for r in c["results"]}
    lines = []
    sidecar = [r for r in c["results"] if r["writer"] == "sidecar"]
    if sidecar:
        worst = max(sidecar, key=lambda r: r["lag_p99_s"] or 0.0)
        lines.append(
            f"- The sidecar appends what it spooled every `batch_seconds` ({c['batch_seconds']:g} s), so a row "
            "waits up to that plus one append round-trip and the stream's delivery: its worst p99 here is "
            f"{_s(worst['lag_p99_s'])} s ({_key(worst)}); its worst single row took "
            f"{_s(max(r['lag_max_s'] or 0.0 for r in sidecar))} s (the machine is shared and loaded: "
            "a flush or the stream can wait for a core). A scan shorter than `batch_seconds` (40 events at 200 Hz: "
            "0.2 s) is delivered after it ends, so 'delivered live' is 0 there by construction."
        )
    big = by.get(("tiledwriter_10000", "10000@200Hz"))
    if big:
        lines.append(
            f"- In-process TiledWriter with batch_size 10000 holds rows until it has 10,000 or the stop: 10,000 "
            f"events at 200 Hz reach the subscriber with p50 {_s(big['lag_p50_s'])} s and max "
            f"{_s(big['lag_max_s'])} s. With batch_size 1 the lag is low, but each event costs the RunEngine a "
            "request ("
            + ", ".join(
                f"{_key(r)} {_cost(r['runengine_cost_per_event_ms'])} ms/event"
                for r in c["results"]
                if r["writer"] == "tiledwriter_1"
            )
            + ")."
        )
    lines.append(
        "- 'every row exactly once' is checked on the subscriber's side: each row's `seq_num` and Tiled's per-node "
        "sequence numbers, with no gap and no repeat (`LiveSubscriber.problems`)."
    )
    return lines


def closing(c: dict[str, Any]) -> str:
    """One line for RESULTS.md's closing note."""
    return f"- Live streaming: {headline(c)}; target p99 <= {P99_TARGET_S:g} s."


# ------------------------------------------------------------------ standalone


def _load_note(run_: dict[str, Any], default: float) -> str:
    """The sidecar setting and the machine's load of one standalone run."""
    note = f"sidecar batch_seconds {run_['batch_seconds']:g}" + (
        ", " if run_["batch_seconds"] == default else " (its sidecar rows left out: not the default), "
    )
    during = run_.get("loadavg_during")
    if during:
        return note + (
            f"1-min load during the run {during['one_minute_min']:.1f}-{during['one_minute_max']:.1f}, "
            f"median {during['one_minute_median']:.1f}"
        )
    load = run_.get("loadavg")
    return note + f"load at the end {', '.join(f'{x:.1f}' for x in load) if load else '?'}"


def merged_comparison(files: Iterable[Path]) -> dict[str, Any]:
    """This comparison's entry of results.json, made from standalone runs' files.

    Later files replace a case and writer of earlier ones; sidecar rows are
    taken only from runs at the current default ``batch_seconds``.
    """
    from tiled_writer_sidecar.config import TiledConfig

    default = TiledConfig().batch_seconds
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    sources = []
    for path in files:
        data = json.loads(Path(path).read_text())
        runs = data.get("runs", [data])
        for run_ in runs:
            taken = []
            for r in run_["results"]:
                if r["writer"] == "sidecar" and run_["batch_seconds"] != default:
                    continue
                r = {**r, "source": Path(path).name}
                r.setdefault("loadavg", run_.get("loadavg"))
                # Runs before --baseline-events took a no-writer scan of the same length.
                r.setdefault(
                    "baseline_events", run_.get("baseline_events", {}).get(f"{r['rate_hz']:g}Hz", r["events"])
                )
                rows[(r["writer"], _key(r))] = r
                taken.append(f"{_key(r)} {r['writer']}")
            if taken:
                sources.append(f"`{Path(path).name}` ({_load_note(run_, default)}): " + ", ".join(taken))
    ordered = sorted(rows.values(), key=lambda r: (r["events"], r["rate_hz"], WRITERS.index(r["writer"])))
    return rounded(
        {
            "title": TITLE,
            "target": TARGET,
            "status": "ok",
            "smoke": False,
            "seconds": None,
            "batch_seconds": default,
            "baseline_events": {},
            "results": ordered,
            "sources": sources,
            "headline": headline_figures(ordered, default),
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", default=",".join(WRITERS))
    parser.add_argument("--out", type=Path, default=HERE / "live_streaming.json")
    parser.add_argument(
        "--batch-seconds", type=float, default=None, help="the sidecar's (default: its default)"
    )
    parser.add_argument("--cases", default=None, help="N@rate,... (default 40@10,40@200,10000@200)")
    parser.add_argument(
        "--baseline-events",
        type=int,
        default=200,
        help="events in the no-writer baseline scan at each rate (its cost is per event)",
    )
    args = parser.parse_args(argv)

    from tiled_writer_sidecar.config import TiledConfig

    batch_seconds = args.batch_seconds if args.batch_seconds is not None else TiledConfig().batch_seconds
    writers = tuple(w for w in args.writers.split(",") if w)
    pairs = [(40, 10.0), (40, 200.0), (10_000, 200.0)]
    if args.cases:
        pairs = [(int(n), float(r)) for n, r in (c.split("@") for c in args.cases.split(","))]

    def write(entry: dict[str, Any]) -> None:
        args.out.write_text(json.dumps(entry, indent=2))

    with tempfile.TemporaryDirectory(prefix="live-streaming-") as tmp:
        entry = measure(
            Path(tmp),
            [(n, rate, writers) for n, rate in pairs],
            batch_seconds=batch_seconds,
            baseline_events=args.baseline_events,
            on_result=write,
        )
    write(entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
