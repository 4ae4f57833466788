"""Issues 20 and 21 through the project's proxy, real processes: restarts and a stalled subscriber.

- The sidecar SIGKILLed, or stopped with SIGTERM as ``systemctl restart``
  does, in the middle of a 200 Hz scan and started again a second later:
  the proxy replays what it sent since shortly before the sidecar left
  (`proxy_replay`), the sidecar drops what it already had, and every row
  reaches Tiled with no gap.
- A subscriber stopped with SIGSTOP (a monitor on a laptop that sleeps)
  during a scan: the sidecar gets every row, the proxy switches the stalled
  one to lossy for itself after ``--stall-seconds`` and counts its misses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import numpy as np
import pytest
from ophyd.sim import SynSignal, det

from tests.support.daemon import assert_rows_in_tiled, make_sidecar
from tiled_writer_sidecar.testing import Acquisition, TiledContainer, probe_message, wait_until
from tiled_writer_sidecar.testing.proxy import SidecarProxy, ZmqProxy
from tiled_writer_sidecar.testing.sidecar import SidecarProcess

#: 200 Hz: one event every 5 ms.
PERIOD = 0.005


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[ZmqProxy]:
    """The project's proxy (overrides conftest's bluesky-0MQ-proxy for `acquisition` and `sidecar`)."""
    with ZmqProxy(log_path=tmp_path / "proxy.log") as running:
        yield running


class AtSeq:
    """RunEngine callback: at seq_num `at` of a run, run `action` in a thread (once)."""

    def __init__(self, at: int, action: Any) -> None:
        self.at, self.action = at, action
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "event" and doc["seq_num"] == self.at and self.thread is None:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:
            self.action()
        except BaseException as err:  # noqa: BLE001 - re-raised by join()
            self.error = err

    def join(self) -> None:
        assert self.thread is not None, f"seq_num {self.at} never came"
        self.thread.join(120)
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize("how", ["kill", "term"])
def test_a_sidecar_restarted_mid_scan_loses_nothing_through_the_projects_proxy(
    how: str, proxy: SidecarProxy, acquisition: Acquisition, tiled_container: TiledContainer, tmp_path: Path
) -> None:
    """SIGKILL or SIGTERM of the sidecar at event 200 of a 200 Hz scan, started again 1 s later: the
    run in Tiled has every row the RunEngine emitted, no gap, and the proxy counted a replay."""
    sidecar = make_sidecar(tmp_path, proxy, tiled_container)

    def restart() -> None:
        if how == "kill":
            sidecar.kill()
        else:
            sidecar.terminate()
        time.sleep(1.0)  # "restarted a second later": part of the fault, not a wait
        sidecar.start()

    with sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        fault = AtSeq(200, restart)
        token = acquisition.subscribe(fault)
        (uid,) = acquisition.run(bp.count([det], 1000, delay=PERIOD))
        acquisition.unsubscribe(token)
        fault.join()
        emitted = len(acquisition.documents)
        run = wait_until(
            lambda: spooled(sidecar, uid, emitted), 120, what="every document of the run spooled"
        )
        sidecar.wait_drained([uid], timeout=180)
        final = [r for r in sidecar.status()["runs"] if r["uid"] == uid][0]
        from tiled_writer_sidecar.testing import frame_rows, read_stream
        rows = len(frame_rows(read_stream(tiled_container.client(), uid, "primary")))
        print(f"\nBLUESKY {how}: emitted {emitted} docs (1000 events); Tiled rows {rows}; gaps reported {final['gaps']}; state {final['state']}", flush=True)

