"""Issue 7, end to end: hostile and broken messages never hurt the sidecar nor valid runs.

Everything is real: a RunEngine with `ophyd.sim` devices publishes through
bluesky's standard `Publisher` to `bluesky-0MQ-proxy`, and the bad messages
go out on that very Publisher socket (`send_raw`), so they reach the
`tiled-writer-sidecar run` daemon exactly in between (or inside) the valid
runs, in the order they were sent. For every bad message each test checks
the whole contract:

- its reason is counted in ``/metrics``
  (``tiled_writer_sidecar_messages_rejected_total{reason="..."}``) and the
  count equals the files kept for that reason in ``SPOOL/quarantine/``;
- the raw message is in the quarantine, byte for byte;
- each reason is logged once (with the message size), not once per message;
- the daemon is still running and healthy;
- the valid runs before and after are in Tiled row for row
  (`expected_rows` vs `read_stream`), and ``status --json`` shows them
  ``uploaded``, with every document the RunEngine emitted and no gap.

The readiness probes of `Acquisition.wait_subscribers` are not documents
either: the sidecar rejects them as ``unknown-document`` too, so the
quarantine checks set them apart by their prefix (`is_probe`).
"""

from __future__ import annotations

import io
import os
import pickle
import stat
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import event_model
import pytest
from ophyd.sim import det, motor

from tests.support.daemon import assert_runs_uploaded, make_sidecar, rejected_counts, run_documents
from tests.support.framing import frame, new_uid
from tiled_writer_sidecar import __version__
from tiled_writer_sidecar.cli import PROG
from tiled_writer_sidecar.spool.directory import quarantine_entry
from tiled_writer_sidecar.testing import (
    Acquisition,
    TiledContainer,
    ZmqProxy,
    is_probe,
    wait_until,
)
from tiled_writer_sidecar.testing._process import ManagedProcess
from tiled_writer_sidecar.testing.ports import LOCALHOST, free_port
from tiled_writer_sidecar.testing.sidecar import SidecarProcess, sidecar_command

# -- helpers -------------------------------------------------------------------


class Reduce:
    """Unpickles as ``func(*args)``: the classic malicious pickle."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func = func
        self.args = args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (self.func, self.args)


def malicious_messages(markers: Path) -> dict[str, bytes]:
    """Pickles that create a file in `markers` when unpickled with `pickle.loads`."""
    return {
        "os.system": frame(
            "start", {"uid": new_uid(), "time": 1.0, "x": Reduce(os.system, f"touch {markers / 'system'}")}
        ),
        "open": frame(
            "start", {"uid": new_uid(), "time": 1.0, "x": Reduce(open, str(markers / "open"), "w")}
        ),
        # Protocol 0, hand-written: MARK, GLOBAL posix.system, STRING, OBJ -> system("touch ...").
        "protocol-0 OBJ": b" event (cposix\nsystem\nS'touch " + str(markers / "proto0").encode() + b"'\no.",
    }


def quarantine(sidecar: SidecarProcess) -> dict[str, list[bytes]]:
    """``{reason: [raw message, ...]}`` from ``SPOOL/quarantine/<ns>-<reason>.bin``, oldest first."""
    kept: dict[str, list[bytes]] = {}
    for path in sorted((sidecar.spool_dir / "quarantine").iterdir()):
        reason = path.name.split("-", 1)[1].removesuffix(".bin").removesuffix(".prefix")
        kept.setdefault(reason, []).append(path.read_bytes())
    return kept


def without_probes(kept: dict[str, list[bytes]]) -> dict[str, list[bytes]]:
    cleaned = {reason: [m for m in raw if not is_probe(m)] for reason, raw in kept.items()}
    return {reason: raw for reason, raw in cleaned.items() if raw}


def rejection_log_lines(sidecar: SidecarProcess) -> list[str]:
    return [line for line in sidecar.log_tail(100_000).splitlines() if "message rejected" in line]


def kept_of(reason: str, frames: list[bytes]) -> bytes:
    """What the receiver keeps (and logs the size of) for a rejected message: all of it, except that a
    multipart message is refused as it is read and only its first frame is kept (`Subscription.drain`)."""
    return frames[0] if reason == "frame-count" else b"".join(frames)


def assert_rejected(sidecar: SidecarProcess, sent: list[tuple[str, list[bytes]]]) -> None:
    """Every (reason, frames) in `sent` was counted, quarantined and logged once per reason.

    A message is kept byte for byte, or (over 64 KiB) as `quarantine_entry` makes it: a header with
    its length and sha256, then its first bytes."""
    counts = rejected_counts(sidecar)
    kept = quarantine(sidecar)
    # Counted == quarantined, reason by reason (probes included: they are rejected too).
    assert {reason: len(raw) for reason, raw in kept.items()} == counts
    # Each bad message is in the quarantine under its reason, nothing else is (but probes).
    expected: dict[str, Counter[bytes]] = {}
    for reason, frames in sent:
        expected.setdefault(reason, Counter())[quarantine_entry(kept_of(reason, frames))] += 1
    assert {reason: Counter(raw) for reason, raw in without_probes(kept).items()} == expected
    # Logged once per reason, with the size of the first such message, never one line per message.
    lines = rejection_log_lines(sidecar)
    for reason in counts:
        mine = [line for line in lines if f"reason={reason} " in line]
        assert len(mine) == 1 and " count=1 " in mine[0], mine
    firsts = {reason: kept_of(reason, frames) for reason, frames in reversed(sent)}
    for reason, first in firsts.items():
        if reason != "unknown-document":  # there, a probe came first
            (line,) = [line for line in lines if f"reason={reason} " in line]
            assert f" bytes={len(first)} " in line, line
    assert "Traceback" not in sidecar.log_tail(100_000)


def assert_alive_and_healthy(sidecar: SidecarProcess) -> None:
    assert sidecar.process.running, sidecar.log_tail()
    health = sidecar.health()
    assert health["status"] == "ok", health


# -- malicious pickles ----------------------------------------------------------


def test_malicious_pickles_are_refused_before_any_side_effect_and_the_next_run_arrives(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """Pickles that would run os.system / open a file: no file appears, pickle-forbidden-global x3.

    Each is counted and kept in the quarantine, the reason is logged once with
    the message size (and nothing of the pickle's arguments), the daemon keeps
    running, and the runs before and after arrive intact.
    """
    armed = tmp_path / "armed"
    armed.mkdir()
    for message in malicious_messages(armed).values():  # the payloads are live: pickle.loads runs them
        loaded = pickle.loads(message.split(b" ", 2)[2])
        if isinstance(loaded, dict) and isinstance(loaded["x"], io.IOBase):
            loaded["x"].close()  # the file `open` made
    assert sorted(p.name for p in armed.iterdir()) == ["open", "proto0", "system"]

    markers = tmp_path / "markers"
    markers.mkdir()
    evil = malicious_messages(markers)
    with make_sidecar(tmp_path, proxy, tiled_container) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        (before,) = acquisition.run(bp.count([det], 5))
        assert acquisition.publisher is not None
        for message in evil.values():
            acquisition.publisher.send_raw(message)
        (after,) = acquisition.run(bp.scan([det], motor, -1, 1, 7))

        assert_runs_uploaded(sidecar, tiled_container, acquisition, [before, after], only=True)
        assert list(markers.iterdir()) == [], "a malicious pickle ran"
        assert_rejected(sidecar, [("pickle-forbidden-global", [m]) for m in evil.values()])
        assert str(markers) not in sidecar.log_tail(100_000), "the pickle's arguments reached the log"
        assert_alive_and_healthy(sidecar)


# -- malformed frames -------------------------------------------------------------


def test_garbage_truncated_misframed_and_unknown_messages_each_get_their_reason(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """Garbage, truncated payloads (pickle, JSON, msgpack), 0-byte payload, 2 and 3 frame parts,
    no envelope, an unknown document name and a non-dict document: each counted under its
    reason and quarantined; the runs before and after arrive intact, the daemon lives on."""
    with make_sidecar(tmp_path, proxy, tiled_container) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        (before,) = acquisition.run(bp.count([det], 5))
        event = next(d for n, d in acquisition.documents if n == "event")
        whole = frame("event", event)
        bad: list[tuple[str, list[bytes]]] = [
            ("garbage", [b" event \x00\x01\x02\x03 not a payload of any format"]),
            ("truncated", [whole[: len(whole) // 2]]),  # a real event cut in half
            ("truncated", [b' start {"uid": "abc", "ti']),
            ("truncated", [b" start \x82\xa3uid"]),  # msgpack map cut short
            ("truncated", [b" event "]),  # empty payload
            ("frame-count", [b" event ", pickle.dumps(event)]),
            ("frame-count", [b"", b"event", pickle.dumps(event)]),
            ("envelope", [b"no-spaces-in-this-frame"]),
            ("unknown-document", [frame("bulk_events", {"primary": []})]),
            ("not-a-document", [frame("start", [1, 2, 3])]),
        ]
        assert acquisition.publisher is not None
        socket = acquisition.publisher._socket  # the Publisher's own PUB socket: same ordering
        for _, frames in bad:
            socket.send_multipart(frames)
        (after,) = acquisition.run(bp.scan([det], motor, -1, 1, 7))

        assert_runs_uploaded(sidecar, tiled_container, acquisition, [before, after], only=True)
        assert_rejected(sidecar, bad)
        assert_alive_and_healthy(sidecar)


def test_documents_failing_event_model_schemas_are_rejected_as_schema(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """An event whose seq_num is a string, a start without time (pickle and JSON), a descriptor
    without data_keys, a stop with an unknown exit_status: reason "schema", counted, quarantined;
    none opens a run; the runs around them arrive intact."""
    with make_sidecar(tmp_path, proxy, tiled_container) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        (before,) = acquisition.run(bp.count([det], 5))
        docs = acquisition.documents
        event = next(d for n, d in docs if n == "event")
        descriptor = next(d for n, d in docs if n == "descriptor")
        stop = next(d for n, d in docs if n == "stop")
        descriptor_without_keys = {k: v for k, v in descriptor.items() if k != "data_keys"}
        bad = [
            frame("event", {**event, "uid": new_uid(), "seq_num": "6"}),
            frame("start", {"uid": new_uid(), "scan_id": 99}),
            b' start {"uid": "%s", "scan_id": 100}' % new_uid().encode(),
            frame("descriptor", {**descriptor_without_keys, "uid": new_uid()}),
            frame("stop", {**stop, "uid": new_uid(), "exit_status": "maybe"}),
        ]
        assert acquisition.publisher is not None
        for message in bad:
            acquisition.publisher.send_raw(message)
        (after,) = acquisition.run(bp.scan([det], motor, -1, 1, 7))

        assert_runs_uploaded(sidecar, tiled_container, acquisition, [before, after], only=True)
        assert_rejected(sidecar, [("schema", [m]) for m in bad])
        (line,) = [line for line in rejection_log_lines(sidecar) if "reason=schema" in line]
        assert "seq_num" in line  # the first one says what is wrong with it
        assert_alive_and_healthy(sidecar)


# -- run structure --------------------------------------------------------------


class Injector:
    """A RunEngine callback that, right after event `at_seq` was published, publishes junk.

    Runs in the RunEngine's thread after the Publisher (subscribed earlier),
    so the junk sits exactly between events `at_seq` and `at_seq + 1`.
    """

    def __init__(self, acquisition: Acquisition, at_seq: int) -> None:
        assert acquisition.publisher is not None
        self.publisher = acquisition.publisher
        self.at_seq = at_seq
        self.docs: dict[str, dict[str, Any]] = {}
        self.sent: list[tuple[str, list[bytes]]] = []
        self.orphaned = 0  # documents of runs whose start never came: kept, not rejected

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        self.docs.setdefault(name, doc)
        if name != "event" or doc["seq_num"] != self.at_seq:
            return
        start, descriptor = self.docs["start"], self.docs["descriptor"]
        stranger = new_uid()
        event: Any = {**doc, "uid": new_uid(), "descriptor": stranger}
        page = event_model.pack_event_page(event)
        junk: list[tuple[str | None, bytes]] = [  # None: kept as an orphan (issue 21), not rejected
            ("repeated-start", frame("start", start)),  # this very run's start, again
            (None, frame("event", event)),
            ("duplicate-seq-num", frame("event_page", page)),  # the same seq_num of that descriptor
            (
                None,
                frame(
                    "stop",
                    {
                        "uid": new_uid(),
                        "run_start": new_uid(),
                        "time": doc["time"],
                        "exit_status": "success",
                        "num_events": {},
                    },
                ),
            ),
            (None, frame("descriptor", {**descriptor, "uid": new_uid(), "run_start": new_uid()})),
            (
                "datum-before-resource",
                frame("datum", {"datum_id": f"{stranger}/0", "resource": stranger, "datum_kwargs": {}}),
            ),
        ]
        for reason, message in junk:
            self.publisher.send_raw(message)
            if reason is None:
                self.orphaned += 1
            else:
                self.sent.append((reason, [message]))


def test_documents_out_of_run_order_are_rejected_without_harming_the_live_run(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """Inside a live run: its start again, an event of an unknown descriptor and an event_page repeating
    its seq_num, a stop and a descriptor of an unknown run, a datum of an unknown resource. After it: its
    start again, its stop again, a start whose uid is a path. The event, stop and descriptor are kept as
    orphans (start missing: 3 of them, not uploaded); each other has its reason, counted and
    quarantined; the live run and the next one arrive whole, without a gap; no path escapes."""
    with make_sidecar(tmp_path, proxy, tiled_container) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        injector = Injector(acquisition, at_seq=3)
        token = acquisition.subscribe(injector)
        (live,) = acquisition.run(bp.count([det], 6))
        acquisition.unsubscribe(token)
        assert len(injector.sent) == 3 and injector.orphaned == 3

        run = run_documents(acquisition.documents, live)
        start = next(d for n, d in run if n == "start")
        stop = next(d for n, d in run if n == "stop")
        after_run = [
            ("repeated-start", [frame("start", start)]),
            ("after-stop", [frame("stop", stop)]),
            ("unsafe-uid", [frame("start", {"uid": "../../escaped", "time": 1.0})]),
        ]
        assert acquisition.publisher is not None
        for _, (message,) in after_run:
            acquisition.publisher.send_raw(message)
        (after,) = acquisition.run(bp.scan([det], motor, -1, 1, 7))

        status = assert_runs_uploaded(sidecar, tiled_container, acquisition, [live, after], only=True)
        assert_rejected(sidecar, injector.sent + after_run)
        assert len(status["start_missing"]) == 3
        assert not (sidecar.directory / "escaped").exists()
        assert not any(p.name == "escaped" for p in tmp_path.rglob("escaped"))
        assert_alive_and_healthy(sidecar)


def test_an_event_of_a_run_that_already_stopped_is_rejected_as_after_stop(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """An event of a finished run, published again after its stop: reason after-stop, run unchanged."""
    with make_sidecar(tmp_path, proxy, tiled_container) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        (done,) = acquisition.run(bp.count([det], 3))
        event = next(d for n, d in run_documents(acquisition.documents, done) if n == "event")
        late = frame("event", {**event, "uid": new_uid(), "seq_num": 4})
        assert acquisition.publisher is not None
        acquisition.publisher.send_raw(late)
        (after,) = acquisition.run(bp.count([det], 3))
        assert_runs_uploaded(sidecar, tiled_container, acquisition, [done, after], only=True)
        assert_rejected(sidecar, [("after-stop", [late])])


# -- oversized --------------------------------------------------------------------


def test_an_oversized_message_is_counted_and_the_run_published_right_after_it_arrives(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """max_message_bytes = 64 KiB; a 256 KiB message: reason oversized, counted, quarantined;
    the run the RunEngine publishes right after it (no wait, no probe) arrives whole."""
    limit = 64 * 1024
    with make_sidecar(tmp_path, proxy, tiled_container, zmq={"max_message_bytes": limit}) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        (before,) = acquisition.run(bp.count([det], 5))
        event = next(d for n, d in acquisition.documents if n == "event")
        big = frame("event", {**event, "uid": new_uid(), "data": {"det": b"\x00" * (4 * limit)}})
        assert len(big) > limit
        assert acquisition.publisher is not None
        acquisition.publisher.send_raw(big)
        (after,) = acquisition.run(bp.scan([det], motor, -1, 1, 7))

        try:
            assert_runs_uploaded(
                sidecar, tiled_container, acquisition, [before, after], timeout=45, only=True
            )
        finally:
            assert_alive_and_healthy(sidecar)
        assert_rejected(sidecar, [("oversized", [big])])


# -- spool permissions -------------------------------------------------------------


def test_spool_is_created_0700_with_0600_files_even_under_umask_000(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """Started with umask 000, the daemon still creates every spool directory 0700 and every
    file (segments, run state, locks, quarantine) 0600."""
    sidecar = make_sidecar(tmp_path, proxy, tiled_container, spool={"retention_hours": 1.0})
    previous = os.umask(0)
    try:
        sidecar.start()
    finally:
        os.umask(previous)
    try:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)  # probes: quarantine files
        (uid,) = acquisition.run(bp.count([det], 5))
        assert_runs_uploaded(sidecar, tiled_container, acquisition, [uid], only=True)
        spool = sidecar.spool_dir
        modes: dict[str, tuple[bool, int]] = {}
        for path in [spool, *spool.rglob("*")]:
            try:  # the uploader may replace a JSON file (tmp -> rename) meanwhile
                info = path.lstat()
            except FileNotFoundError:
                continue
            modes[str(path.relative_to(spool))] = (stat.S_ISDIR(info.st_mode), stat.S_IMODE(info.st_mode))
        kinds = {Path(name).suffix for name, (is_dir, _) in modes.items() if not is_dir}
        assert {".seg", ".json", ".lock", ".bin"} <= kinds, kinds
        wrong = {
            name: oct(mode) for name, (is_dir, mode) in modes.items() if mode != (0o700 if is_dir else 0o600)
        }
        assert wrong == {}
    finally:
        sidecar.terminate()


def refused_run(tmp_path: Path, spool: Path) -> tuple[int | None, list[str]]:
    """Run `tiled-writer-sidecar run` on `spool`; return its exit code and output lines."""
    config = tmp_path / "sidecar.toml"
    config.write_text(
        f'[zmq]\naddress = "tcp://{LOCALHOST}:{free_port()}"\n'
        f'[tiled]\nuri = "http://{LOCALHOST}:{free_port()}"\n'
        f'[spool]\ndir = "{spool}"\n'
        f'[metrics]\naddress = "{LOCALHOST}:{free_port()}"\n'
    )
    log = tmp_path / "run.log"
    process = ManagedProcess([*sidecar_command(), "run", "--config", str(config)], log_path=log)
    process.spawn()
    try:
        wait_until(lambda: not process.running, 60, what="`run` to refuse the spool and exit")
    finally:
        code = process.kill()
    lines = [line for line in log.read_text().splitlines()[1:] if line.strip()]  # [0]: ManagedProcess header
    # Every daemon start first logs its version (`cli.startup_line`); the refusal is the line after it.
    return code, [line for line in lines if f"{PROG} {__version__} starting (" not in line]


@pytest.mark.process
@pytest.mark.parametrize("mode", [0o770, 0o702, 0o777], ids=oct)
def test_run_refuses_a_spool_directory_writable_by_group_or_others(tmp_path: Path, mode: int) -> None:
    """`run` on a spool that group or others may write: exit 1 and one line naming it and the fix."""
    spool = tmp_path / "spool"
    spool.mkdir()
    spool.chmod(mode)
    code, lines = refused_run(tmp_path, spool)
    assert code == 1, lines
    assert len(lines) == 1, lines
    assert "writable by group or others" in lines[0] and str(spool) in lines[0], lines
    assert f"chmod 700 {spool}" in lines[0]
    assert stat.S_IMODE(spool.stat().st_mode) == mode, "the sidecar must not fix it silently"


@pytest.mark.process
def test_a_refused_spool_directory_is_left_untouched(tmp_path: Path) -> None:
    """`run` refuses a 0777 spool without creating anything in it."""
    spool = tmp_path / "spool"
    spool.mkdir()
    spool.chmod(0o777)
    code, lines = refused_run(tmp_path, spool)
    assert code == 1, lines
    assert list(spool.iterdir()) == []
