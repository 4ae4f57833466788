"""Receiver in process: containment, bounded open runs, start-up from any spool.

Messages are framed exactly as bluesky's `Publisher` frames them and handed
to `Receiver.handle`; the receiver's socket points at a free port nobody
publishes on; the spool is real (tmp_path).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import event_model
import numpy as np
import pytest

from tests.support.spool import plant_open_run
from tiled_writer_sidecar.config import Config, SpoolConfig, ZmqConfig
from tiled_writer_sidecar.errors import RejectedMessage
from tiled_writer_sidecar.receive.counters import ReceiverStats
from tiled_writer_sidecar.receive.receiver import Receiver
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.segment import FsyncPolicy, LogWriter
from tiled_writer_sidecar.spool.state_files import Received
from tiled_writer_sidecar.testing import free_port

DATA_KEYS: dict[str, Any] = {"det": {"dtype": "number", "shape": [], "source": "SIM:det"}}


def frame(name: str, doc: Any) -> list[bytes]:
    return [b" ".join([b"", name.encode(), pickle.dumps(doc)])]


def composed(n_events: int, **metadata: Any) -> list[tuple[str, dict[str, Any]]]:
    """A whole run as a RunEngine would emit it: start, descriptor, events, stop."""
    bundle = event_model.compose_run(metadata=metadata or None)
    desc = bundle.compose_descriptor(name="primary", data_keys=DATA_KEYS)
    docs: list[tuple[str, dict[str, Any]]] = [("start", dict(bundle.start_doc))]
    docs.append(("descriptor", dict(desc.descriptor_doc)))
    for seq in range(1, n_events + 1):
        docs.append(
            ("event", dict(desc.compose_event(data={"det": 1.0}, timestamps={"det": 0.0}, seq_num=seq)))
        )
    docs.append(("stop", dict(bundle.compose_stop())))
    return docs


def receiver(tmp_path: Path, **spool: Any) -> Receiver:
    root = tmp_path / "spool"
    config = Config(
        zmq=ZmqConfig(address=f"tcp://127.0.0.1:{free_port()}"), spool=SpoolConfig(dir=str(root), **spool)
    )
    return Receiver(config, SpoolDir(root), ReceiverStats())


def state(rx: Receiver, uid: str) -> Received:
    received = Received.load(rx.spool.run_dir(uid))
    assert received is not None
    return received


def quarantined(rx: Receiver) -> list[str]:
    return sorted(p.name.split("-", 1)[1] for p in rx.spool.quarantine_dir.iterdir())


def test_a_whole_run_is_spooled_and_closed_complete(tmp_path: Path) -> None:
    """start, descriptor, 5 events, stop through handle(): 8 documents, closed by its stop, no problem."""
    rx = receiver(tmp_path)
    docs = composed(5)
    for name, doc in docs:
        rx.handle(frame(name, doc))
    rx.close()
    received = state(rx, docs[0][1]["uid"])
    assert received.closed and received.stop_received and received.documents == 8
    assert received.events == {"primary": 5} and received.problems() == []


def test_values_json_cannot_write_never_stop_the_receiver_and_the_state_is_saved(tmp_path: Path) -> None:
    """Schema-valid start/stop holding float32, complex, a 5,000-digit int, numpy strings: spooled,
    received.json written with plain values; a 5,000-digit seq_num is rejected as bad-seq-num."""
    rx = receiver(tmp_path)
    docs = composed(2)
    start, stop = docs[0][1], docs[-1][1]
    start.update(time=np.float32(1.5), scan_id=10**5000, plan_name=np.str_("count"), extra=1j)
    stop.update(exit_status=np.str_("success"), num_events={"primary": 10**5000})
    bad_event = {**docs[2][1], "uid": "x" * 8, "seq_num": 10**5000}
    for name, doc in [*docs[:3], ("event", bad_event), *docs[3:]]:
        rx.handle(frame(name, doc))
    rx.upkeep()
    rx.close()
    received = state(rx, start["uid"])
    assert received.closed and received.documents == len(docs)
    assert received.scan_id is None and received.plan_name == "count" and received.start_time == 1.5
    assert received.exit_status == "success" and received.expected_events == {}
    assert rx.stats.rejected == {"bad-seq-num": 1}
    assert quarantined(rx) == ["bad-seq-num.bin"]


def test_an_unexpected_exception_is_confined_to_its_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug raising inside routing: that message is counted and quarantined as internal-error:<type>,
    the next one is spooled; accept() turns it into a RejectedMessage too."""
    rx = receiver(tmp_path)
    docs = composed(1)
    real = rx.tracker.route

    def broken(name: str, doc: dict[str, Any]) -> Any:
        if name == "descriptor":
            raise ZeroDivisionError("bug")
        return real(name, doc)

    monkeypatch.setattr(rx.tracker, "route", broken)
    rx.handle(frame(*docs[0]))
    rx.handle(frame(*docs[1]))
    assert rx.stats.rejected == {"internal-error:ZeroDivisionError": 1}
    assert quarantined(rx) == ["internal-error_zerodivisionerror.bin"]
    with pytest.raises(RejectedMessage) as info:
        rx.ingest.accept(*docs[1])
    assert info.value.reason == "internal-error:ZeroDivisionError"
    monkeypatch.setattr(rx.tracker, "route", real)
    for name, doc in docs[1:]:
        rx.handle(frame(name, doc))
    rx.close()
    assert state(rx, docs[0][1]["uid"]).problems() == []


def test_upkeep_never_raises_and_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """upkeep() with a failing spooler: no exception, one error line for the episode, one when it recovers."""
    rx = receiver(tmp_path)
    real = rx.spooler.upkeep

    def broken(runs: object, save: bool) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(rx.spooler, "upkeep", broken)
    with caplog.at_level(logging.INFO, logger="tiled_writer_sidecar.receive.receiver"):
        for _ in range(3):
            rx.upkeep()
        monkeypatch.setattr(rx.spooler, "upkeep", real)
        rx.upkeep()
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "upkeep failed" in m]) == 1
    assert len([m for m in messages if "works again" in m]) == 1
    rx.close()


def test_max_open_runs_caps_open_files_not_runs_a_paused_run_ends_complete(tmp_path: Path) -> None:
    """max_open_runs = 3: a run pauses mid-scan while 30 other starts arrive; at most 3 logs are open at
    any time, no run is closed, and the paused run's remaining events and stop reopen its log: complete."""
    rx = receiver(tmp_path, max_open_runs=3)
    paused = composed(6)
    for name, doc in paused[:4]:  # start, descriptor, 2 events
        rx.handle(frame(name, doc))
    others = [composed(0)[0] for _ in range(30)]
    for name, doc in others:
        rx.handle(frame(name, doc))
        assert len(rx.spooler.open_files) <= 3
    rx.upkeep()
    assert len(rx.tracker.runs) == 31 and rx.stats.runs_started == 31
    for name, doc in paused[4:]:
        rx.handle(frame(name, doc))
    assert rx.spooler.reopened >= 1 and len(rx.spooler.open_files) <= 3
    rx.close()
    received = state(rx, paused[0][1]["uid"])
    assert received.closed and received.close_reason == "stop"
    assert received.documents == len(paused) and received.problems() == []
    assert not any(state(rx, doc["uid"]).closed for _, doc in others)
    assert rx.stats.rejected == {} and rx.stats.dropped == 0


def test_beyond_the_runs_held_in_memory_starts_only_go_first_and_an_evicted_run_is_reopened(
    tmp_path: Path,
) -> None:
    """At most 3 runs in memory: two runs receiving events, then 5 starts. The start-only runs are
    evicted first, the busy runs stay; a busy run evicted later (still open on disk) is reopened by its
    next event and ends complete, never rejected after-stop."""
    rx = receiver(tmp_path)
    rx.ingest.max_runs_in_memory = 3
    busy = [composed(4), composed(4)]
    for docs in busy:
        for name, doc in docs[:3]:
            rx.handle(frame(name, doc))
    starts = [composed(0)[0] for _ in range(5)]
    for name, doc in starts:
        rx.handle(frame(name, doc))
    busy_uids = [docs[0][1]["uid"] for docs in busy]
    assert set(busy_uids) <= set(rx.tracker.runs) and len(rx.tracker.runs) == 3
    for name, doc in busy[1][3:5]:  # the second busy run goes on: the first is now the idlest busy one
        rx.handle(frame(name, doc))
    rx.ingest.max_runs_in_memory = 1
    rx.handle(frame(*composed(0)[0]))
    assert busy_uids[0] in rx.ingest.evicted and not state(rx, busy_uids[0]).closed
    rx.ingest.max_runs_in_memory = 10
    for docs in busy:
        for name, doc in docs[3:]:
            if (name, doc) not in busy[1][3:5]:
                rx.handle(frame(name, doc))
    rx.close()
    assert rx.stats.rejected == {}
    for docs in busy:
        received = state(rx, docs[0][1]["uid"])
        assert received.closed and received.documents == len(docs) and received.problems() == [], received


def test_a_second_run_cannot_take_a_live_runs_descriptor(tmp_path: Path) -> None:
    """Run B declares run A's descriptor: rejected as descriptor-claimed; A's events stay A's."""
    rx = receiver(tmp_path)
    a, b = composed(3), composed(0)
    rx.handle(frame(*a[0]))
    rx.handle(frame(*a[1]))
    rx.handle(frame(*b[0]))
    rx.handle(frame("descriptor", {**a[1][1], "run_start": b[0][1]["uid"]}))
    for name, doc in a[2:]:
        rx.handle(frame(name, doc))
    rx.close()
    assert rx.stats.rejected == {"descriptor-claimed": 1}
    assert state(rx, a[0][1]["uid"]).problems() == []
    assert state(rx, a[0][1]["uid"]).events == {"primary": 3}
    assert state(rx, b[0][1]["uid"]).events == {}


@pytest.mark.parametrize("poison", ["unknown-descriptor", "huge-seq-num", "not-a-document"])
def test_start_up_closes_a_run_whose_log_cannot_be_replayed_and_reopens_the_others(
    tmp_path: Path, poison: str
) -> None:
    """A log holding an event of an unknown descriptor, a 5,000-digit seq_num or a record that is not a
    document: the receiver starts, that run is closed incomplete with the reason, a good run is reopened
    and takes its stop."""
    root = tmp_path / "spool"
    bad_docs, good_docs = composed(2), composed(2)
    event = dict(bad_docs[2][1])
    if poison == "unknown-descriptor":
        event["descriptor"] = "nobody"
    elif poison == "huge-seq-num":
        event["seq_num"] = 10**5000
    bad = plant_open_run(root, [*bad_docs[:2], ("event", event)])
    if poison == "not-a-document":
        writer = LogWriter(SpoolDir(root).run_dir(bad), 2**20, FsyncPolicy())
        writer.append(b"\x00not a packed document")
        writer.close()
    good = plant_open_run(root, good_docs[:3])
    rx = receiver(tmp_path)
    assert list(rx.tracker.runs) == [good]
    closed = state(rx, bad)
    assert closed.closed and "could not be replayed" in (closed.close_reason or "")
    for name, doc in good_docs[3:]:
        rx.handle(frame(name, doc))
    rx.close()
    reopened = state(rx, good)
    assert reopened.closed and reopened.documents == len(good_docs) and reopened.problems() == []


def test_start_up_closes_a_run_whose_stop_is_in_its_log(tmp_path: Path) -> None:
    """A receiver killed after writing a run's stop but before saving it closed: the next one finds the
    stop in the log and closes the run complete instead of reopening it."""
    root = tmp_path / "spool"
    docs = composed(2)
    uid = plant_open_run(root, docs)
    rx = receiver(tmp_path)
    assert rx.tracker.runs == {} and rx.spooler.open_files == {}
    received = state(rx, uid)
    assert received.closed and received.close_reason == "stop"
    assert received.documents == len(docs) and received.problems() == []
    rx.close()


def test_start_up_with_more_open_runs_than_max_open_runs_keeps_them_open_with_few_files(
    tmp_path: Path,
) -> None:
    """Five runs left open, max_open_runs = 2: all five are taken over open (none closed), no log is
    open until written, and the idlest one's next events and stop end it complete."""
    root = tmp_path / "spool"
    uids, runs = [], []
    for n in range(5):
        docs = composed(2)
        uid = plant_open_run(root, docs[:3])
        received = Received.load(SpoolDir(root).run_dir(uid))
        assert received is not None
        received.last_received = 1000.0 + n
        received.save(SpoolDir(root).run_dir(uid))
        uids.append(uid)
        runs.append(docs)
    rx = receiver(tmp_path, max_open_runs=2, run_timeout_seconds=0)
    assert sorted(rx.tracker.runs) == sorted(uids) and rx.spooler.open_files == {}
    assert not any(state(rx, uid).closed for uid in uids)
    for name, doc in runs[0][3:]:
        rx.handle(frame(name, doc))
    rx.upkeep()
    assert len(rx.spooler.open_files) <= 2
    rx.close()
    received = state(rx, uids[0])
    assert received.closed and received.documents == len(runs[0]) and received.problems() == []


def test_subscription_connects_receives_and_never_limits_message_size() -> None:
    """A PUB socket on a free 127.0.0.1 port: the Subscription reports connected, hands each
    message to the handler, and leaves ZMQ_MAXMSGSIZE unlimited (a limit would drop the proxy)."""
    import zmq

    from tiled_writer_sidecar.config import ZmqConfig
    from tiled_writer_sidecar.receive.subscription import Subscription
    from tiled_writer_sidecar.testing import wait_until

    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = context.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    subscription = Subscription(ZmqConfig(address=f"tcp://127.0.0.1:{port}"))
    received: list[list[bytes]] = []
    try:
        assert subscription.socket.getsockopt(zmq.MAXMSGSIZE) == -1

        def delivered() -> bool:
            subscription.watch()
            pub.send(b" probe x")
            if subscription.wait(50):
                subscription.drain(received.append)
            return subscription.connected and bool(received)

        wait_until(delivered, 10, what="the subscription to receive")
        assert received[0] == [b" probe x"]
    finally:
        subscription.close()
        pub.close(linger=0)
        context.term()


def test_subscription_bounds_queued_bytes_and_hands_the_overflow_over() -> None:
    """24 single-frame 2 MiB messages (the issue's 24 x 50 MiB, scaled down) to a handler that takes
    20 ms each, with an 8 MiB bound: what waits never exceeds 8 MiB, every message is either handled,
    in order, or handed to `overflow` as its first 64 KiB and its length (the receiver rejects those as
    queue-full), none is lost."""
    import time

    import zmq

    from tiled_writer_sidecar.config import ZmqConfig
    from tiled_writer_sidecar.receive.subscription import Subscription
    from tiled_writer_sidecar.testing import wait_until

    bound, size = 8 * 2**20, 2 * 2**20
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    publisher = context.socket(zmq.XPUB)
    port = publisher.bind_to_random_port("tcp://127.0.0.1")
    overflowed: list[tuple[bytes, int]] = []
    subscription = Subscription(
        ZmqConfig(address=f"tcp://127.0.0.1:{port}"),
        pace=False,
        max_queued_bytes=bound,
        overflow=lambda head, length: overflowed.append((head, length)),
    )
    handled: list[int] = []

    def slow(frames: list[bytes]) -> None:
        handled.append(frames[0][0])
        time.sleep(0.02)  # the work of decoding and spooling a large document

    try:
        assert publisher.poll(30_000) and publisher.recv() == b"\x01"  # subscribed
        for i in range(24):
            publisher.send(bytes([i]) * size)
        wait_until(
            lambda: subscription.drain(slow) >= 0 and len(handled) + len(overflowed) >= 24, 60, interval=0.01
        )
        assert subscription.queued_bytes_peak <= bound
        assert subscription.overflowed == len(overflowed) > 0
        assert handled == sorted(handled) and len(handled) + len(overflowed) == 24
        assert sorted(handled + [head[0] for head, _ in overflowed]) == list(range(24))
        assert all(len(head) == 2**16 and length == size for head, length in overflowed)
    finally:
        subscription.close()
        publisher.close(linger=0)
        context.term()
