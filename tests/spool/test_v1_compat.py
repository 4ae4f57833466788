"""A spool written by the v1 format (the release before format v2) is read back whole by today's code.

The fixture `data/v1_spool` was written by commit e941586 (`data/make_v1.py`):
four runs with start, descriptor, events holding numpy arrays and scalars, and
a stop; one run left open, one with a torn tail. `data/v1_expected.json`
holds the sha256 of every payload as v1 wrote it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tiled_writer_sidecar.spool.check import verify_spool
from tiled_writer_sidecar.spool.codec import unpack_document
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.segment import (
    FsyncPolicy,
    LogReader,
    LogWriter,
    list_segments,
)

DATA = Path(__file__).parent / "data"
EXPECTED: dict[str, dict[str, Any]] = json.loads((DATA / "v1_expected.json").read_text())


@pytest.fixture
def v1_spool(tmp_path: Path) -> SpoolDir:
    """A private copy of the v1 fixture (git does not keep the 0700 modes the spool requires)."""
    root = tmp_path / "spool"
    shutil.copytree(DATA / "v1_spool", root)
    for directory, _, _ in os.walk(root):
        os.chmod(directory, 0o700)
    return SpoolDir(root)


def _digests(payloads: list[bytes]) -> list[str]:
    return [hashlib.sha256(p).hexdigest() for p in payloads]


@pytest.mark.parametrize("uid", sorted(EXPECTED))
def test_every_v1_record_reads_back_byte_for_byte(v1_spool: SpoolDir, uid: str) -> None:
    """Each run's payloads come back identical and in order, with no damage; documents unpack."""
    reader = LogReader(v1_spool.run_dir(uid))
    payloads = list(reader.read())
    assert _digests(payloads) == EXPECTED[uid]["sha256"]
    assert reader.damage == []
    names = [unpack_document(p)[0] for p in payloads]
    assert names == EXPECTED[uid]["names"]
    tail = reader.unread_tail()
    torn = EXPECTED[uid]["torn_tail"]
    assert (tail.length if tail else 0) == torn


def test_v1_events_keep_their_numpy_values(v1_spool: SpoolDir) -> None:
    """An event read from the v1 spool still holds its float32 array and numpy scalar."""
    payloads = list(LogReader(v1_spool.run_dir("v1-complete-a")).read())
    name, event = unpack_document(payloads[2])
    assert name == "event"
    assert event["data"]["det"].dtype == np.float32 and event["data"]["det"].shape == (4, 5)
    assert isinstance(event["data"]["x"], np.float64) and event["data"]["x"] == 0.5


def test_v1_run_views_load(v1_spool: SpoolDir) -> None:
    """The per-run index files of v1 load: four runs, the open ones still receiving."""
    states = {v.uid: v.state for v in v1_spool.runs()}
    assert states == {
        "v1-complete-a": "pending",
        "v1-complete-b": "pending",
        "v1-open": "receiving",
        "v1-torn": "receiving",
    }


def test_verify_counts_v1_records_and_repairs_the_torn_tail(v1_spool: SpoolDir) -> None:
    """`verify` finds every v1 record and the one torn tail; `--repair` cuts only that tail."""
    reports = verify_spool(v1_spool)
    records = {uid: 0 for uid in EXPECTED}
    for report in reports:
        records[report.run] += report.records
        assert report.corrupt == []
    assert records == {uid: len(e["sha256"]) for uid, e in EXPECTED.items()}
    assert [r.torn_tail for r in reports if r.torn_tail] == [EXPECTED["v1-torn"]["torn_tail"]]
    verify_spool(v1_spool, repair=True)
    after = verify_spool(v1_spool)
    assert all(r.torn_tail == 0 and r.corrupt == [] for r in after)
    reader = LogReader(v1_spool.run_dir("v1-torn"))
    assert _digests(list(reader.read())) == EXPECTED["v1-torn"]["sha256"]
    assert reader.unread_tail() is None


@pytest.mark.parametrize("uid", ["v1-open", "v1-torn"])
def test_a_reopened_v1_run_keeps_its_records_and_takes_new_ones(v1_spool: SpoolDir, uid: str) -> None:
    """A receiver reopening a v1 run (after the upgrade) appends after the old records; all read back."""
    directory = v1_spool.run_dir(uid)
    writer = LogWriter(directory, 4096, FsyncPolicy("always"))
    assert writer.truncated_bytes == EXPECTED[uid]["torn_tail"]
    new = [b"after the upgrade %d" % i * 50 for i in range(40)]
    writer.append_many(new)
    writer.close()
    reader = LogReader(directory)
    payloads = list(reader.read())
    assert _digests(payloads) == EXPECTED[uid]["sha256"] + _digests(new)
    assert reader.damage == [] and reader.unread_tail() is None
    assert len(list_segments(directory)) > EXPECTED[uid]["segments"]
