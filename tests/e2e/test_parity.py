"""Parity: the sidecar writes exactly what an in-process TiledWriter writes.

One RunEngine emits each run once; the same documents go to an in-process
`TiledWriter` on one Tiled server and, through the Publisher, the real proxy
and the sidecar daemon, to a second Tiled server. (Two servers, because two
registrations of the same external file in one catalog share its asset and
interfere.) The two trees must be identical: keys, specs, metadata (start,
stop, descriptors, notes), table columns, every row, and the shape of every
array node, including external data registered from legacy Resource/Datum
(ophyd.sim) and StreamResource/StreamDatum (ophyd-async) documents.
"""

from __future__ import annotations

from pathlib import Path

import bluesky.plans as bp
import bluesky.preprocessors as bpp
import pytest
from bluesky_tiled_plugins import TiledWriter
from ophyd.sim import det, motor
from ophyd_async.core import StaticPathProvider, UUIDFilenameProvider, init_devices
from ophyd_async.sim import PatternGenerator, SimBlobDetector

from tiled_writer_sidecar.testing import Acquisition, TiledServer, ZmqProxy
from tiled_writer_sidecar.testing.sidecar import SidecarProcess
from tiled_writer_sidecar.testing.tiled_readback import (
    differences,
    frame_rows,
    read_stream,
    tree_summary,
    without_volatile,
)


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
