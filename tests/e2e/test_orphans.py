"""Orphans are kept (issue 21): a run whose start is lost, then arrives late, through the real daemon.

The documents are composed by event_model (as a RunEngine makes them) and
sent on a real Publisher socket through bluesky's proxy to the
`tiled-writer-sidecar run` daemon, with a real Tiled behind it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import event_model
import httpx

from tests.support.daemon import make_sidecar, rejected_counts
from tests.support.framing import frame
from tiled_writer_sidecar.testing import (
    Acquisition,
    TiledContainer,
    ZmqProxy,
    wait_until,
)
from tiled_writer_sidecar.testing.sidecar import SidecarProcess
from tiled_writer_sidecar.testing.tiled_readback import frame_rows, read_stream

DATA_KEYS: dict[str, Any] = {"det": {"dtype": "number", "shape": [], "source": "SIM:det"}}


def composed(n_events: int) -> list[tuple[str, dict[str, Any]]]:
    bundle = event_model.compose_run()
    desc = bundle.compose_descriptor(name="primary", data_keys=DATA_KEYS)
    docs: list[tuple[str, dict[str, Any]]] = [("start", dict(bundle.start_doc))]
    docs.append(("descriptor", dict(desc.descriptor_doc)))
    for seq in range(1, n_events + 1):
        event = desc.compose_event(data={"det": float(seq)}, timestamps={"det": 0.0}, seq_num=seq)
        docs.append(("event", dict(event)))
    docs.append(("stop", dict(bundle.compose_stop())))
    return docs


def metric(sidecar: SidecarProcess, name: str) -> float:
    text = httpx.get(sidecar.metrics_url, timeout=10).text
    found = re.search(rf"^tiled_writer_sidecar_{name} ([0-9.e+]+)$", text, re.M)
    assert found, name
    return float(found[1])


def test_a_lost_start_keeps_the_run_as_an_orphan_and_a_late_start_completes_it(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """Descriptor, 5 events and stop whose start never came: nothing is rejected, `status --json` lists
    the run as start missing with its 7 documents and 5 events, the metrics count it; it is not uploaded.
    The start then arrives: the run is uploaded complete, its 5 rows in Tiled in order, no orphan left."""
    docs = composed(5)
    uid = docs[0][1]["uid"]
    with make_sidecar(tmp_path, proxy, tiled_container) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        publisher = acquisition.publisher
        assert publisher is not None
        for name, doc in docs[1:]:
            publisher.send_raw(frame(name, doc))

        def listed() -> bool:
            return bool(sidecar.status().get("start_missing"))

        wait_until(listed, 60, what="the orphan to be listed")
        wait_until(lambda: sidecar.status()["start_missing"][0]["documents"] == 7, 30, what="its documents")
        status = sidecar.status()
        (orphan,) = status["start_missing"]
        assert orphan["uid"] == uid and orphan["events"] == {"primary": 5} and orphan["stop_received"]
        assert (
            status["totals"]["start_missing_runs"] == 1 and status["totals"]["start_missing_documents"] == 7
        )
        assert uid not in {r["uid"] for r in status["runs"]}
        assert metric(sidecar, "runs_start_missing") == 1 and metric(sidecar, "orphan_documents_total") == 7
        assert set(rejected_counts(sidecar)) <= {"unknown-document"}  # wait_subscribers' probes only
        assert sum("its start never came" in line for line in sidecar.log_tail(400).splitlines()) == 1

        publisher.send_raw(frame(*docs[0]))
        status = sidecar.wait_drained([uid], timeout=180)
        (run,) = [r for r in status["runs"] if r["uid"] == uid]
        assert run["state"] == "uploaded" and run["problems"] == [], run
        assert run["documents"] == run["uploaded_documents"] == len(docs)
        assert status["start_missing"] == [] and metric(sidecar, "runs_start_missing") == 0
        rows = frame_rows(read_stream(tiled_container.client(), uid, "primary", arrays=False))
        assert [row["det"] for row in rows] == [1.0, 2.0, 3.0, 4.0, 5.0]
