"""End to end with real processes: RunEngine → Publisher → bluesky-0MQ-proxy → sidecar → Tiled.

Nothing is mocked: a real Tiled server subprocess, bluesky's own proxy, the
`tiled-writer-sidecar run` daemon as a subprocess, and a RunEngine with
`ophyd.sim` devices publishing through bluesky's standard `Publisher`.
Every row in Tiled is compared with the documents the RunEngine emitted.
"""

from __future__ import annotations

import time
from pathlib import Path

import bluesky.plans as bp
import bluesky.preprocessors as bpp
from ophyd.sim import det, det1, det2, motor, motor1

from tests.support.daemon import assert_rows_in_tiled, assert_runs_uploaded, make_sidecar
from tiled_writer_sidecar.testing import Acquisition, TiledContainer, ZmqProxy
from tiled_writer_sidecar.testing.sidecar import SidecarProcess
from tiled_writer_sidecar.testing.tiled_readback import read_stream


def test_count_and_scan_arrive_row_for_row(
    tiled_container: TiledContainer, acquisition: Acquisition, sidecar: SidecarProcess
) -> None:
    """bp.count(50) and bp.scan(20): every event is a row in Tiled with the emitted values."""
    (count_uid,) = acquisition.run(bp.count([det], 50))
    (scan_uid,) = acquisition.run(bp.scan([det], motor, -1, 1, 20))
    assert_runs_uploaded(sidecar, tiled_container, acquisition, [count_uid, scan_uid])
    assert assert_rows_in_tiled(tiled_container, acquisition, count_uid) == 50
    assert assert_rows_in_tiled(tiled_container, acquisition, scan_uid) == 20
    client = tiled_container.client()
    assert client[scan_uid].metadata["stop"]["exit_status"] == "success"
    assert client.values().last().metadata["start"]["uid"] == scan_uid


def test_several_streams_and_runs(
    tiled_container: TiledContainer, acquisition: Acquisition, sidecar: SidecarProcess
) -> None:
    """A run with primary and baseline streams, then a monitored run: every stream's rows arrive."""
    plan = bpp.baseline_wrapper(bp.scan([det1, det2], motor1, 0, 1, 7), [motor, det])
    (uid1,) = acquisition.run(plan)
    (uid2,) = acquisition.run(bp.count([det, det1], 5))
    sidecar.wait_drained([uid1, uid2])
    assert assert_rows_in_tiled(tiled_container, acquisition, uid1, "primary") == 7
    assert assert_rows_in_tiled(tiled_container, acquisition, uid1, "baseline") == 2
    assert assert_rows_in_tiled(tiled_container, acquisition, uid2, "primary") == 5


def test_slow_scan_is_visible_within_a_batch_period(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """batch_seconds flushes rows of a live 5 Hz scan before the run ends (not only at stop)."""
    with make_sidecar(tmp_path, proxy, tiled_container, tiled={"batch_seconds": 0.5}) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        sidecar.wait_uploader_connected()
        seen_live: list[int] = []

        def watch(name: str, doc: dict) -> None:  # type: ignore[type-arg]
            if name == "event" and doc["seq_num"] == 15:
                # Poll Tiled while the run is still going: rows must already be there.
                client = tiled_container.client()
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    try:
                        seen_live.append(len(read_stream(client, doc_uid[0], "primary")))
                    except KeyError:
                        seen_live.append(0)
                    if seen_live[-1] >= 5:
                        break
                    time.sleep(0.1)

        doc_uid: list[str] = []
        acquisition.RE.subscribe(lambda n, d: doc_uid.append(d["uid"]) if n == "start" else None)
        acquisition.RE.subscribe(watch)
        (uid,) = acquisition.run(bp.count([det], 20, delay=0.2))
        assert max(seen_live) >= 5, f"rows visible while the run was live: {seen_live}"
        sidecar.wait_drained([uid])
        assert assert_rows_in_tiled(tiled_container, acquisition, uid) == 20
