"""Runs written straight into a spool, bypassing the receiver (and its checks).

`plant_open_run` leaves a run as a killed receiver would (its log and
``received.json``, not closed); `plant_closed_run` a closed run an hour old,
under any directory name and ``received.json`` uid (hostile spool content).
"""

from __future__ import annotations

import time
from pathlib import Path

from tiled_writer_sidecar.spool.codec import pack_document
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.segment import FsyncPolicy, LogWriter
from tiled_writer_sidecar.spool.state_files import Received
from tiled_writer_sidecar.testing.acquisition import Document


def write_log(run_dir: Path, docs: list[Document], fsync: FsyncPolicy | None = None) -> None:
    """`docs` packed into the run's log in `run_dir`, as the receiver writes them."""
    writer = LogWriter(run_dir, 2**20, fsync or FsyncPolicy())
    for name, doc in docs:
        writer.append(pack_document(name, doc))
    writer.close()


def plant_open_run(spool_root: Path, docs: list[Document]) -> str:
    """An open run as a killed receiver leaves it: its log and received.json; returns its uid."""
    uid = docs[0][1]["uid"]
    run_dir = SpoolDir(spool_root).run_dir(uid)
    write_log(run_dir, docs)
    Received(uid=uid, documents=len(docs)).save(run_dir)
    return str(uid)


def plant_closed_run(spool: SpoolDir, directory_name: str, received_uid: str, docs: list[Document]) -> Path:
    """A closed run written straight into the spool (bypassing the receiver's checks), oldest of all."""
    directory = spool.runs_dir / directory_name
    write_log(directory, docs, FsyncPolicy(mode="always"))
    an_hour_ago = time.time() - 3600
    Received(
        uid=received_uid,
        scan_id=1,
        plan_name="planted",
        first_received=an_hour_ago,
        last_received=an_hour_ago,
        documents=len(docs),
        stop_received=True,
        closed=True,
    ).save(directory)
    return directory
