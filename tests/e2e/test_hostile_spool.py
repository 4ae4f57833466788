"""Issue 12, the spool's trust boundary, end to end through real processes.

Hostile frames go out on a real bluesky `Publisher` socket into the real
`bluesky-0MQ-proxy`, on to the running `tiled-writer-sidecar run` daemon;
spool files are planted as a local attacker (or a confused admin) would.
Each test fails on the release before spool format v2 and passes after:

- (a) an event whose array bytes embed encoded spool records (a start with
  uid ``../../evil``, an event for an unknown descriptor) is read back as
  the one event it is, also by a restarted daemon, and uploads row for row;
- (b) a symlinked segment, a planted temporary-file symlink and a symlinked
  lock file are never written through (``verify --repair`` included);
- (c) a 60 MiB oversized frame is quarantined as a bounded prefix that
  counts in the spool's size;
- (d) a start whose uid ends in a newline is rejected.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import subprocess
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import event_model
import numpy as np
import pytest

from tiled_writer_sidecar.spool import record
from tiled_writer_sidecar.spool.codec import pack_document
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.segment import FsyncPolicy, LogReader, LogWriter
from tiled_writer_sidecar.spool.state_files import Received
from tiled_writer_sidecar.testing import (
    Acquisition,
    TiledContainer,
    ZmqProxy,
    wait_until,
)
from tiled_writer_sidecar.testing._process import ManagedProcess
from tiled_writer_sidecar.testing.acquisition import Document, expected_rows
from tiled_writer_sidecar.testing.ports import LOCALHOST, free_port
from tiled_writer_sidecar.testing.sidecar import SidecarProcess, sidecar_command
from tiled_writer_sidecar.testing.tiled_readback import frame_rows, read_stream

EVIL_UID = "../../evil"
UNKNOWN_DESCRIPTOR = "no-such-descriptor"


def frame(name: str, doc: Any) -> bytes:
    """One message exactly as bluesky's `Publisher` frames it (empty prefix, pickle)."""
    return b" ".join([b"", name.encode(), pickle.dumps(doc)])


def new_uid() -> str:
    return str(uuid.uuid4())


def v1_record(payload: bytes) -> bytes:
    """A record as the v1 spool format framed it: magic | length | crc(length, payload) | payload."""
    length = len(payload).to_bytes(4, "little")
    return struct.pack("<2sII", b"\xb1\x5d", len(payload), zlib.crc32(payload, zlib.crc32(length))) + payload


def hostile_array(size: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """`size` bytes that embed encoded spool records (v1 and v2 framing) of an injected start with
    uid ../../evil and of an event for a descriptor nobody declared, as a uint8 array."""
    injected = [
        pack_document("start", {"uid": EVIL_UID, "time": 1.0, "scan_id": 666, "plan_name": "evil"}),
        pack_document(
            "event",
            {
                "uid": new_uid(),
                "descriptor": UNKNOWN_DESCRIPTOR,
                "seq_num": 1,
                "time": 1.0,
                "data": {},
                "timestamps": {},
                "filled": {},
            },
        ),
    ]
    unit = b"".join(v1_record(p) + record.encode(p) for p in injected)
    return np.frombuffer((unit * (size // len(unit) + 1))[:size], dtype=np.uint8).copy()


def hostile_run(size: int, events: int) -> list[Document]:
    """A schema-valid run (start, descriptor, `events` events with a hostile `img` array, stop)."""
    bundle = event_model.compose_run(metadata={"plan_name": "hostile-bytes", "scan_id": 12})
    descriptor = bundle.compose_descriptor(
        name="primary",
        data_keys={"img": {"dtype": "array", "shape": [size], "source": "test", "dtype_numpy": "|u1"}},
    )
    docs: list[Document] = [
        ("start", dict(bundle.start_doc)),
        ("descriptor", dict(descriptor.descriptor_doc)),
    ]
    for seq in range(1, events + 1):
        event = descriptor.compose_event(
            data={"img": hostile_array(size)}, timestamps={"img": time.time()}, seq_num=seq
        )
        docs.append(("event", dict(event)))
    docs.append(("stop", dict(bundle.compose_stop(exit_status="success"))))
    return docs


def offline_sidecar(directory: Path, zmq_address: str, **settings: dict[str, Any]) -> SidecarProcess:
    """The real daemon with a Tiled URI nobody answers (spooling needs no Tiled)."""
    return SidecarProcess(
        directory,
        zmq_address=zmq_address,
        tiled_uri=f"http://{LOCALHOST}:{free_port()}",
        api_key=None,
        settings=settings or None,
    )


def records_in(run_dir: Path) -> int:
    return sum(1 for _ in LogReader(run_dir).read()) if run_dir.is_dir() else 0


def send(acquisition: Acquisition, docs: list[Document]) -> None:
    assert acquisition.publisher is not None
    for name, doc in docs:
        acquisition.publisher.send_raw(frame(name, doc))


# -- (a) records embedded in a payload -------------------------------------------


def test_records_embedded_in_an_event_never_surface_even_after_a_restart(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """An open run whose 5 MiB events embed encoded records (start ../../evil, an event for an
    unknown descriptor): the daemon is killed and restarted with the run still open; it starts
    (no KeyError), the run completes and uploads row for row, and nothing else appears anywhere."""
    docs = hostile_run(5 * 2**20, events=2)
    uid = docs[0][1]["uid"]
    directory = tmp_path / "sidecar"
    with SidecarProcess(
        directory,
        zmq_address=proxy.out_address,
        tiled_uri=tiled_container.uri,
        api_key=tiled_container.api_key,
    ) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        send(acquisition, docs[:-1])
        run_dir = sidecar.spool_dir / "runs" / uid
        wait_until(lambda: records_in(run_dir) >= len(docs) - 1, 60, what="the open run on disk")
        sidecar.kill()
    with SidecarProcess(
        directory,
        zmq_address=proxy.out_address,
        tiled_uri=tiled_container.uri,
        api_key=tiled_container.api_key,
    ) as restarted:
        acquisition.wait_subscribers(lambda: restarted.messages_seen() > 0)
        send(acquisition, docs[-1:])
        status = restarted.wait_drained([uid], timeout=180)
        log = restarted.log_tail(100_000)
        assert restarted.process.running
    (run,) = status["runs"]
    assert run["uid"] == uid and run["state"] == "uploaded", run
    assert run["documents"] == run["uploaded_documents"] == len(docs), run
    assert run["problems"] == [] and run["gaps"] == {}, run
    assert "KeyError" not in log and "Traceback" not in log
    assert sorted(p.name for p in (directory / "spool" / "runs").iterdir()) == [uid]
    client = tiled_container.client()
    assert list(client) == [uid]
    rows = frame_rows(read_stream(client, uid, "primary"))
    assert rows == expected_rows(docs, "primary", run_uid=uid)
    assert not list(tmp_path.rglob("evil"))


# -- (b) symlinks ----------------------------------------------------------------


def _open_run_with_symlinked_last_segment(spool_root: Path, victim: Path) -> Path:
    spool = SpoolDir(spool_root)
    uid = new_uid()
    run_dir = spool.run_dir(uid)
    writer = LogWriter(run_dir, 4096, FsyncPolicy("always"))
    writer.append(pack_document("start", {"uid": uid, "time": 1.0}))
    writer.close()
    Received(uid=uid, documents=1).save(run_dir)
    # The victim looks like a segment with a torn tail: what repair and reopen would cut.
    victim.write_bytes(v1_record(b"x" * 100) + v1_record(b"y" * 100)[:50])
    (run_dir / "0000000001.seg").symlink_to(victim)
    return run_dir


def test_verify_repair_and_a_restarted_daemon_never_write_through_a_symlinked_segment(
    proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """`verify --repair` (the CLI) reports the symlinked segment and leaves its target alone; the
    restarted daemon, reopening that open run's log for its next document, starts a new segment
    instead of truncating the target."""
    victim = tmp_path / "victim.seg"
    sidecar = offline_sidecar(tmp_path / "sidecar", proxy.out_address)
    run_dir = _open_run_with_symlinked_last_segment(sidecar.spool_dir, victim)
    before = victim.read_bytes()
    out = subprocess.run(
        [*sidecar_command(), "verify", "--repair", "--spool-dir", str(sidecar.spool_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env=sidecar.env,
    )
    assert victim.read_bytes() == before, out.stdout + out.stderr
    assert out.returncode == 1 and "symlink" in out.stdout, out.stdout + out.stderr
    with sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        assert acquisition.publisher is not None
        descriptor = {
            "uid": new_uid(),
            "run_start": run_dir.name,
            "time": 2.0,
            "data_keys": {},
            "name": "primary",
        }
        acquisition.publisher.send_raw(
            frame("descriptor", descriptor)
        )  # the run's log opens on its next write
        wait_until(lambda: (run_dir / "0000000002.seg").exists(), 60, what="the reopened run's new segment")
        assert sidecar.process.running
    assert victim.read_bytes() == before
    assert (run_dir / "0000000001.seg").is_symlink()


def test_a_planted_temporary_file_symlink_is_never_written_through(
    proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """A symlink planted at the receiver's temporary name for received.json (the previous release
    used ``.received.json.<pid>.tmp``) is not followed: its target is unchanged and received.json
    stays a regular file holding the run."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    docs = hostile_run(16, events=3)
    uid = docs[0][1]["uid"]
    with offline_sidecar(tmp_path / "sidecar", proxy.out_address) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        send(acquisition, docs[:1])
        run_dir = sidecar.spool_dir / "runs" / uid
        wait_until(run_dir.is_dir, 60, what="the run directory")
        assert sidecar.process.pid is not None
        (run_dir / f".received.json.{sidecar.process.pid}.tmp").symlink_to(victim)
        send(acquisition, docs[1:])

        def closed() -> bool:
            runs = {r["uid"]: r for r in sidecar.status()["runs"]}
            return uid in runs and runs[uid]["closed"]

        wait_until(closed, 60, what="the run closed")
        assert sidecar.process.running
    assert victim.read_bytes() == b"precious"
    assert not (run_dir / "received.json").is_symlink()
    loaded = Received.load(run_dir)
    assert loaded is not None and loaded.uid == uid and loaded.documents == len(docs)


@pytest.mark.process
def test_a_symlinked_lock_file_is_refused_and_its_target_kept(tmp_path: Path) -> None:
    """With receiver.lock a symlink, `run` refuses the spool with a one-line reason naming the lock;
    the link's target is neither truncated nor written."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    sidecar = offline_sidecar(tmp_path / "sidecar", f"tcp://{LOCALHOST}:{free_port()}")
    SpoolDir(sidecar.spool_dir)
    (sidecar.spool_dir / "receiver.lock").symlink_to(victim)
    process = ManagedProcess(
        [*sidecar_command(), "run", "--config", str(sidecar.config_path)],
        log_path=tmp_path / "run.log",
        env=sidecar.env,
    )
    process.spawn()
    try:
        wait_until(
            lambda: not process.running or victim.read_bytes() != b"precious",
            90,
            what="`run` to refuse the lock or write through it",
        )
    finally:
        process.terminate()
    assert victim.read_bytes() == b"precious"
    assert process.returncode not in (None, 0)
    log = (tmp_path / "run.log").read_text()
    assert "receiver.lock" in log and "Traceback" not in log, log


# -- (c) the quarantine is bounded by bytes -----------------------------------------


def test_a_60_mib_oversized_frame_is_quarantined_as_a_bounded_prefix_counted_in_the_spool(
    proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """With max_message_bytes = 1 MiB, a 60 MiB frame is rejected as oversized; the quarantine keeps
    a header line (full length, sha256) and its first 64 KiB, and /healthz and `status` count it."""
    with offline_sidecar(
        tmp_path / "sidecar", proxy.out_address, zmq={"max_message_bytes": 2**20}
    ) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        big = frame("event", {"uid": new_uid(), "data": {"x": os.urandom(60 * 2**20)}})
        assert acquisition.publisher is not None
        acquisition.publisher.send_raw(big)
        quarantine = sidecar.spool_dir / "quarantine"

        def kept() -> list[Path]:
            return [p for p in quarantine.iterdir() if "oversized" in p.name]

        (entry,) = wait_until(kept, 90, what="the oversized frame in the quarantine")
        size = entry.stat().st_size
        header, _, prefix = entry.read_bytes().partition(b"\n")
        assert size <= 64 * 2**10 + 256
        assert prefix == big[: len(prefix)] and len(prefix) == 64 * 2**10
        assert f"length={len(big)}".encode() in header
        assert hashlib.sha256(big).hexdigest().encode() in header
        wait_until(lambda: sidecar.health()["spool"]["bytes"] >= size, 30, what="/healthz to count it")
        assert sidecar.status()["totals"]["bytes"] >= size
        assert sidecar.process.running


# -- (d) a uid with a trailing newline ------------------------------------------------


def test_a_start_whose_uid_ends_in_a_newline_is_rejected(
    proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """A start with uid "<uuid>\\n" is rejected (counted, quarantined): no run, no directory."""
    bad = {"uid": new_uid() + "\n", "time": time.time(), "scan_id": 1, "plan_name": "count"}
    with offline_sidecar(tmp_path / "sidecar", proxy.out_address) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        send(acquisition, [("start", bad)])

        def rejected() -> dict[str, int]:
            reasons = dict(sidecar.health()["receiver"]["rejected"])
            reasons.pop("unknown-document", None)  # the readiness probes
            return reasons

        reasons = wait_until(rejected, 60, what="the start to be rejected")
        assert sum(reasons.values()) == 1, reasons
        assert sidecar.status()["runs"] == []
        assert list((sidecar.spool_dir / "runs").iterdir()) == []
        assert sidecar.process.running
