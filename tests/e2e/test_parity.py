"""Parity: the sidecar writes exactly what an in-process TiledWriter writes.

One RunEngine emits each run once; the same documents go to an in-process
`TiledWriter` on one Tiled server and, through the Publisher, the real proxy
and the sidecar daemon, to a second Tiled server. (Two servers, because two
registrations of the same external file in one catalog share its asset and
interfere.) The two trees must be identical: keys, specs, metadata (start,
stop, descriptors, notes), table columns, every row, and the shape of every
array node, including external data registered from legacy Resource/Datum
(ophyd.sim) and StreamResource/StreamDatum (ophyd-async) documents.

Runs at the edges of TiledWriter's layout go through the sidecar's pipeline
(`TiledRun`, fed as the uploader feeds a run being acquired) into a
container of the session's Tiled: a descriptor split above 1024 columns
(1,100 keys, identical to in-process TiledWriter; 10,000 keys) and hundreds
of streams in one run are written once, without a retried append, and read
back stream by stream as the uploader verifies them.
"""

from __future__ import annotations

import copy
import time
import uuid
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import bluesky.preprocessors as bpp
import pytest
from bluesky_tiled_plugins import TiledWriter
from ophyd.sim import det, motor
from ophyd_async.core import StaticPathProvider, UUIDFilenameProvider, init_devices
from ophyd_async.sim import PatternGenerator, SimBlobDetector

from tiled_writer_sidecar.testing import (
    Acquisition,
    TiledContainer,
    TiledServer,
    ZmqProxy,
)
from tiled_writer_sidecar.testing.sidecar import SidecarProcess
from tiled_writer_sidecar.testing.tiled_readback import (
    differences,
    frame_rows,
    read_stream,
    tree_summary,
    without_volatile,
)
from tiled_writer_sidecar.upload.run_writer import TiledRun
from tiled_writer_sidecar.upload.tiled_calls import read_seq_nums


@pytest.fixture
def blob_detector(tmp_path: Path, acquisition: Acquisition) -> SimBlobDetector:
    provider = StaticPathProvider(UUIDFilenameProvider(), tmp_path / "blobs")
    (tmp_path / "blobs").mkdir()
    with init_devices(set_name=False):
        blob = SimBlobDetector(provider, PatternGenerator(), name="blob")
    return blob


def test_sidecar_tree_equals_in_process_tiled_writer(
    tiled_server: TiledServer,
    shared_tiled_server: TiledServer,
    proxy: ZmqProxy,
    acquisition: Acquisition,
    blob_detector: SimBlobDetector,
    tmp_path: Path,
) -> None:
    """Scalar, baseline, legacy external (Resource/Datum) and StreamResource runs: identical trees."""
    from ophyd.sim import img

    inprocess = shared_tiled_server.client().create_container(tmp_path.name)
    acquisition.RE.subscribe(TiledWriter(inprocess))
    tiled_server.client().create_container("beamline")
    with SidecarProcess(
        tmp_path / "sidecar",
        zmq_address=proxy.out_address,
        tiled_uri=f"{tiled_server.uri}/api/v1/metadata/beamline",
        api_key=tiled_server.api_key,
    ) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        uids = []
        uids += acquisition.run(bpp.baseline_wrapper(bp.scan([det], motor, -1, 1, 12), [motor]))
        uids += acquisition.run(bp.count([img], 3))
        uids += acquisition.run(bp.count([blob_detector], 4))
        sidecar.wait_drained(uids)
    sidecar_root = tiled_server.client()["beamline"]
    inprocess_root = shared_tiled_server.client()[tmp_path.name]
    for uid in uids:
        ours = tree_summary(sidecar_root, uid)
        theirs = tree_summary(inprocess_root, uid)
        assert differences(without_volatile(ours), without_volatile(theirs)) == [], uid
        for stream in theirs["streams"]:
            if theirs["streams"][stream]["columns"]:
                assert frame_rows(read_stream(sidecar_root, uid, stream, arrays=False)) == frame_rows(
                    read_stream(inprocess_root, uid, stream, arrays=False)
                )
    # The external-data runs really registered array nodes (not just empty tables).
    assert tree_summary(sidecar_root, uids[1])["streams"]["primary"]["arrays"]["img"]["shape"] == [3, 10, 10]
    assert tree_summary(sidecar_root, uids[2])["streams"]["primary"]["arrays"]


# -- wide descriptors and many streams (issue 19), through the sidecar's TiledWriter pipeline -----------


class NoRetry:
    """A `RetryPolicy` that fails the test: every append must land at the first attempt."""

    def wait(self, err: Exception) -> None:
        raise AssertionError(f"an append was retried: {err}")

    def recovered(self) -> None:
        raise AssertionError("an append was retried")


def wide_run(keys: int, events: int, streams: int = 1) -> list[tuple[str, dict[str, Any]]]:
    """start, `streams` descriptors of `keys` scalar data keys each, `events` events per stream, stop."""
    uid, t0 = str(uuid.uuid4()), time.time()
    docs: list[tuple[str, dict[str, Any]]] = [("start", {"uid": uid, "time": t0, "scan_id": 1})]
    names = [f"s{i:04d}" for i in range(streams)] if streams > 1 else ["primary"]
    data_keys = {f"k{k:05d}": {"dtype": "number", "shape": [], "source": "SIM:k"} for k in range(keys)}
    for name in names:
        desc = str(uuid.uuid4())
        docs.append(
            (
                "descriptor",
                {
                    "uid": desc,
                    "run_start": uid,
                    "time": t0,
                    "name": name,
                    "data_keys": data_keys,
                    "object_keys": {"dev": list(data_keys)},
                    "configuration": {},
                    "hints": {},
                },
            )
        )
        for seq in range(1, events + 1):
            data = {key: float(seq * i) for i, key in enumerate(data_keys)}
            event = {"uid": str(uuid.uuid4()), "descriptor": desc, "time": t0 + seq, "seq_num": seq}
            docs.append(
                ("event", {**event, "data": data, "timestamps": dict.fromkeys(data, t0), "filled": {}})
            )
    stop = {"uid": str(uuid.uuid4()), "run_start": uid, "time": t0 + 9, "exit_status": "success"}
    docs.append(("stop", {**stop, "num_events": dict.fromkeys(names, events)}))
    return docs


def write_live(root: Any, docs: list[tuple[str, dict[str, Any]]]) -> TiledRun:
    """Feed `docs` to the sidecar's pipeline as the uploader does for a run being acquired."""
    run = TiledRun(root, 10_000, NoRetry())
    for name, doc in docs:
        run.feed(name, copy.deepcopy(doc))
        if run.ready_to_flush(caught_up=True):
            run.flush()
    return run


@pytest.mark.timeout(900)  # 10,000 keys: TiledWriter's normalizer is O(keys^2) per event (upstream.md)
def test_a_descriptor_split_above_1024_columns_is_written_once_and_reads_back(
    tiled_container: TiledContainer, tmp_path: Path
) -> None:
    """1,100 keys: same tree and rows as in-process TiledWriter, seq_num read back from the part
    holding it; 10,000 keys (one event, lean): every part written, read back, no retry."""
    ours = tiled_container.client()
    theirs = tiled_container.server.client().create_container(f"{tmp_path.name}-inprocess")
    docs = wide_run(1100, 3)
    uid = docs[0][1]["uid"]
    write_live(ours, docs)
    writer = TiledWriter(theirs)
    for name, doc in docs:
        writer(name, copy.deepcopy(doc))
    assert sorted(ours[uid]["primary"].base) == ["internal_0", "internal_1", "internal_2"]
    assert (
        differences(without_volatile(tree_summary(ours, uid)), without_volatile(tree_summary(theirs, uid)))
        == []
    )
    assert frame_rows(read_stream(ours, uid, arrays=False)) == frame_rows(
        read_stream(theirs, uid, arrays=False)
    )
    assert read_seq_nums(ours, uid, "primary") == [1, 2, 3]

    docs = wide_run(10_000, 1)
    uid = docs[0][1]["uid"]
    write_live(ours, docs)
    assert len(list(ours[uid]["primary"].base)) == 20
    assert read_seq_nums(ours, uid, "primary") == [1]
    summary = tree_summary(ours, uid)["streams"]["primary"]
    assert len(summary["columns"]) == 2 * 10_000 + 2 and summary["rows"] == 1


#: Streams in one run, the issue's case. Its cost is Tiled's (about 5 requests per stream, as in-process
#: TiledWriter, plus one read-back), linear: 222 s on an idle 2-core machine.
MANY_STREAMS = 1000


@pytest.mark.timeout(1800)
def test_a_run_with_many_streams_is_written_once_and_every_stream_reads_back(
    tiled_container: TiledContainer,
) -> None:
    """Hundreds of descriptors, one event each: every stream's table holds its row, no retry, no rewrite."""
    root = tiled_container.client()
    docs = wide_run(1, 1, streams=MANY_STREAMS)
    uid = docs[0][1]["uid"]
    write_live(root, docs)
    assert len(list(root[uid])) == MANY_STREAMS
    assert all(read_seq_nums(root, uid, f"s{i:04d}") == [1] for i in range(MANY_STREAMS))
