"""Issue 20 (hostile input, round two), the receiver's side, each finding in real processes.

- A ~200 KB pickle nesting 200,000 TUPLE1 made the C unpickler hash a tuple
  200,000 deep (SIGSEGV, exit 139) in the receiver, ``monitor`` and
  ``proxy -v`` (all three use `wire.decode_message`): decoded here in a
  child process, so a crash is a failed test, not a dead pytest worker.
- 246 half-sent requests to ``/metrics`` took every descriptor of a
  receiver (``prlimit``, the unit's ratio): valid runs sent meanwhile were
  rejected as ``schema`` ("cannot be checked (OSError)"), ~700 BrokenPipe
  tracebacks on stderr, an accept loop at 76 % CPU.
- The receiver killed outside systemd left its uploader running, holding
  ``uploader.lock``: the next receiver's uploaders exited "locked" in turn.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import bluesky.plans as bp
import pytest
from ophyd.sim import det, motor

from tests.support.daemon import assert_runs_uploaded, make_sidecar, rejected_counts
from tests.support.spool import plant_open_run
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.testing import (
    Acquisition,
    TiledContainer,
    ZmqProxy,
    wait_until,
)
from tiled_writer_sidecar.testing.acquisition import Document

#: Decodes the frames the parent writes (length-prefixed) and prints each rejection's reason.
_DECODE_EACH = textwrap.dedent(
    """
    import sys
    from tiled_writer_sidecar.errors import DecodeError
    from tiled_writer_sidecar.documents.wire import decode_message
    data = sys.stdin.buffer.read()
    while data:
        size = int.from_bytes(data[:4], "little")
        frame, data = data[4 : 4 + size], data[4 + size :]
        try:
            decode_message([frame])
            print("accepted", flush=True)
        except DecodeError as error:
            print(error.reason, error.detail, flush=True)
    """
)


def decode_in_a_child(frames: list[bytes]) -> tuple[int, list[str]]:
    data = b"".join(len(frame).to_bytes(4, "little") + frame for frame in frames)
    done = subprocess.run(
        [sys.executable, "-c", _DECODE_EACH], input=data, capture_output=True, timeout=300, check=False
    )
    return done.returncode, done.stdout.decode().splitlines()


@pytest.mark.process
def test_the_nested_tuple_pickles_that_crashed_the_decoder_are_too_complex() -> None:
    """The issue's repro (dict key of 200,000 TUPLE1) and its dtype-state variant (the dtype cache
    hashed the sender's state): the decoding process lives on and refuses both, by the scan."""
    state8 = b"(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffN"
    frames = [
        b"x start \x80\x02}N" + b"\x85" * 200_000 + b"Ns.",
        b"x start \x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00f8\x89\x88\x87R"
        + state8
        + b"N"
        + b"\x85" * 200_000
        + b"tb}X\x01\x00\x00\x00k(ds.",
        b"x start \x80\x04}N" + b"\x85\x94" * 200_000 + b"Ns.",
        b"x start \x80\x02}" + b"(" * 200_000 + b"N" + b"t" * 200_000 + b"Ns.",
    ]
    code, lines = decode_in_a_child(frames)
    assert code == 0, (code, lines)
    assert lines == ["too-complex pickle nests deeper than 200"] * len(frames), lines


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _uploader_of(receiver: int) -> int:
    children = Path(f"/proc/{receiver}/task/{receiver}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_the_uploader_dies_with_a_killed_receiver_and_the_next_receiver_runs_its_own(
    tiled_container: TiledContainer, proxy: ZmqProxy, tmp_path: Path
) -> None:
    """SIGKILL of the receiver alone: its uploader exits within seconds (the kernel's parent-death
    signal), so the restarted receiver's uploader takes ``uploader.lock`` and reaches Tiled."""
    sidecar = make_sidecar(tmp_path, proxy, tiled_container)
    lock = sidecar.spool_dir / "uploader.lock"
    with sidecar:
        receiver = sidecar.process.pid
        assert receiver is not None
        orphan = _uploader_of(receiver)
        wait_until(lambda: lock.exists() and lock.read_text().strip() == str(orphan), 120, what="a lock")
        os.kill(receiver, signal.SIGKILL)
        wait_until(lambda: sidecar.process.returncode is not None, 30, what="the receiver reaped")
        wait_until(lambda: _gone(orphan), 30, what=f"the orphaned uploader {orphan} to exit")
        sidecar.start()
        new_receiver = sidecar.process.pid
        assert new_receiver is not None
        uploader = _uploader_of(new_receiver)
        wait_until(lambda: lock.read_text().strip() == str(uploader), 120, what="the new uploader's lock")
        assert not _gone(uploader) and "already running" not in sidecar.log_tail(400)


#: The daemon's descriptors, scaled down from the unit's LimitNOFILE=2048 (max_open_runs 64 + 128).
NOFILE = 256


def _half_sent_requests(port: int, count: int) -> list[socket.socket]:
    """`count` connections to the metrics port, each with a request line and no end of headers."""
    held = []
    for _ in range(count):
        client = socket.socket()
        client.settimeout(0.5)
        with contextlib.suppress(OSError):  # the listen queue is full: the kernel drops the SYN
            client.connect(("127.0.0.1", port))
            client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        held.append(client)
    return held


@pytest.mark.timeout(900)
def test_idle_http_connections_never_cost_the_receiver_a_valid_run(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """400 half-sent requests to /metrics, held open, while 3 runs are sent: the receiver (its
    descriptors limited to 256) spools all of them and uploads them complete, nothing is rejected,
    it serves at most a few connections at once, and its log holds no traceback."""
    sidecar = make_sidecar(tmp_path, proxy, tiled_container, spool={"max_open_runs": 64})
    sidecar.process.argv = ["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--", *sidecar.process.argv]
    with sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        pid = sidecar.process.pid
        assert pid is not None
        baseline = rejected_counts(sidecar)  # the subscription probes: unknown-document
        held = _half_sent_requests(sidecar.metrics_port, 400)
        try:
            fds = len(os.listdir(f"/proc/{pid}/fd"))
            uids = [acquisition.run(bp.scan([det], motor, -1, 1, 3))[0] for _ in range(3)]
            fds = max(fds, len(os.listdir(f"/proc/{pid}/fd")))
            assert fds < NOFILE // 2, fds
            assert_runs_uploaded(sidecar, tiled_container, acquisition, uids, only=True)
        finally:
            for client in held:
                client.close()
        assert rejected_counts(sidecar) == baseline
        assert sidecar.health()["status"] == "ok"  # the endpoint answers again
        log = sidecar.log_tail(100_000)
        assert "Traceback" not in log, log[-3000:]
        assert all(line.count("\n") == 0 for line in log.splitlines() if "metrics client" in line)
        print(f"receiver descriptors at most {fds} of {NOFILE}")


_IMPORT_ONE = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from tiled_writer_sidecar.config import SpoolConfig
    from tiled_writer_sidecar.receive.ingest import Ingest
    from tiled_writer_sidecar.commands.replay import import_file
    from tiled_writer_sidecar.spool.directory import SpoolDir
    from tiled_writer_sidecar.receive.counters import ReceiverStats
    ingest = Ingest(SpoolConfig(), SpoolDir(Path(sys.argv[1])), ReceiverStats())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # tiled, pandas, ... imported
    result = import_file(ingest, Path(sys.argv[2]), 64 * 2**20)
    ingest.shutdown()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "before": before, "documents": result.documents, "skipped": dict(result.skipped)}))
    """
)


@pytest.mark.process
def test_import_backup_reads_with_the_wire_decoders_budget(tmp_path: Path) -> None:
    """A 64 MiB JSON array of ``{}`` (1.93 GB before) and a 60 MiB line of empty lists inside a valid
    start (1.88 GB, and spooled): each skipped as too-complex, the importing process's peak RSS
    grows by less than 256 MiB (the file read whole, an estimate, nothing parsed), and a good entry
    after them is still imported."""
    uid = "0" * 8 + "-0000-4000-8000-" + "0" * 12
    good = b'{"name": "start", "doc": {"uid": "%s", "time": 1.0}}\n' % uid.encode()
    array = tmp_path / "array.json"
    array.write_bytes(b"[" + b"{}," * (64 * 2**20 // 3 - 1) + b"{}]")
    line = tmp_path / "line.jsonl"
    start = b'{"name": "start", "doc": {"uid": "1%s", "time": 1.0, "x": [' % uid[1:].encode()
    line.write_bytes(start + b"[]," * (60 * 2**20 // 3) + b"[]]}}\n" + good)
    for path, documents in ((array, 0), (line, 1)):
        done = subprocess.run(
            [sys.executable, "-c", _IMPORT_ONE, str(tmp_path / f"spool-{path.stem}"), str(path)],
            capture_output=True, timeout=300, check=True,
        )  # fmt: skip
        result = json.loads(done.stdout)
        print(path.name, result)
        assert result["skipped"] == {"too-complex": 1}, result
        assert result["documents"] == documents
        assert result["peak"] - result["before"] < 256 * 2**20, result


_RECOVER_AND_VERIFY = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from tiled_writer_sidecar.config import SpoolConfig
    from tiled_writer_sidecar.receive.ingest import Ingest
    from tiled_writer_sidecar.spool.check import verify_spool
    from tiled_writer_sidecar.spool.directory import SpoolDir
    from tiled_writer_sidecar.spool.segment import LogReader
    from tiled_writer_sidecar.receive.counters import ReceiverStats
    spool = SpoolDir(Path(sys.argv[1]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ingest = Ingest(SpoolConfig(), spool, ReceiverStats())
    closed = ingest.recover()  # what a starting receiver does
    ingest.shutdown()
    reports = verify_spool(spool)
    records = {run.uid: sum(1 for _ in LogReader(run.directory).read()) for run in spool.runs()}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"growth": peak - before, "records": records,
                      "verified": {f"{r.run}/{r.segment}": [r.format, r.records, r.problem] for r in reports}}))
    """
)


@pytest.mark.process
def test_spool_files_that_broke_recovery_are_read_within_bounds(tmp_path: Path) -> None:
    """A 1.5 GiB sparse segment without a v2 header (read whole as v1: receiver 1.63 GB at start-up,
    ``verify`` 1.56 GB) is damage, never read; a segment whose first 40 bytes are zeroed (both file
    header copies) still yields every record (its seed recovered from a record header). Start-up
    recovery and verify together grow the process by less than 64 MiB."""
    spool = tmp_path / "spool"
    runs = {}
    for label in ("sparse", "zeroed"):
        uid = str(uuid.uuid4())
        docs: list[Document] = [("start", {"uid": uid, "time": 1.0})]
        docs += [
            ("descriptor", {"uid": str(uuid.uuid4()), "run_start": uid, "time": 1.0, "data_keys": {}})
        ] * 5
        runs[label] = plant_open_run(spool, docs)
    sparse = SpoolDir(spool).run_dir(runs["sparse"]) / "0000000001.seg"
    with sparse.open("wb") as file:
        file.truncate(3 * 2**29)  # 1.5 GiB of zeros, none of them on disk
    zeroed = SpoolDir(spool).run_dir(runs["zeroed"]) / "0000000000.seg"
    with zeroed.open("r+b") as file:
        file.write(bytes(40))
    done = subprocess.run(
        [sys.executable, "-c", _RECOVER_AND_VERIFY, str(spool)], capture_output=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    result = json.loads(done.stdout)
    print(result)
    assert result["growth"] < 64 * 2**20, result
    assert result["records"][runs["zeroed"]] >= 6, result  # all six, and what closing the run added
    fmt, _, problem = result["verified"][f"{runs['sparse']}/0000000001.seg"]
    assert fmt == "damaged" and problem, result
    fmt, records, problem = result["verified"][f"{runs['zeroed']}/0000000000.seg"]
    assert (fmt, records) == ("v2", 6) and "recovered" in problem, result


def test_a_multipart_message_is_refused_frame_by_frame_and_the_next_one_arrives() -> None:
    """One message of 1,000,000 one-byte frames (bluesky's Publisher sends one frame): the
    Subscription hands over its first frame and an empty one (a frame-count rejection), the rest
    dropped as read, then the next, single-frame message arrives whole."""
    import zmq

    from tiled_writer_sidecar.config import ZmqConfig
    from tiled_writer_sidecar.receive.subscription import Subscription

    context = zmq.Context()
    publisher = context.socket(zmq.XPUB)
    port = publisher.bind_to_random_port("tcp://127.0.0.1")
    subscription = Subscription(ZmqConfig(address=f"tcp://127.0.0.1:{port}"), pace=False)
    try:
        assert publisher.poll(30_000) and publisher.recv() == b"\x01"  # subscribed
        publisher.send_multipart([b"x start {}"] + [b"z"] * 1_000_000)
        publisher.send(b"x start {}")
        received: list[list[bytes]] = []
        wait_until(lambda: subscription.drain(received.append) >= 0 and len(received) >= 2, 60)
        assert received == [[b"x start {}", b""], [b"x start {}"]]
    finally:
        subscription.close()
        publisher.close(linger=0)
        context.term()


def test_libzmq_drops_a_subscription_for_good_on_a_message_over_maxmsgsize() -> None:
    """Why the Subscription never sets ZMQ_MAXMSGSIZE (the receiver's bound is the decoder's): one
    larger message disconnects the SUB socket and libzmq never reconnects it (4.3.5 measured)."""
    import zmq

    context = zmq.Context()
    publisher = context.socket(zmq.XPUB)
    port = publisher.bind_to_random_port("tcp://127.0.0.1")
    subscriber = context.socket(zmq.SUB)
    subscriber.setsockopt(zmq.MAXMSGSIZE, 1000)
    subscriber.setsockopt(zmq.RECONNECT_IVL, 50)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"")
    subscriber.connect(f"tcp://127.0.0.1:{port}")
    try:
        assert publisher.poll(30_000) and publisher.recv() == b"\x01"
        publisher.send(b"small")
        assert subscriber.poll(30_000) and subscriber.recv() == b"small"
        publisher.send(b"x" * 2000)
        received = []
        for _ in range(20):  # 2 s: forty reconnection intervals
            publisher.send(b"after")
            if subscriber.poll(100):
                received.append(subscriber.recv())
        assert received == [], received
    finally:
        subscriber.close(linger=0)
        publisher.close(linger=0)
        context.term()
