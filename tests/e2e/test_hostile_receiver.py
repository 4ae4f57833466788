"""Issue 12, classes 2, 6 and 8, end to end: hostile traffic never stops the receiver nor costs a valid run.

Everything is real: a RunEngine with `ophyd.sim` devices publishes through
bluesky's `Publisher` to `bluesky-0MQ-proxy`; the hostile messages go out on
that very Publisher socket (`send_raw`), so they reach the running
`tiled-writer-sidecar run` daemon in order with the valid runs. Each test
checks that the daemon process never exited (same pid, still running), and
that the RunEngine's scan afterwards is in Tiled row for row and shown
``uploaded`` without a gap by ``status --json``.

- class 2: values `json` cannot write (numpy scalars, complex, integers of
  5,000 digits) in fields that go into ``received.json``; and a spool left
  with such a seq_num in an open run's log (as an older release wrote it):
  the daemon restarts from it.
- class 6: more never-stopped runs than the daemon's ``RLIMIT_NOFILE`` has
  room for, under a small ``max_open_runs``: open descriptors stay bounded
  (the least recently written logs are closed), no run is closed, a run
  paused while they arrive ends complete, a real run still arrives.
- class 8: a second run claims a live run's descriptor: the claim is
  rejected (``descriptor-claimed``), the live run keeps its events.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import event_model
import numpy as np
import pytest
from ophyd.sim import det, motor

from tests.support.daemon import assert_runs_uploaded, make_sidecar, rejected_counts
from tests.support.framing import frame, new_uid
from tests.support.spool import plant_open_run
from tiled_writer_sidecar.testing import (
    Acquisition,
    TiledContainer,
    ZmqProxy,
    wait_until,
)
from tiled_writer_sidecar.testing.sidecar import SidecarProcess

HUGE = 10**5000  # beyond the 4,300 digits int -> str allows by default: json cannot write it


def assert_same_process(sidecar: SidecarProcess, pid: int | None) -> None:
    """The daemon never exited: still running, with the pid it started with."""
    assert pid is not None
    assert sidecar.process.running and sidecar.process.pid == pid, sidecar.log_tail()
    assert sidecar.health()["status"] == "ok"


# -- class 2 ---------------------------------------------------------------------


def test_values_json_cannot_write_neither_stop_the_daemon_nor_its_restart(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """A run whose start holds a float32 time, a 5,000-digit scan_id, a numpy plan name and a complex,
    whose event has a 5,000-digit seq_num and whose stop a 5,000-digit num_events: the daemon keeps
    running (the seq_num rejected as bad-seq-num), the next scan arrives row for row. Then the daemon
    is stopped, an open run whose log holds such a seq_num (as the last release spooled it) is put in
    the spool, and the daemon starts: that run is closed with the reason, the next scan arrives."""
    hostile = new_uid()
    descriptor_uid = new_uid()
    start = {
        "uid": hostile,
        "time": np.float32(1.5),
        "scan_id": HUGE,
        "plan_name": np.str_("hostile"),
        "note": complex(1, 2),
    }
    data_keys = {"det": {"dtype": "number", "shape": [], "source": "SIM:det"}}
    descriptor = {"uid": descriptor_uid, "run_start": hostile, "time": 2.0, "data_keys": data_keys}
    descriptor["name"] = np.str_("primary")
    event = {"uid": new_uid(), "descriptor": descriptor_uid, "time": 3.0, "seq_num": HUGE}
    event.update(data={"det": 1.0}, timestamps={"det": 3.0}, filled={})
    stop = {"uid": new_uid(), "run_start": hostile, "time": 4.0, "exit_status": np.str_("success")}
    stop["num_events"] = {"primary": HUGE}

    with make_sidecar(tmp_path, proxy, tiled_container) as sidecar:
        pid = sidecar.process.pid
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        assert acquisition.publisher is not None
        for name, doc in [("start", start), ("descriptor", descriptor), ("event", event), ("stop", stop)]:
            acquisition.publisher.send_raw(frame(name, doc))
        (after,) = acquisition.run(bp.count([det], 5))
        assert_runs_uploaded(sidecar, tiled_container, acquisition, [after], timeout=300)
        assert_same_process(sidecar, pid)
        assert rejected_counts(sidecar).get("bad-seq-num") == 1
        (run,) = [r for r in sidecar.status()["runs"] if r["uid"] == hostile]
        assert run["plan_name"] == "hostile" and run["scan_id"] is None and run["documents"] == 3

    # What an older release spooled: an open run whose log holds the 5,000-digit seq_num.
    bundle_docs = [
        ("start", {"uid": new_uid(), "time": 1.0, "scan_id": 7}),
        ("descriptor", {**descriptor, "uid": new_uid(), "name": "primary"}),
    ]
    bundle_docs[1][1]["run_start"] = bundle_docs[0][1]["uid"]
    poisoned_event = {**event, "uid": new_uid(), "descriptor": bundle_docs[1][1]["uid"]}
    poisoned = plant_open_run(sidecar.spool_dir, [*bundle_docs, ("event", poisoned_event)])

    restarted = make_sidecar(tmp_path, proxy, tiled_container)
    with restarted:
        pid = restarted.process.pid
        acquisition.wait_subscribers(lambda: restarted.messages_seen() > 0)
        (later,) = acquisition.run(bp.scan([det], motor, -1, 1, 7))
        assert_runs_uploaded(restarted, tiled_container, acquisition, [later], timeout=300)
        assert_same_process(restarted, pid)
        (run,) = [r for r in restarted.status()["runs"] if r["uid"] == poisoned]
        assert run["closed"] and any("could not be replayed" in p for p in run["problems"]), run


# -- class 6 ---------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_never_stopped_runs_cannot_exhaust_file_descriptors(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """The daemon's RLIMIT_NOFILE lowered to what it has open plus 40, max_open_runs = 8; a run sends its
    start, descriptor and 2 events and pauses, then 60 starts that never stop arrive (one descriptor each
    would exceed the limit): every start is spooled (none dropped), no run is closed (max_open_runs caps
    open logs, not runs), the daemon's open descriptors stay bounded, the paused run's remaining events
    and stop reopen its log and it is uploaded complete, and a RunEngine scan after them arrives row for
    row."""
    max_open = 8
    starts = 60
    paused = composed(5)
    with make_sidecar(tmp_path, proxy, tiled_container, spool={"max_open_runs": max_open}) as sidecar:
        pid = sidecar.process.pid
        assert pid is not None
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        base_fds = len(os.listdir(f"/proc/{pid}/fd"))
        limit = base_fds + 40
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
        assert acquisition.publisher is not None
        for name, doc in paused[:4]:
            acquisition.publisher.send_raw(frame(name, doc))
        uids = [new_uid() for _ in range(starts)]
        for first in range(0, starts, 20):  # in steps: 0MQ's default high-water marks hold 1,000
            seen = sidecar.messages_seen()
            for uid in uids[first : first + 20]:
                acquisition.publisher.send_raw(frame("start", {"uid": uid, "time": 1.0, "scan_id": 1}))
            wait_until(lambda s=seen: sidecar.messages_seen() >= s + 20, 60, what="the starts to be received")
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        assert fds <= base_fds + max_open + 8, (base_fds, fds)
        for name, doc in paused[4:]:
            acquisition.publisher.send_raw(frame(name, doc))

        (after,) = acquisition.run(bp.count([det], 5))
        status = assert_runs_uploaded(sidecar, tiled_container, acquisition, [after], timeout=300)
        assert_same_process(sidecar, pid)
        assert sidecar.health()["receiver"]["dropped"] == 0
        status = sidecar.wait_drained([paused[0][1]["uid"]], timeout=300)
        runs = {r["uid"]: r for r in status["runs"]}
        assert set(uids) <= set(runs), "a start was dropped"
        assert not any(runs[uid]["closed"] for uid in uids), "a run was closed to make room"
        done = runs[paused[0][1]["uid"]]
        assert done["state"] == "uploaded" and done["problems"] == [], done
        assert done["documents"] == done["uploaded_documents"] == len(paused), done
        assert set(rejected_counts(sidecar)) <= {"unknown-document"}  # wait_subscribers' probes only
        assert len(os.listdir(f"/proc/{pid}/fd")) <= base_fds + max_open + 8


def composed(n_events: int) -> list[tuple[str, dict[str, Any]]]:
    """start, a primary descriptor, `n_events` events, stop, as event_model composes them."""
    bundle = event_model.compose_run()
    desc = bundle.compose_descriptor(
        name="primary", data_keys={"det": {"dtype": "number", "shape": [], "source": "s"}}
    )
    docs: list[tuple[str, dict[str, Any]]] = [
        ("start", dict(bundle.start_doc)),
        ("descriptor", dict(desc.descriptor_doc)),
    ]
    for seq in range(1, n_events + 1):
        event = desc.compose_event(data={"det": float(seq)}, timestamps={"det": 0.0}, seq_num=seq)
        docs.append(("event", dict(event)))
    docs.append(("stop", dict(bundle.compose_stop())))
    return docs


# -- class 8 ---------------------------------------------------------------------


class Claimer:
    """A RunEngine callback: right after a run's descriptor is published, a second run claims it."""

    def __init__(self, acquisition: Acquisition) -> None:
        assert acquisition.publisher is not None
        self.publisher = acquisition.publisher
        self.thief = new_uid()
        self.claims: list[bytes] = []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name != "descriptor" or self.claims:
            return
        self.publisher.send_raw(frame("start", {"uid": self.thief, "time": doc["time"], "scan_id": 0}))
        claim = frame("descriptor", {**doc, "run_start": self.thief})
        self.publisher.send_raw(claim)
        self.claims.append(claim)


def test_a_second_run_cannot_take_a_live_runs_descriptor(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """Run B declares live run A's descriptor before A's first event: rejected as descriptor-claimed
    (counted, quarantined byte for byte); A arrives row for row, B holds only its start."""
    with make_sidecar(tmp_path, proxy, tiled_container) as sidecar:
        pid = sidecar.process.pid
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        claimer = Claimer(acquisition)
        token = acquisition.subscribe(claimer)
        (victim,) = acquisition.run(bp.scan([det], motor, -1, 1, 7))
        acquisition.unsubscribe(token)
        assert claimer.claims

        assert_runs_uploaded(sidecar, tiled_container, acquisition, [victim], timeout=300)
        assert_same_process(sidecar, pid)
        assert rejected_counts(sidecar).get("descriptor-claimed") == 1
        kept = [p.read_bytes() for p in (sidecar.spool_dir / "quarantine").glob("*-descriptor-claimed.bin")]
        assert kept == claimer.claims
        (thief,) = [r for r in sidecar.status()["runs"] if r["uid"] == claimer.thief]
        assert thief["documents"] == 1 and thief["events"] == {}
