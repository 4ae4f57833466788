"""The uploader's run index: a big spool is indexed in bounded chunks, oldest and newest first.

A real spool in tmp_path (received.json files as the receiver writes them);
the run directories' mtimes are set explicitly, so the order is the test's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.state_files import Received
from tiled_writer_sidecar.upload import run_index
from tiled_writer_sidecar.upload.run_index import RunIndex


def _plant(spool: SpoolDir, uid: str, *, closed: bool, first_received: float, mtime: int) -> None:
    directory = spool.runs_dir / uid
    directory.mkdir(parents=True)
    received = Received(uid=uid, closed=closed, stop_received=closed, first_received=first_received)
    (directory / "received.json").write_text(json.dumps(received.fields_as_json()))
    os.utime(directory, ns=(mtime, mtime))


@pytest.fixture
def spool(tmp_path: Path) -> SpoolDir:
    spool = SpoolDir(tmp_path / "spool")
    spool.runs_dir.mkdir(parents=True, exist_ok=True)
    return spool


def test_a_big_spool_is_indexed_in_chunks_oldest_first_with_the_newest_open_run_at_once(
    spool: SpoolDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 closed runs and, written last, one open run: with a chunk of 10 names per refresh, the first
    refresh reads 10 files (not 201), finds the open run (newest end) and the oldest closed runs (oldest
    end), which are taken oldest first; 20 more refreshes index the rest, and every run is taken once."""
    monkeypatch.setattr(run_index, "INDEX_MIN", 10)
    monkeypatch.setattr(run_index, "INDEX_BUDGET_S", 0.0)
    monkeypatch.setattr(run_index, "LISTING_INTERVAL_S", 0.0)
    closed = [f"closed-{n:03d}" for n in range(200)]
    for n, uid in enumerate(reversed(closed)):  # listed in no useful order: the mtime decides
        _plant(spool, uid, closed=True, first_received=1000.0 + 199 - n, mtime=10**9 * (1000 + 199 - n))
    _plant(spool, "live", closed=False, first_received=5000.0, mtime=10**9 * 5000)
    loads = []
    real_load = RunIndex.load
    monkeypatch.setattr(RunIndex, "load", lambda self, uid: loads.append(uid) or real_load(self, uid))
    index = RunIndex(spool)

    index.refresh()

    assert len(loads) == 10 and len(index.unindexed) == 191 and index.indexing
    assert [view.directory.name for view in index.live()] == ["live"]
    assert index.next_closed().directory.name == "closed-000"  # type: ignore[union-attr]
    assert index.next_closed().directory.name == "closed-001"  # type: ignore[union-attr]
    assert index.waiting() == len(index.closed) + 191 and index.work_left()
    taken = ["closed-000", "closed-001"]
    for _ in range(30):
        index.refresh()
        view = index.next_closed()
        if view is not None:
            taken.append(view.directory.name)
    while (view := index.next_closed()) is not None:
        taken.append(view.directory.name)
    assert not index.indexing and taken == closed  # every closed run once, oldest first


def test_names_pruned_before_they_are_indexed_are_never_read(
    spool: SpoolDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run directory removed while its name waits in the queue is dropped, not read (nor logged)."""
    monkeypatch.setattr(run_index, "INDEX_MIN", 2)
    monkeypatch.setattr(run_index, "INDEX_BUDGET_S", 0.0)
    monkeypatch.setattr(run_index, "LISTING_INTERVAL_S", 0.0)
    monkeypatch.setattr(run_index, "FULL_LISTING_S", 0.0)
    for n in range(6):
        _plant(spool, f"run-{n}", closed=True, first_received=float(n), mtime=10**9 * (n + 1))
    index = RunIndex(spool)
    index.refresh()  # run-0 (oldest) and run-5 (newest)
    (spool.runs_dir / "run-1" / "received.json").unlink()
    (spool.runs_dir / "run-1").rmdir()
    while index.indexing:
        index.refresh()
    taken = []
    while (view := index.next_closed()) is not None:
        taken.append(view.directory.name)
    assert taken == ["run-0", "run-2", "run-3", "run-4", "run-5"] and "run-1" not in index.done


def test_a_run_listed_before_its_received_json_is_written_is_indexed_once_it_is(
    spool: SpoolDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiver makes a run's directory (its log) before writing received.json: a listing in between
    must not forget the run (it was left in no lane, never uploaded, while its directory's name was known)."""
    monkeypatch.setattr(run_index, "LISTING_INTERVAL_S", 0.0)
    monkeypatch.setattr(run_index, "FULL_LISTING_S", 0.0)
    (spool.runs_dir / "new-run").mkdir()
    index = RunIndex(spool)
    index.refresh()
    assert index.next_closed() is None and not index.open
    received = Received(uid="new-run", closed=True, stop_received=True, first_received=1.0)
    (spool.runs_dir / "new-run" / "received.json").write_text(json.dumps(received.fields_as_json()))
    index.refresh()
    view = index.next_closed()
    assert view is not None and view.directory.name == "new-run"
