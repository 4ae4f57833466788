"""`tiled-writer-sidecar demo`: the whole system on this machine, with an outage.

Starts, on 127.0.0.1 with free ports and in a temporary directory: a Tiled
server (SQLite catalog and SQLite tables), bluesky's own `bluesky-0MQ-proxy`,
the sidecar daemon, and a RunEngine with `ophyd.sim` devices publishing
through bluesky's standard `Publisher`, made with `publisher.deep_publisher`
(a deeper send queue, so bursts are not dropped before the proxy). Then:

1. runs a scan and reads it back from Tiled (as the bluesky tutorial does
   with in-process TiledWriter), while a live subscriber (bluesky-tiled-
   plugins' `subscribe_to_streams` on Tiled's streaming endpoint) prints
   each row as Tiled streams it;
2. stops Tiled, runs a second scan (it takes no longer: the RunEngine never
   waits for Tiled) and shows the run waiting in the spool; the subscriber
   pauses;
3. restarts Tiled, waits for the backlog to drain, shows the subscriber
   catching up, and checks both scans row for row against the documents
   the RunEngine emitted.

Tiled's streaming cache is Redis when Debian's ``redis-server`` is
installed (it outlives Tiled's restart: the subscriber resumes where it
was), else Tiled's in-memory cache (lost with Tiled: the subscriber reads
what it missed over HTTP).

Every process it started is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tiled_writer_sidecar.errors import SidecarError


def run_demo(keep: bool = False) -> int:
    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="tiled-writer-sidecar-demo-"))
    try:
        return _demo(console, workdir)
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted; stopping everything the demo started[/]")
        return 130
    except TimeoutError as err:
        raise SidecarError(f"demo failed: {err} (logs kept in {workdir})") from None
    finally:
        if keep:
            console.print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _demo(console: Console, workdir: Path) -> int:
    try:
        import bluesky.plans as bp
        from ophyd.sim import det, motor
    except ImportError as err:
        raise SidecarError(
            f"the demo needs the test extras ({err.name} is missing): pip install 'tiled-writer-sidecar[test]'"
        ) from None

    from tiled_writer_sidecar.publisher import send_queue
    from tiled_writer_sidecar.testing import Acquisition, TiledServer, ZmqProxy
    from tiled_writer_sidecar.testing.acquisition import expected_rows
    from tiled_writer_sidecar.testing.sidecar import SidecarProcess
    from tiled_writer_sidecar.testing.tiled_readback import frame_rows, read_stream
    from tiled_writer_sidecar.testing.tiled_server import LiveSubscriber, RedisServer, redis_server_command

    api_key = secrets.token_hex(16)
    console.rule("[bold]tiled-writer-sidecar demo")
    with contextlib.ExitStack() as stack:
        if redis_server_command() is not None:
            cache = stack.enter_context(RedisServer(workdir / "redis")).uri
        else:
            cache = "memory"
        tiled = stack.enter_context(TiledServer(workdir / "tiled", api_key=api_key, streaming_cache=cache))
        proxy = stack.enter_context(ZmqProxy(log_path=workdir / "proxy.log"))
        sidecar = stack.enter_context(
            SidecarProcess(
                workdir / "sidecar", zmq_address=proxy.out_address, tiled_uri=tiled.uri, api_key=api_key
            )
        )
        acq = stack.enter_context(Acquisition.for_proxy(proxy))
        console.print(f"Tiled server        {tiled.uri}  (SQLite catalog and tables in {tiled.directory})")
        console.print(f"Tiled streaming     cache {cache}")
        console.print(f"bluesky-0MQ-proxy   in {proxy.in_address}  out {proxy.out_address}")
        if acq.publisher is not None:
            console.print(
                f"RunEngine           RE.subscribe(deep_publisher({proxy.in_address!r}))"
                f"  send queue {send_queue(acq.publisher):,} messages"
            )
        console.print(f"sidecar             spool {sidecar.spool_dir}  health {sidecar.health_url}")
        acq.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        sidecar.wait_uploader_connected()
        live = LiveSubscriber(tiled.client(), on_rows=_live_printer(console))
        stack.callback(live.disconnect)

        console.rule("1. A scan, written to Tiled by the sidecar, streamed live to a subscriber")
        (uid1,) = acq.run(bp.scan([det], motor, -5, 5, 10, per_step=_slow_step))  # type: ignore[arg-type]
        up_duration = acq.last_duration
        last_event = time.time()
        sidecar.wait_drained([uid1])
        readable = time.time() - last_event
        live_before = sum(a <= last_event for a in live.arrivals(uid1))
        console.print(f"the live subscriber printed {live_before} of 10 rows while the scan ran")
        client = tiled.client()
        frame = read_stream(client, uid1, "primary")
        _print_frame(console, frame, f"client['{uid1[:8]}…']['primary'].read()")
        console.print(f"scan took {up_duration:.2f} s; readable in Tiled {readable:.2f} s after it ended")

        console.rule("2. Tiled goes down; the next scan does not notice")
        tiled.stop()
        console.print("Tiled stopped. The live subscriber pauses (its connections retry by themselves).")
        (uid2,) = acq.run(bp.scan([det], motor, -5, 5, 10))
        down_duration = acq.last_duration
        console.print(f"scan took {down_duration:.2f} s with Tiled down ({up_duration:.2f} s with Tiled up)")
        for run in sidecar.status()["runs"]:
            if run["uid"] == uid2:
                console.print(
                    f"spool holds run {uid2[:8]}…: state={run['state']} documents={run['documents']}"
                )

        console.rule("3. Tiled is back; the backlog drains by itself, the subscriber catches up")
        started = time.time()
        tiled.start()
        answered = time.time()
        console.print(f"Tiled restarted (answering after {answered - started:.1f} s)")
        sidecar.wait_drained([uid1, uid2], timeout=180)
        console.print(f"backlog drained {time.time() - answered:.1f} s after Tiled answered again")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(live.seq_nums(uid2)) < 10:
            time.sleep(0.1)
        console.print(
            f"the live subscriber caught up: {len(live.seq_nums(uid2))} of 10 rows of run {uid2[:8]}…"
            f" ({live.resyncs.get((uid2, 'primary'), 0)} gaps read over HTTP)"
        )
        client = tiled.client()
        ok = True
        for uid in (uid1, uid2):
            expected = expected_rows(acq.documents, "primary", run_uid=uid)
            got = frame_rows(read_stream(client, uid, "primary"))
            same = got == expected
            ok &= same
            console.print(
                f"run {uid[:8]}…: {len(expected)} events emitted, {len(got)} rows in Tiled, "
                + ("[green]identical row for row[/]" if same else "[red]DIFFERENT[/]")
            )
        console.rule("[green]demo passed" if ok else "[red]demo FAILED")
        return 0 if ok else 1


def _slow_step(detectors: Any, step: Any, pos_cache: Any) -> Any:
    """One scan step, then 0.3 s: slow enough to watch the rows arrive live."""
    import bluesky.plan_stubs as bps

    yield from bps.one_nd_step(detectors, step, pos_cache)
    yield from bps.sleep(0.3)


def _live_printer(console: Console) -> Any:
    """The subscriber's callback: one line per row, with its lag from the event."""

    def on_rows(run_uid: str, stream: str, frame: Any) -> None:
        now = time.time()
        shown = [c for c in frame.columns if c not in ("seq_num", "time") and not str(c).startswith("ts_")]
        for _, row in frame.iterrows():
            values = "  ".join(f"{c}={row[c]:.4f}" for c in shown if isinstance(row[c], float))
            console.print(
                f"  [cyan]live[/] run {run_uid[:8]}… {stream} seq_num={int(row['seq_num'])}  {values}"
                f"  ({now - float(row['time']):.2f} s after the event)"
            )

    return on_rows


def _print_frame(console: Console, frame: Any, title: str) -> None:
    """The table as the tutorial shows it, without the per-key timestamp columns."""
    columns = [c for c in frame.columns if not str(c).startswith("ts_")]
    table = Table(title=title)
    for column in columns:
        table.add_column(str(column), justify="right")
    for row in frame[columns].itertuples(index=False):
        cells = []
        for column, value in zip(columns, row, strict=True):
            if column == "time":
                cells.append(time.strftime("%H:%M:%S", time.localtime(value)) + f"{value % 1:.3f}"[1:])
            elif isinstance(value, float):
                cells.append(f"{value:.4f}")
            else:
                cells.append(str(value))
        table.add_row(*cells)
    console.print(table)
