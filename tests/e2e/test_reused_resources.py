"""Claims belong to open runs: bluesky-tiled-plugins' own example runs, each sent twice in a row.

Its test document sets (tests/e2e/data/bluesky_tiled_plugins_examples, see the
README there) reuse ``stream_resource`` / ``resource`` uids such as
``det-key2-uid`` in every run. Each set is rendered twice (new run and
descriptor uids, the same resource uids, as its tests do) and the two runs
are sent one after the other through the real proxy and the sidecar daemon
to one Tiled server, and written by an in-process `TiledWriter` to another
(two servers: two registrations of one external file in one catalog share
its asset). Every run's tree must be identical.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import tifffile
from bluesky_tiled_plugins import TiledWriter

from tests.support.daemon import make_sidecar
from tests.support.framing import frame
from tiled_writer_sidecar.testing import (
    Acquisition,
    TiledContainer,
    TiledServer,
    ZmqProxy,
    wait_until,
)
from tiled_writer_sidecar.testing.tiled_readback import differences, tree_summary, without_volatile

EXAMPLES = Path(__file__).parent / "data" / "bluesky_tiled_plugins_examples"
SETS = sorted(path.stem for path in EXAMPLES.glob("*.json"))
#: Sets in-process TiledWriter cannot write either, and why (so there is nothing to compare with).
IN_PROCESS_FAILS = {
    "internal_events": "its two descriptors are both named 'primary': Tiled answers 500 to the second",
}
Document = tuple[str, dict[str, Any]]


def external_assets(directory: Path) -> str:
    """The files the example sets name, as bluesky-tiled-plugins' ``external_assets_folder`` makes them."""
    rng = np.random.default_rng(12345)
    directory.mkdir()
    with h5py.File(directory / "dataset.h5", "w") as file:
        group = file.create_group("entry").create_group("data")
        group.create_dataset("data_1", data=rng.random(size=(3,), dtype="float64"))
        group.create_dataset("data_2", data=rng.integers(-10, 10, size=(3, 13, 17)), dtype="<i8")
    with h5py.File(directory / "dataset_part2.h5", "w") as file:
        group = file.create_group("entry").create_group("data")
        group.create_dataset("data_2", data=rng.integers(-10, 10, size=(5, 13, 17)), dtype="<i8")
    (directory / "tiff_files").mkdir()
    for i in range(3):
        tifffile.imwrite(
            directory / "tiff_files" / f"img_{i:05}.tif", rng.integers(0, 255, (1, 10, 15), "uint8")
        )
    return str(directory.absolute())


def render(name: str, root_path: str) -> list[Document]:
    """One run of an example set, as its ``render_templated_documents`` renders it (a fresh uuid)."""
    text = (EXAMPLES / f"{name}.json").read_text()
    text = text.replace("{{ uuid }}", str(uuid.uuid4())[:-12]).replace("{{ root_path }}", root_path)
    return [(item["name"], item["doc"]) for item in json.loads(text)]


@pytest.mark.timeout(600)
def test_example_runs_sent_twice_with_the_same_resource_uids_equal_in_process_tiled_writer(
    tiled_server: TiledServer,
    shared_tiled_server: TiledServer,
    proxy: ZmqProxy,
    acquisition: Acquisition,
    tmp_path: Path,
) -> None:
    """Every example set, two runs each with the same resource uids: no message is rejected (no
    resource-claimed), every run is uploaded complete, and each tree equals in-process TiledWriter's."""
    assert len(SETS) == 5, SETS
    root_path = external_assets(tmp_path / "assets")
    inprocess = shared_tiled_server.client().create_container(tmp_path.name)
    writer = TiledWriter(inprocess)
    names, runs, failed = [], [], set()
    for name in SETS:
        for _ in range(2):
            run = render(name, root_path)
            try:
                for kind, doc in run:
                    writer(kind, json.loads(json.dumps(doc)))
            except Exception:  # noqa: BLE001  # compared below with the sets known to fail
                failed.add(name)
                continue
            names.append(name)
            runs.append(run)
    assert failed == set(IN_PROCESS_FAILS), "in-process TiledWriter failed on other sets than known"
    target = TiledContainer(tiled_server, "beamline")
    with make_sidecar(tmp_path, proxy, target) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        assert acquisition.publisher is not None
        for run in runs:
            seen = sidecar.messages_seen()
            for name, doc in run:
                acquisition.publisher.send_raw(frame(name, doc))
            arrived = seen + len(run)
            wait_until(lambda a=arrived: sidecar.messages_seen() >= a, 60, what="the run to arrive")
        uids = [run[0][1]["uid"] for run in runs]
        status = sidecar.wait_drained(uids, timeout=300)
        assert set(sidecar.health()["receiver"]["rejected"]) <= {"unknown-document"}  # probes only
    states = {r["uid"]: r for r in status["runs"]}
    ours_root = target.client()
    for name, run in zip(names, runs, strict=True):
        uid = run[0][1]["uid"]
        assert states[uid]["state"] == "uploaded", (name, states[uid])
        assert states[uid]["documents"] == states[uid]["uploaded_documents"] == len(run), (name, states[uid])
        ours = without_volatile(tree_summary(ours_root, uid))
        theirs = without_volatile(tree_summary(inprocess, uid))
        assert differences(ours, theirs) == [], name
