"""`tiled-writer-sidecar demo`: the whole system on this machine, with an outage.

Starts, on 127.0.0.1 with free ports and in a temporary directory: a Tiled
server (SQLite catalog and SQLite tables), bluesky's own `bluesky-0MQ-proxy`,
the sidecar daemon, and a RunEngine with `ophyd.sim` devices publishing
through bluesky's standard `Publisher`. Then:

1. runs a scan and reads it back from Tiled (as the bluesky tutorial does
   with in-process TiledWriter);
2. stops Tiled, runs a second scan (it takes no longer: the RunEngine never
   waits for Tiled) and shows the run waiting in the spool;
3. restarts Tiled, waits for the backlog to drain, and checks both scans
   row for row against the documents the RunEngine emitted.

Every process it started is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .errors import SidecarError


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

    from .testing import Acquisition, TiledServer, ZmqProxy
    from .testing.acquisition import expected_rows
    from .testing.sidecar import SidecarProcess
    from .testing.tiled_readback import frame_rows, read_stream

    api_key = secrets.token_hex(16)
    console.rule("[bold]tiled-writer-sidecar demo")
    with (
        TiledServer(workdir / "tiled", api_key=api_key) as tiled,
        ZmqProxy(log_path=workdir / "proxy.log") as proxy,
        SidecarProcess(
            workdir / "sidecar", zmq_address=proxy.out_address, tiled_uri=tiled.uri, api_key=api_key
        ) as sidecar,
        Acquisition.for_proxy(proxy) as acq,
    ):
        console.print(f"Tiled server        {tiled.uri}  (SQLite catalog and tables in {tiled.directory})")
        console.print(f"bluesky-0MQ-proxy   in {proxy.in_address}  out {proxy.out_address}")
        console.print(f"sidecar             spool {sidecar.spool_dir}  health {sidecar.health_url}")
        acq.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        sidecar.wait_uploader_connected()

        console.rule("1. A scan, written to Tiled by the sidecar")
        (uid1,) = acq.run(bp.scan([det], motor, -5, 5, 10))
        up_duration = acq.last_duration
        last_event = time.time()
        sidecar.wait_drained([uid1])
        readable = time.time() - last_event
        client = tiled.client()
        frame = read_stream(client, uid1, "primary")
        _print_frame(console, frame, f"client['{uid1[:8]}…']['primary'].read()")
        console.print(f"scan took {up_duration:.2f} s; readable in Tiled {readable:.2f} s after it ended")

        console.rule("2. Tiled goes down; the next scan does not notice")
        tiled.stop()
        console.print("Tiled stopped.")
        (uid2,) = acq.run(bp.scan([det], motor, -5, 5, 10))
        down_duration = acq.last_duration
        console.print(f"scan took {down_duration:.2f} s with Tiled down ({up_duration:.2f} s with Tiled up)")
        for run in sidecar.status()["runs"]:
            if run["uid"] == uid2:
                console.print(
                    f"spool holds run {uid2[:8]}…: state={run['state']} documents={run['documents']}"
                )

        console.rule("3. Tiled is back; the backlog drains by itself")
        started = time.time()
        tiled.start()
        answered = time.time()
        console.print(f"Tiled restarted (answering after {answered - started:.1f} s)")
        sidecar.wait_drained([uid1, uid2], timeout=180)
        console.print(f"backlog drained {time.time() - answered:.1f} s after Tiled answered again")
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
