"""10. Many small runs: a backlog of N runs x M events drained by the sidecar vs in-process TiledWriter.

For each shape (N runs x M events; default 200 x 50, 200 x 200, 20 x 10,000)
the backlog is spooled once by the sidecar's own `Ingest`, as if Tiled had
been down while the runs were acquired (`backlog_drain.make_backlog`). In
every repetition, side by side, alternating which goes first:

- ``sidecar``: the daemon's `Uploader` (default settings but `RUNS_IN_FLIGHT` = 4) drains a
  copy of that spool until every run is ``uploaded`` (`_upload.sidecar_upload`);
- ``inprocess``: ``TiledWriter(client)`` is fed the same documents from
  memory (`_upload.inprocess_upload`), as ``RE.subscribe(TiledWriter(client))``.

Each side writes to its own Tiled server (two servers started here, same
configuration, each fresh), into a new container per repetition. Reported:
runs/s, rows/s, HTTP requests, the Tiled server's CPU, and the ratio
sidecar/in-process runs/s taken within each repetition.

Then, untimed, one more drain of each small shape (at most `PROFILE_RUNS`
runs) per side under `_breakdown`'s all-thread sampling profiler, request
log and counters: where one run's time goes (phases, HTTP requests per run by
phase and their latency, fsyncs and state-file writes, TiledWriter objects).

Memory: ``tiled-writer-sidecar replay`` (the daemon's `Uploader` in its own
process) on a spool of 1,000 queued runs, its RSS sampled from /proc for at
most `MEMORY_SECONDS` (the queue stays ~1,000 long meanwhile).

Options: ``--tiled postgresql`` serves both sides from PostgreSQL (catalog
and tables, `tests.support.postgres`, as facilities run Tiled) instead of
SQLite; those shapes are keyed ``RUNSxEVENTS@postgresql``.
``--tiled-workers N`` serves both sides with N uvicorn worker processes
each (`TiledServer` ``workers``: tiled's ``app_factory``, as facilities scale
Tiled out; one worker, the default, is ``tiled serve``); those shapes are
keyed ``...*Nw`` (``200x50@postgresql*2w``) and labelled "N Tiled workers",
and a side's Tiled CPU is that of all its processes. With ``--smoke`` both
sides share one SQLite server, unless ``--tiled postgresql`` or
``--tiled-workers`` asks for servers of their own.
``--runs-in-flight N`` sets the sidecar's ``[tiled] runs_in_flight``
(default `RUNS_IN_FLIGHT`); a shape measured with another value than the
default is keyed ``...~N``.

Standalone: ``python -m benchmarks.small_runs [--quick|--smoke] [--shapes
200x50,200x200,20x10000:1] [--reps N]`` (``:1``: that shape's own repetitions) runs only this comparison through
`benchmarks.run` and merges its entry into ``benchmarks/results.json`` (the
other comparisons kept as they are, key order included; with ``--add`` also
the shapes measured earlier and not again) and regenerates RESULTS.md; with
``--smoke`` and no ``--results`` it writes into a temporary directory.
``--merge FILE...`` measures nothing and merges other runs' entries (shapes
measured concurrently into other files) as ``--add`` would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ._breakdown import INPROCESS_PHASES, SIDECAR_PHASES, Profiling
from ._upload import inprocess_upload, read_documents, sidecar_upload
from .backlog_drain import make_backlog
from .common import Bench, fmt, fmt_summary, peak_rss_mib, rounded, rss_mib, summary, tree_cpu_seconds

NAME = "small_runs"
TITLE = "Many small runs: backlog drain, sidecar vs in-process TiledWriter"
TARGET = (
    "sidecar >= 2x in-process TiledWriter runs/s on small runs (<= 500 events); "
    "uploader <= 250 MiB with 1,000 runs queued"
)
OWN_TILED = True  # two servers of its own (but with --smoke): the shared one is not needed
SIDES = ("sidecar", "inprocess")
FULL_SHAPES: tuple[tuple[int, ...], ...] = ((200, 50), (200, 200), (20, 10_000))
QUICK_SHAPES: tuple[tuple[int, ...], ...] = ((50, 50), (50, 200), (4, 10_000))
SMOKE_SHAPES: tuple[tuple[int, ...], ...] = ((3, 10),)
SMALL_EVENTS = 500  # a run of at most this many events is "small" (the 50-500 points)
PROFILE_RUNS = 25
MEMORY_RUNS, MEMORY_EVENTS, MEMORY_SECONDS = 1000, 50, 90.0
RSS_BUDGET_MIB = 250.0
MAX_REPS = 3  # under `make bench` (5 repetitions by default): 3 already take ~15 minutes


def shape_key(
    runs: int, events: int, tiled: str = "sqlite", in_flight: int | None = None, workers: int = 1
) -> str:
    """``200x50``; ``200x50@postgresql`` on PostgreSQL; ``200x50*2w`` on Tiled with 2 workers;
    ``200x50~1`` with another runs_in_flight."""
    key = f"{runs}x{events}"
    key += "" if tiled == "sqlite" else f"@{tiled}"
    key += "" if workers == 1 else f"*{workers}w"
    return key + ("" if in_flight in (None, RUNS_IN_FLIGHT) else f"~{in_flight}")


def key_of(s: dict[str, Any]) -> str:
    """A measured shape's key (`shape_key`), from its entry in the results."""
    return shape_key(
        s["runs"], s["events"], s.get("tiled", "sqlite"), s.get("runs_in_flight"), s.get("tiled_workers", 1)
    )


def parse_shapes(text: str) -> tuple[tuple[int, ...], ...]:
    """``"200x50,20x10000:1"`` -> ((200, 50), (20, 10000, 1)): runs x events, optionally ``:repetitions``."""
    shapes = []
    for part in filter(None, (p.strip() for p in text.split(","))):  # "": no shape (memory only)
        size, _, reps = part.lower().partition(":")
        runs, _, events = size.partition("x")
        shapes.append((int(runs), int(events), *((int(reps),) if reps else ())))
    return tuple(shapes)


# ------------------------------------------------------------------ servers


def prepare(bench: Bench) -> None:
    """Spawn this comparison's two Tiled servers now (they import while other comparisons run).

    With ``--smoke`` both sides use the shared server (two containers): it checks the comparison
    runs, not how fast, and spares CI two server start-ups.
    """
    from tiled_writer_sidecar.testing import TiledServer

    if _shared_server(bench):
        return
    options = bench.shared.get("small_runs_options", {})
    workers = options.get("tiled_workers") or 1
    servers = {}
    if options.get("tiled") == "postgresql":
        from tests.support.postgres import PostgresServer, PostgresTiledServer

        names = [f"{kind}_{side}" for side in SIDES for kind in ("catalog", "tables")]
        postgres = bench.enter(PostgresServer(bench.workdir / "small-runs-postgres", databases=names))
        for side in SIDES:
            server = PostgresTiledServer(
                bench.workdir / f"small-runs-tiled-{side}",
                postgres,
                catalog_database=f"catalog_{side}",
                tables_database=f"tables_{side}",
                workers=workers,
            )
            bench._stack.callback(server.close)
            server.start(wait=False)
            servers[side] = server
    else:
        for side in SIDES:
            server = TiledServer(bench.workdir / f"small-runs-tiled-{side}", workers=workers)
            bench._stack.callback(server.close)
            server.start(wait=False)
            servers[side] = server
    bench.shared["small_runs_tiled"] = servers


def _shared_server(bench: Bench) -> bool:
    """With ``--smoke`` both sides use the shared server, unless the options ask for another Tiled."""
    options = bench.shared.get("small_runs_options", {})
    default_tiled = (options.get("tiled") or "sqlite") == "sqlite" and (
        options.get("tiled_workers") or 1
    ) == 1
    return bench.smoke and default_tiled


def _servers(bench: Bench) -> dict[str, Any]:
    if _shared_server(bench):
        return {side: bench.tiled() for side in SIDES}
    if "small_runs_tiled" not in bench.shared:
        prepare(bench)
    servers: dict[str, Any] = bench.shared["small_runs_tiled"]
    for server in servers.values():
        server.wait_ready()
    return servers


def _container(server: Any, name: str) -> str:
    server.client().create_container(name)
    return f"{server.uri}/api/v1/metadata/{name}"


# ------------------------------------------------------------------ progress


@contextlib.contextmanager
def _ticking(
    log: Callable[[str], None], what: str, progress: Callable[[], str], every: float = 15.0
) -> Iterator[None]:
    """Log `what` and `progress()` every `every` seconds while the block runs."""
    stop = threading.Event()
    t0 = time.monotonic()

    def tick() -> None:
        while not stop.wait(every):
            log(f"    {what}: {time.monotonic() - t0:.0f} s, {progress()}")

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _uploaded_count(spool: Path) -> Callable[[], str]:
    def count() -> str:
        from tiled_writer_sidecar.spool.state_files import Uploaded

        runs = [p for p in (spool / "runs").iterdir() if p.is_dir()]
        done = 0
        for run_dir in runs:
            with contextlib.suppress(OSError, ValueError, TypeError):
                done += Uploaded.load(run_dir).state == "uploaded"
        return f"{done}/{len(runs)} runs uploaded"

    return count


# ------------------------------------------------------------------ one drain per side


#: The sidecar's settings for a backlog of many short runs: 4 runs in flight (the default, 1, keeps
#: strict acquisition order) and close_stream requests only where they can matter (the default sends
#: them always, as in-process TiledWriter does).
RUNS_IN_FLIGHT = 4
CLOSE_STREAMS = "auto"


def _sidecar_settings(runs_in_flight: int = RUNS_IN_FLIGHT) -> dict[str, Any]:
    from tiled_writer_sidecar.config import TiledConfig

    defaults = TiledConfig()
    return {
        "batch_rows": defaults.batch_rows,
        "batch_seconds": defaults.batch_seconds,
        "runs_in_flight": runs_in_flight,
        "close_streams": CLOSE_STREAMS,
    }


def _drain_sidecar(
    source: Path,
    work: Path,
    server: Any,
    container: str,
    log: Callable[[str], None],
    runs_in_flight: int = RUNS_IN_FLIGHT,
    **kw: Any,
) -> dict[str, Any]:
    spool = work / f"spool-{container}"
    shutil.copytree(source, spool)
    uri = _container(server, container)
    server0 = tree_cpu_seconds(server.pid)
    try:
        with _ticking(log, "sidecar draining", _uploaded_count(spool)):
            result = sidecar_upload(
                spool, uri, api_key=server.api_key, **_sidecar_settings(runs_in_flight), **kw
            )
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    if not result["all_uploaded"]:
        raise RuntimeError(f"sidecar: not every run was uploaded: {result}")
    result["server_cpu_seconds"] = tree_cpu_seconds(server.pid) - server0
    return result


def _drain_inprocess(
    source: Path, server: Any, container: str, log: Callable[[str], None], **kw: Any
) -> dict[str, Any]:
    from tiled.client import from_uri

    documents = read_documents(source)
    client = from_uri(_container(server, container), api_key=server.api_key)
    server0 = tree_cpu_seconds(server.pid)
    try:
        with _ticking(log, "in-process writing", lambda: "(no progress count in-process)"):
            result = inprocess_upload(documents, client, **kw)
        result["runs_uploaded"] = len(client)
    finally:
        client.context.close()
    result["server_cpu_seconds"] = tree_cpu_seconds(server.pid) - server0
    return result


def _profiled(
    side: str,
    source: Path,
    work: Path,
    server: Any,
    container: str,
    runs: int,
    events: int,
    log: Any,
    runs_in_flight: int = RUNS_IN_FLIGHT,
) -> dict[str, Any]:
    """One untimed drain of `source` under the sampler, request log and counters: per-run breakdown."""
    profiling = Profiling(SIDECAR_PHASES if side == "sidecar" else INPROCESS_PHASES)
    if side == "sidecar":
        result = _drain_sidecar(source, work, server, container, log, runs_in_flight, around=profiling)
    else:
        result = _drain_inprocess(source, server, container, log, around=profiling)
    return profiling.breakdown(runs=runs, events=events, wall_seconds=result["seconds"])


def _subset(source: Path, dest: Path, runs: int) -> Path:
    """A spool holding the first `runs` runs of `source`."""
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "runs").mkdir(parents=True)
    (dest / "quarantine").mkdir()
    dest.chmod(0o700)
    for run_dir in sorted(p for p in (source / "runs").iterdir() if p.is_dir())[:runs]:
        shutil.copytree(run_dir, dest / "runs" / run_dir.name)
    return dest


# ------------------------------------------------------------------ one shape


def measure_shape(
    work: Path,
    servers: dict[str, Any],
    runs: int,
    events: int,
    reps: int,
    log: Callable[[str], None],
    *,
    tiled: str = "sqlite",
    runs_in_flight: int = RUNS_IN_FLIGHT,
    tiled_workers: int = 1,
) -> dict[str, Any]:
    key = shape_key(runs, events, tiled, runs_in_flight, tiled_workers)
    source = work / f"backlog-{key}"
    made = make_backlog(source, runs, events)
    log(f"  {key}: backlog of {runs} runs x {events} events spooled ({made['accept_rate']:,.0f} docs/s)")
    repetitions = []
    for rep in range(reps):
        order = SIDES if rep % 2 == 0 else SIDES[::-1]
        results: dict[str, dict[str, Any]] = {}
        for side in order:
            container = f"{side}-{runs}x{events}-r{rep}"
            log(f"  {key} rep {rep + 1}/{reps}: {side} ...")
            if side == "sidecar":
                results[side] = _drain_sidecar(source, work, servers[side], container, log, runs_in_flight)
            else:
                results[side] = _drain_inprocess(source, servers[side], container, log)
            r = results[side]
            if r["runs_uploaded"] != runs:
                raise RuntimeError(f"{key} {side}: {r['runs_uploaded']} of {runs} runs in Tiled")
            r["runs_per_s"] = runs / r["seconds"]
            r["rows_per_s"] = r["rows"] / r["seconds"]
            log(
                f"  {key} rep {rep + 1}/{reps}: {side} {r['seconds']:.1f} s, {r['runs_per_s']:.2f} runs/s, "
                f"{r['rows_per_s']:,.0f} rows/s, {r['http_requests'] / runs:.1f} requests/run"
            )
        ratio = results["sidecar"]["runs_per_s"] / results["inprocess"]["runs_per_s"]
        log(f"  {key} rep {rep + 1}/{reps}: sidecar / in-process = x{ratio:.2f}")
        repetitions.append({"order": list(order), "results": results, "ratio": ratio})

    def per(k: str, side: str) -> dict[str, Any]:
        return summary([r["results"][side][k] for r in repetitions])

    out: dict[str, Any] = {
        "runs": runs,
        "events": events,
        "tiled": tiled,
        "runs_in_flight": runs_in_flight,
        **({"tiled_workers": tiled_workers} if tiled_workers != 1 else {}),
        "rows": runs * events,
        "runs_per_s": {side: per("runs_per_s", side) for side in SIDES},
        "rows_per_s": {side: per("rows_per_s", side) for side in SIDES},
        "seconds": {side: per("seconds", side) for side in SIDES},
        "client_cpu_seconds": {side: per("cpu_seconds", side) for side in SIDES},
        "server_cpu_seconds": {side: per("server_cpu_seconds", side) for side in SIDES},
        "http_requests_per_run": {
            side: summary([r["results"][side]["http_requests"] / runs for r in repetitions]) for side in SIDES
        },
        "ratio": summary([r["ratio"] for r in repetitions]),
        "repetitions": repetitions,
    }
    if events <= SMALL_EVENTS:
        n = min(runs, PROFILE_RUNS)
        subset = _subset(source, work / f"profile-{runs}x{events}", n)
        out["breakdown"] = {}
        for side in SIDES:
            log(f"  {key}: profiling {side} on {n} runs ...")
            out["breakdown"][side] = _profiled(
                side,
                subset,
                work,
                servers[side],
                f"{side}-profile-{runs}x{events}",
                n,
                events,
                log,
                runs_in_flight,
            )
            b = out["breakdown"][side]
            log(
                f"  {key}: {side} {b['wall_ms_per_run']:.0f} ms/run, "
                f"{b['http']['requests_per_run']:.1f} requests/run ({b['http']['ms_per_run']:.0f} ms)"
            )
        shutil.rmtree(subset, ignore_errors=True)
    shutil.rmtree(source, ignore_errors=True)
    return out


# ------------------------------------------------------------------ memory


def measure_memory(
    work: Path, server: Any, runs: int, events: int, seconds: float, log: Callable[[str], None]
) -> dict[str, Any]:
    """Peak RSS of ``tiled-writer-sidecar replay`` draining a spool of `runs` queued runs."""
    from tiled_writer_sidecar.testing.sidecar import sidecar_command

    spool = work / "queued"
    made = make_backlog(spool, runs, events)
    log(f"  memory: {runs} runs x {events} events queued ({made['accept_rate']:,.0f} docs/s); replay ...")
    uri = _container(server, "queued")
    env = {**os.environ, "TILED_API_KEY": server.api_key, "COLUMNS": "200"}
    cmd = [*sidecar_command(), "replay", "--spool-dir", str(spool), "--tiled-uri", uri]
    samples: list[tuple[float, float]] = []
    hwm = 0.0
    log_path = work / "queued-replay.log"
    t0 = time.monotonic()
    last_log = t0
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            while process.poll() is None and time.monotonic() - t0 < seconds:
                rss = rss_mib(process.pid)
                if rss is not None:
                    samples.append((time.monotonic() - t0, rss))
                    hwm = max(hwm, peak_rss_mib(process.pid) or 0.0)
                if time.monotonic() - last_log > 15:
                    last_log = time.monotonic()
                    log(f"    replay: {last_log - t0:.0f} s, RSS {rss or 0:.0f} MiB, peak {hwm:.0f} MiB")
                time.sleep(0.25)
        finally:
            finished = process.poll() is not None
            if not finished:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    wall = time.monotonic() - t0
    if finished and process.returncode != 0:
        raise RuntimeError(
            f"replay exited with {process.returncode}:\n{log_path.read_text(errors='replace')[-2000:]}"
        )
    uploaded = int(_uploaded_count(spool)().split("/")[0])
    shutil.rmtree(spool, ignore_errors=True)
    peak = max([hwm, *(rss for _, rss in samples)], default=0.0)
    log(f"  memory: peak RSS {peak:.0f} MiB; {uploaded} of {runs} runs uploaded in {wall:.0f} s")
    return {
        "runs_queued": runs,
        "events_per_run": events,
        "seconds_sampled": wall,
        "finished": finished,
        "runs_uploaded": uploaded,
        "peak_rss_mib": peak,
        "rss_samples": samples[:: max(1, len(samples) // 200)],
        "budget_mib": RSS_BUDGET_MIB,
    }


# ------------------------------------------------------------------ the comparison


def run(bench: Bench) -> dict[str, Any]:
    """The comparison under `benchmarks.run`; options from ``bench.shared["small_runs_options"]``."""
    options = bench.shared.get("small_runs_options", {})
    shapes = options.get("shapes")
    if shapes is None:
        shapes = SMOKE_SHAPES if bench.smoke else FULL_SHAPES
    reps = options.get("reps") or min(bench.reps, MAX_REPS)
    memory_runs = options.get("memory_runs")
    if memory_runs is None:
        memory_runs = bench.size(MEMORY_RUNS, 5)
    memory_events = options.get("memory_events") or bench.size(MEMORY_EVENTS, 5)
    memory_seconds = options.get("memory_seconds") or bench.size(MEMORY_SECONDS, 300)  # smoke: all 5
    work = bench.workdir / "small-runs"
    work.mkdir(parents=True, exist_ok=True)
    servers = _servers(bench)
    tiled = "sqlite" if _shared_server(bench) else options.get("tiled") or "sqlite"
    tiled_workers = 1 if _shared_server(bench) else options.get("tiled_workers") or 1
    in_flight = options.get("runs_in_flight") or RUNS_IN_FLIGHT
    results = []
    for runs, events, *own_reps in shapes:
        results.append(
            measure_shape(
                work,
                servers,
                runs,
                events,
                own_reps[0] if own_reps else reps,
                bench.log,
                tiled=tiled,
                runs_in_flight=in_flight,
                tiled_workers=tiled_workers,
            )
        )
    memory = (
        measure_memory(work, servers["sidecar"], memory_runs, memory_events, memory_seconds, bench.log)
        if memory_runs
        else None
    )
    return {
        "shapes": results,
        "memory": memory,
        "options": {
            "shapes": [":".join([shape_key(*shape[:2]), *map(str, shape[2:])]) for shape in shapes],
            "reps": reps,
            "profile_runs": PROFILE_RUNS,
            "tiled": tiled,
            "tiled_workers": tiled_workers,
            "sidecar_settings": _sidecar_settings(in_flight),
            "command": options.get("command", "python -m benchmarks.run --only small_runs"),
        },
        "headline": headline_figures(results, memory),
    }


def headline_figures(shapes: list[dict[str, Any]], memory: dict[str, Any] | None) -> dict[str, Any]:
    """The target is judged on the default Tiled (SQLite) and setting; other shapes are shown beside it."""
    small = [
        s for s in shapes if s["events"] <= SMALL_EVENTS and key_of(s) == shape_key(s["runs"], s["events"])
    ]
    met = bool(small) and all(s["ratio"]["median"] >= 2 for s in small)
    if memory is not None:
        met = met and memory["peak_rss_mib"] <= RSS_BUDGET_MIB
    return {
        "ratio_by_shape": {key_of(s): s["ratio"]["median"] for s in shapes},
        "peak_rss_mib": memory["peak_rss_mib"] if memory else None,
        "target_met": met,
    }


def combined(previous: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new` with the shapes (and memory figure) of `previous` that `new` did not measure again."""
    mine = {key_of(s) for s in new["shapes"]}
    shapes = [s for s in previous["shapes"] if key_of(s) not in mine]
    shapes += new["shapes"]
    shapes.sort(key=lambda s: (s.get("tiled", "sqlite") != "sqlite", s["events"], -s["runs"], key_of(s)))
    memory = new.get("memory") or previous.get("memory")
    commands = [*previous.get("commands", [previous["options"]["command"]]), new["options"]["command"]]
    return {
        **new,
        "shapes": shapes,
        "memory": memory,
        "commands": commands,
        "seconds": (previous.get("seconds") or 0) + (new.get("seconds") or 0),
        "headline": headline_figures(shapes, memory),
    }


# ------------------------------------------------------------------ RESULTS.md


def headline(c: dict[str, Any]) -> str:
    h = c["headline"]
    ratios = ", ".join(f"{k} x{fmt(v)}" for k, v in h["ratio_by_shape"].items())
    memory = c.get("memory")
    rss = (
        f"; uploader peak {fmt(memory['peak_rss_mib'])} MiB with {memory['runs_queued']:,} runs queued"
        if memory
        else ""
    )
    return f"sidecar / in-process runs/s: {ratios}{rss}"


def _label(s: dict[str, Any]) -> str:
    """``200 x 50``, with the Tiled backend and the runs in flight when they are not the default's."""
    extra = [] if s.get("tiled", "sqlite") == "sqlite" else ["PostgreSQL Tiled"]
    workers = s.get("tiled_workers", 1)
    extra += [] if workers == 1 else [f"{workers} Tiled workers"]
    in_flight = s.get("runs_in_flight", RUNS_IN_FLIGHT)
    extra += [] if in_flight == RUNS_IN_FLIGHT else [f"{in_flight} in flight"]
    return f"{s['runs']} x {s['events']:,}" + (f" ({', '.join(extra)})" if extra else "")


def _side_cell(s: dict[str, Any], side: str, key: str) -> str:
    return fmt_summary(s[key][side])


def section(c: dict[str, Any]) -> list[str]:
    rows = []
    for s in c["shapes"]:
        rows.append(
            [
                f"{_label(s)} ({s['ratio']['n']} rep{'s' if s['ratio']['n'] > 1 else ''})",
                _side_cell(s, "sidecar", "runs_per_s"),
                _side_cell(s, "inprocess", "runs_per_s"),
                f"**x{fmt(s['ratio']['median'])}** ({fmt(s['ratio']['min'])}-{fmt(s['ratio']['max'])})",
                _side_cell(s, "sidecar", "rows_per_s"),
                _side_cell(s, "inprocess", "rows_per_s"),
                f"{fmt(s['http_requests_per_run']['sidecar']['median'])} / "
                f"{fmt(s['http_requests_per_run']['inprocess']['median'])}",
                f"{fmt(s['server_cpu_seconds']['sidecar']['median'])} / "
                f"{fmt(s['server_cpu_seconds']['inprocess']['median'])}",
            ]
        )
    opts = c.get("options", {})
    out = [
        "Backlog of N runs x M events spooled first, then drained; in each repetition both sides, "
        "alternating which goes first, each into its own Tiled server (one `tiled serve` process; a shape "
        'labelled "N Tiled workers": uvicorn with N worker processes on tiled\'s `app_factory`, both sides, '
        "the Tiled CPU that of all of them). Re-run every shape: "
        "`python -m benchmarks.small_runs` (or `make bench`); measured here with "
        + "; ".join(
            f"`{cmd}`" for cmd in c.get("commands", [opts.get("command", "python -m benchmarks.small_runs")])
        )
        + ".",
        "",
        _table(
            [
                "runs x events",
                "sidecar runs/s",
                "in-process runs/s",
                "sidecar / in-process",
                "sidecar rows/s",
                "in-process rows/s",
                "HTTP requests/run (sidecar / in-process)",
                "Tiled CPU s (sidecar / in-process)",
            ],
            rows,
        ),
        "",
    ]
    out += _repetition_lines(c)
    for s in c["shapes"]:
        if s.get("breakdown"):
            out += _breakdown_lines(s)
    out += _before_lines()
    memory = c.get("memory")
    if memory:
        out.append(
            f"Memory: `tiled-writer-sidecar replay` with {memory['runs_queued']:,} runs x "
            f"{memory['events_per_run']} events queued: peak RSS **{fmt(memory['peak_rss_mib'])} MiB** "
            f"(budget {fmt(memory['budget_mib'])} MiB) over {fmt(memory['seconds_sampled'])} s, in which "
            f"{memory['runs_uploaded']} runs were uploaded"
            + (" (all)." if memory["finished"] else " (stopped there; the queue stayed long).")
        )
    return out


def _repetition_lines(c: dict[str, Any]) -> list[str]:
    """Each repetition of each shape, both sides side by side (which went first, then the figures)."""
    rows = []
    for s in c["shapes"]:
        for i, rep in enumerate(s.get("repetitions") or []):
            side = rep["results"]
            rows.append(
                [
                    _label(s),
                    f"{i + 1} ({rep['order'][0]} first)",
                    fmt(side["sidecar"]["runs_per_s"]),
                    fmt(side["inprocess"]["runs_per_s"]),
                    f"x{fmt(rep['ratio'])}",
                    fmt(side["sidecar"]["rows_per_s"]),
                    fmt(side["inprocess"]["rows_per_s"]),
                    f"{fmt(side['sidecar']['http_requests'] / max(1, side['sidecar']['runs_uploaded']))} / "
                    f"{fmt(side['inprocess']['http_requests'] / max(1, side['inprocess']['runs_uploaded']))}",
                ]
            )
    if not rows:
        return []
    header = ["runs x events", "repetition", "sidecar runs/s", "in-process runs/s", "sidecar / in-process"]
    header += ["sidecar rows/s", "in-process rows/s", "HTTP requests/run (sidecar / in-process)"]
    return ["Per repetition:", "", _table(header, rows), ""]


#: The figures before issue 24's changes (one closed run in flight, a read-back per stream), kept to
#: compare: the small_runs entry of results.json at that commit.
BEFORE = Path(__file__).with_name("small_runs_before.json")


def _before_lines() -> list[str]:
    """The same tables measured before issue 24's changes, if `BEFORE` is there."""
    if not BEFORE.exists():
        return []
    before = json.loads(BEFORE.read_text())
    rows = [
        [
            f"{s['runs']} x {s['events']:,} ({s['ratio']['n']} rep{'s' if s['ratio']['n'] > 1 else ''})",
            _side_cell(s, "sidecar", "runs_per_s"),
            _side_cell(s, "inprocess", "runs_per_s"),
            f"**x{fmt(s['ratio']['median'])}** ({fmt(s['ratio']['min'])}-{fmt(s['ratio']['max'])})",
            f"{fmt(s['http_requests_per_run']['sidecar']['median'])} / "
            f"{fmt(s['http_requests_per_run']['inprocess']['median'])}",
        ]
        for s in before["shapes"]
    ]
    out = [
        f"**Before** (commit {before.get('commit', '?')}: one closed run in flight, every stream read "
        f"back; load average {before.get('loadavg', {}).get('before', '?')} at the start):",
        "",
        _table(
            [
                "runs x events",
                "sidecar runs/s",
                "in-process runs/s",
                "sidecar / in-process",
                "HTTP requests/run (sidecar / in-process)",
            ],
            rows,
        ),
        "",
    ]
    for s in before["shapes"]:
        if s.get("breakdown"):
            out += ["Before: " + line if i == 0 else line for i, line in enumerate(_breakdown_lines(s))]
    return out


def _breakdown_lines(s: dict[str, Any]) -> list[str]:
    b = s["breakdown"]
    sc, ip = b["sidecar"], b["inprocess"]

    def largest_first(*tables: dict[str, Any], key: str) -> list[str]:
        """Labels of `tables` (results.json sorts keys), the largest `key` of the first table first."""
        out: list[str] = []
        for table in tables:
            out += sorted((k for k in table if k not in out), key=lambda k: -table[k][key])
        return out

    labels = largest_first(sc["phases"], ip["phases"], key="ms_per_run")

    def cell(side: dict[str, Any], label: str) -> str:
        p = side["phases"].get(label)
        if p is None:
            return "-"
        http = f" (HTTP {p['http_ms_per_run']:.1f})" if p["http_ms_per_run"] >= 0.05 else ""
        return f"{p['ms_per_run']:.1f}{http}"

    rows = [[label, cell(sc, label), cell(ip, label)] for label in labels]
    rows.append(
        ["**wall time per run**", f"**{sc['wall_ms_per_run']:.1f}**", f"**{ip['wall_ms_per_run']:.1f}**"]
    )
    req_labels = largest_first(sc["http"]["by_phase"], ip["http"]["by_phase"], key="per_run")

    def req(side: dict[str, Any], label: str) -> str:
        r = side["http"]["by_phase"].get(label)
        return "-" if r is None else f"{r['per_run']:.2f} x {r['mean_ms']:.1f} ms"

    req_rows = [[label, req(sc, label), req(ip, label)] for label in req_labels]
    lat = {k: side["http"]["latency_ms"] for k, side in (("sidecar", sc), ("inprocess", ip))}
    req_rows.append(
        [
            "**all requests** (p50 / p90 / max ms)",
            f"**{sc['http']['requests_per_run']:.2f}** ({fmt(lat['sidecar']['p50'])} / "
            f"{fmt(lat['sidecar']['p90'])} / {fmt(lat['sidecar']['max'])})",
            f"**{ip['http']['requests_per_run']:.2f}** ({fmt(lat['inprocess']['p50'])} / "
            f"{fmt(lat['inprocess']['p90'])} / {fmt(lat['inprocess']['max'])})",
        ]
    )
    req_rows.append(
        [
            "by endpoint (count per run x mean latency)",
            *(
                ", ".join(
                    f"{k} {v['per_run']:.2f} x {v['mean_ms']:.0f} ms"
                    for k, v in side["http"]["by_kind"].items()
                )
                for side in (sc, ip)
            ),
        ]
    )
    counts = list(dict.fromkeys([*sc["counts_per_run"], *ip["counts_per_run"]]))

    def count(side: dict[str, Any], label: str) -> str:
        n = side["counts_per_run"].get(label)
        return "-" if n is None else f"{n:.2f} ({side['counted_ms_per_run'][label]:.1f} ms)"

    timed = {side: 1000 * s["seconds"][side]["median"] / s["runs"] for side in SIDES}
    out = [
        f"Where one run's time goes, {_label(s)} (a drain of {sc['runs']} runs per side, "
        "all threads sampled every ~1 ms; ms per run, of which waiting for an HTTP response, summed over "
        "threads: with several runs in flight the sidecar's phases add up to more than its wall time; "
        "unprofiled, "
        f"the timed drains took {timed['sidecar']:.0f} and {timed['inprocess']:.0f} ms per run):",
        "",
        _table(["phase", "sidecar ms/run", "in-process ms/run"], rows),
        "",
        "HTTP requests per run by the phase that sent them (count x mean latency):",
        "",
        _table(["phase", "sidecar", "in-process"], req_rows),
        "",
        _table(
            ["counted per run (time)", "sidecar", "in-process"],
            [[label, count(sc, label), count(ip, label)] for label in counts],
        ),
        "",
    ]
    if sc.get("unmatched"):
        out += [
            "Sidecar samples in no phase, by innermost function: "
            + ", ".join(f"`{k}` {v}" for k, v in list(sc["unmatched"].items())[:5]),
            "",
        ]
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def analysis(c: dict[str, Any], _all: dict[str, Any]) -> list[str]:
    out = []
    for s in c["shapes"]:
        b = s.get("breakdown")
        if not b:
            continue
        sc, ip = b["sidecar"], b["inprocess"]
        top = sorted(((k, v["ms_per_run"]) for k, v in sc["phases"].items()), key=lambda kv: -kv[1])[:3]
        http_share = 100 * sc["http"]["ms_per_run"] / sc["wall_ms_per_run"] if sc["wall_ms_per_run"] else 0
        out.append(
            f"- {_label(s)}: a sidecar run takes {sc['wall_ms_per_run']:.0f} ms "
            f"({sc['http']['requests_per_run']:.1f} requests, {http_share:.0f}% of the wall time waiting for "
            f"them), an in-process run {ip['wall_ms_per_run']:.0f} ms ({ip['http']['requests_per_run']:.1f} "
            "requests). Largest sidecar phases: " + ", ".join(f"{k} {v:.0f} ms" for k, v in top) + "."
        )
        extra = []
        for label in dict.fromkeys([*sc["http"]["by_phase"], *ip["http"]["by_phase"]]):
            more = sc["http"]["by_phase"].get(label, {}).get("per_run", 0) - ip["http"]["by_phase"].get(
                label, {}
            ).get("per_run", 0)
            if abs(more) >= 0.5:
                extra.append(f"{label} {more:+.1f}")
        if extra:
            out.append("  Requests per run, sidecar minus in-process, by phase: " + ", ".join(extra) + ".")
        counted, counted_ms = sc["counts_per_run"], sc["counted_ms_per_run"]
        if "fsync" in counted:
            writes = "atomic state-file writes"
            out.append(
                f"  State: {counted.get(writes, 0):.1f} atomic state-file writes "
                f"({counted_ms.get(writes, 0):.0f} ms) and {counted['fsync']:.1f} fsyncs "
                f"({counted_ms['fsync']:.0f} ms) per run."
            )
        common = sorted(set(sc["http"]["by_kind"]) & set(ip["http"]["by_kind"]))
        if common:
            out.append(
                "  Same endpoints, mean latency sidecar vs in-process: "
                + ", ".join(
                    f"{k} {sc['http']['by_kind'][k]['mean_ms']:.0f} vs {ip['http']['by_kind'][k]['mean_ms']:.0f} ms"
                    for k in common
                )
                + "."
            )
        cpu = {side: 1000 * s["server_cpu_seconds"][side]["median"] / s["runs"] for side in SIDES}
        out.append(
            f"  Tiled's own CPU per run: sidecar {cpu['sidecar']:.0f} ms, in-process {cpu['inprocess']:.0f} ms "
            f"({sc['http']['requests_per_run']:.1f} and {ip['http']['requests_per_run']:.1f} requests: the sidecar "
            'with close_streams = "auto" sends no close_stream to a Tiled without streaming cache or '
            "webhooks, in-process TiledWriter sends three). Tiled spends about the same CPU on any of these requests (FastAPI's dependency "
            "solving and the node lookup dominate), so its CPU per run follows the request count. With "
            "several runs in flight the sidecar keeps the server busy, and each request waits longer "
            "(above): the drain is bounded by Tiled's CPU per run on a core it shares with the other "
            "processes, not by the sidecar's round trips."
        )
    return out


def closing(c: dict[str, Any]) -> str:
    parts = [
        f"{_label(s)}: sidecar {fmt(s['runs_per_s']['sidecar']['median'])} vs in-process "
        f"{fmt(s['runs_per_s']['inprocess']['median'])} runs/s (x{fmt(s['ratio']['median'])})"
        for s in c["shapes"]
    ]
    memory = c.get("memory")
    rss = (
        f"; uploader peak RSS {fmt(memory['peak_rss_mib'])} MiB with {memory['runs_queued']:,} runs queued"
        if memory
        else ""
    )
    return "- Many small runs: " + "; ".join(parts) + f" (target x2 on small runs){rss}."


# ------------------------------------------------------------------ standalone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.small_runs", description=__doc__.splitlines()[0]
    )
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, 2 repetitions")
    scale.add_argument(
        "--smoke", action="store_true", help="tiny shapes, one repetition (CI; not a measurement)"
    )
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        help="RUNSxEVENTS[:REPS],... (default 200x50,200x200,20x10000)",
    )
    parser.add_argument("--reps", type=int, help="repetitions (default 3; 2 with --quick, 1 with --smoke)")
    parser.add_argument(
        "--tiled",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="both Tiled servers' catalog and tables: SQLite (default) or PostgreSQL",
    )
    parser.add_argument(
        "--tiled-workers",
        type=int,
        default=1,
        help="uvicorn worker processes of each Tiled server (default 1: `tiled serve`); shapes keyed ...*Nw",
    )
    parser.add_argument(
        "--runs-in-flight", type=int, help=f"the sidecar's [tiled] runs_in_flight (default {RUNS_IN_FLIGHT})"
    )
    parser.add_argument(
        "--memory-runs", type=int, help=f"runs queued for the memory figure (default {MEMORY_RUNS}; 0: skip)"
    )
    parser.add_argument(
        "--memory-seconds", type=float, help=f"how long replay drains them (default {MEMORY_SECONDS:.0f})"
    )
    parser.add_argument("--results", type=Path, help="results JSON (default benchmarks/results.json)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--add", action="store_true", help="keep the earlier results' shapes not measured again (and memory)"
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="RESULTS",
        help="measure nothing: merge these results files' entries into --results, as --add does",
    )
    args = parser.parse_args(argv)
    from . import run as bench_run

    if args.merge:
        target = args.results or bench_run.HERE / "results.json"
        for path in args.merge:
            merge_into(target, json.loads(path.read_text())["comparisons"][NAME], add=True)
        bench_run._log(f"merged {len(args.merge)} file(s) into {target} and regenerated RESULTS.md")
        return 0

    reps = args.reps or (1 if args.smoke else 2 if args.quick else 3)
    shapes = QUICK_SHAPES if args.quick and args.shapes is None else args.shapes
    options: dict[str, Any] = {
        "shapes": shapes,
        "memory_runs": args.memory_runs,
        "memory_seconds": args.memory_seconds,
        "reps": reps,
        "tiled": args.tiled,
        "runs_in_flight": args.runs_in_flight,
        "tiled_workers": args.tiled_workers,
        "command": "python -m benchmarks.small_runs "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
    }
    run_argv = ["--only", NAME, "--reps", str(reps)]
    run_argv += ["--smoke"] if args.smoke else []
    run_argv += ["--keep"] if args.keep else []
    if args.smoke and args.results is None:  # benchmarks.run's temporary place: nothing to merge into
        return bench_run.main(run_argv, shared={"small_runs_options": options})
    target = args.results or bench_run.HERE / "results.json"
    with tempfile.TemporaryDirectory(prefix="small-runs-") as tmp:
        fresh = Path(tmp) / "results.json"
        code = bench_run.main([*run_argv, "--results", str(fresh)], shared={"small_runs_options": options})
        entry = json.loads(fresh.read_text())["comparisons"].get(NAME)
    if entry is None:
        return code or 1
    merge_into(target, entry, add=args.add)
    bench_run._log(f"merged into {target} and regenerated {target.with_name('RESULTS.md')}")
    return code


def merge_into(target: Path, entry: dict[str, Any], *, add: bool) -> None:
    """Put `entry` into `target` (other comparisons kept as they are, key order included); RESULTS.md again."""
    from . import report
    from . import run as bench_run

    results = json.loads(target.read_text()) if target.exists() else {"comparisons": {}}
    comparisons = results.setdefault("comparisons", {})
    previous = comparisons.get(NAME)
    if add and previous and previous.get("status") == "ok" and entry.get("status") == "ok":
        entry = combined(previous, entry)
    comparisons[NAME] = rounded(entry)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tmp.replace(target)
    report.write(results, target.with_name("RESULTS.md"), [m.NAME for m in bench_run.COMPARISONS])


if __name__ == "__main__":
    sys.exit(main())
