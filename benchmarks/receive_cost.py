"""Cost per run, not per spool (issue 19): the receiver with 50,000 runs already in the spool.

A spool of N runs that sent only a start (closed, not uploaded: the backlog a
flood leaves) is planted file by file; then, in this process, a `Receiver` is
made on it (start-up), the health snapshot is timed (what ``/healthz``,
``/metrics`` and the daemon's STATUS line compute; the daemon does it on the
receiver's main thread every 5 s), and a 20,000-document run is handed to
`Receiver.handle` with `upkeep` every 1,000 messages and a health snapshot
every 5 s of wall time, as the daemon's loop does.

Run: ``python -m benchmarks.receive_cost [N]`` (prints one JSON line). Run it
with ``PYTHONPATH`` pointing at an older ``src`` to compare releases.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import event_model

from tiled_writer_sidecar.config import Config, SpoolConfig, ZmqConfig
from tiled_writer_sidecar.daemon.health import health_snapshot
from tiled_writer_sidecar.receive.counters import ReceiverStats
from tiled_writer_sidecar.receive.receiver import Receiver
from tiled_writer_sidecar.spool.codec import pack_document
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.segment import FsyncPolicy, LogWriter
from tiled_writer_sidecar.spool.state_files import Received
from tiled_writer_sidecar.testing import free_port

DATA_KEYS: dict[str, Any] = {"det": {"dtype": "number", "shape": [], "source": "SIM:det"}}
STATUS_INTERVAL_S = 5.0


def plant(root: Path, runs: int) -> None:
    """`runs` closed start-only runs, each a copy of one real run directory with its own uid."""
    spool = SpoolDir(root)
    start = dict(event_model.compose_run().start_doc)
    template = root / "template"
    writer = LogWriter(template, 2**20, FsyncPolicy("never"))
    writer.append(pack_document("start", start))
    writer.close()
    segment = next(template.glob("*.seg"))
    now = time.time()
    for n in range(runs):
        uid = f"planted-{n:06d}"
        run_dir = spool.run_dir(uid)
        run_dir.mkdir(mode=0o700)
        shutil.copyfile(segment, run_dir / segment.name)
        received = Received(uid=uid, first_received=now - runs + n, last_received=now - runs + n)
        received.documents, received.closed, received.close_reason = 1, True, "no stop"
        (run_dir / "received.json").write_text(json.dumps(received.fields_as_json()))
    shutil.rmtree(template)


def frames(n_documents: int) -> list[list[bytes]]:
    """A run of `n_documents`: start, descriptor, events, stop, framed as bluesky's Publisher does."""
    bundle = event_model.compose_run()
    desc = bundle.compose_descriptor(name="primary", data_keys=DATA_KEYS)
    docs: list[tuple[str, Any]] = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]
    for seq in range(1, n_documents - 2):
        docs.append(("event", desc.compose_event(data={"det": 1.0}, timestamps={"det": 0.0}, seq_num=seq)))
    docs.append(("stop", bundle.compose_stop()))
    return [[b" ".join([b"", name.encode(), pickle.dumps(dict(doc))])] for name, doc in docs]


def measure(runs: int, documents: int = 20_000) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "spool"
        SpoolDir(root)
        plant(root, runs)
        config = Config(
            zmq=ZmqConfig(address=f"tcp://127.0.0.1:{free_port()}"),
            spool=SpoolConfig(dir=str(root), fsync="batch"),
        )
        stats = ReceiverStats()
        t0 = time.perf_counter()
        rx = Receiver(config, SpoolDir(root), stats)
        rx.upkeep()
        startup = time.perf_counter() - t0
        snapshots = []
        for _ in range(3):
            t0 = time.perf_counter()
            health = health_snapshot(stats, rx.spool, time.time())
            snapshots.append(time.perf_counter() - t0)
        assert health.spool.backlog_runs >= runs
        run = frames(documents)
        t0 = last_status = time.perf_counter()
        for n, message in enumerate(run, 1):
            rx.handle(message)
            if n % 1000 == 0:
                rx.upkeep()
                if time.perf_counter() - last_status >= STATUS_INTERVAL_S:
                    last_status = time.perf_counter()
                    health_snapshot(stats, rx.spool, time.time())
        rx.upkeep()
        spool_seconds = time.perf_counter() - t0
        rx.close()
        return {
            "runs_in_spool": runs,
            "startup_seconds": round(startup, 3),
            "health_snapshot_seconds": round(min(snapshots), 4),
            "spool_20000_documents_seconds": round(spool_seconds, 3),
        }


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000)))
