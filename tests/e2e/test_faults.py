"""Shared machinery of the fault-matrix tests (issue 6; `test_faults_*.py`).

Faults are injected at exact points of a live run by RunEngine callbacks
(`Fault`: at ``seq_num`` N of the primary stream, start a thread that does
the slow part), so the RunEngine's thread is never held by the test itself.
Plans that must outlast a slow recovery (a Tiled cold start, a sidecar
restart) are adaptive (`count_until`): they go on until the fault thread says
the system is back, then emit a fixed number of further events, so no test
depends on a guess of how long a restart takes on a loaded machine. For
those, the RunEngine's timing is compared per event (`per_event_ratio`).

`audit_run` compares what Tiled holds for a run with what the RunEngine
emitted (`expected_rows`) and with what the sidecar says it received
(`status --json`); `assert_complete` and `assert_exact_gap` are the two
verdicts a cell can expect. Each cell prints one `CELL n: ...` line
(`report_cell`), visible with ``pytest -s``.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import bluesky.preprocessors as bpp
import httpx
from ophyd.sim import det

from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.status import status_report
from tiled_writer_sidecar.testing import Acquisition, TiledServer, ZmqProxy, wait_until
from tiled_writer_sidecar.testing.acquisition import Document, expected_rows
from tiled_writer_sidecar.testing.sidecar import SidecarProcess, sidecar_command
from tiled_writer_sidecar.testing.tiled_readback import frame_rows, read_stream

#: The RunEngine's wall time with a fault may be at most this factor of the
#: same plan's without it, plus `RE_SLACK_S` (generous: the machine is loaded).
RE_FACTOR = 2.0
RE_SLACK_S = 1.0

#: Small, fast settings for every sidecar in the matrix.
FAST = {"tiled": {"batch_seconds": 0.5, "backoff_initial_seconds": 0.2, "backoff_max_seconds": 2.0}}


# -- processes ----------------------------------------------------------------


def make_sidecar(
    directory: Path,
    proxy: ZmqProxy,
    tiled: TiledServer,
    settings: dict[str, dict[str, Any]] | None = None,
) -> SidecarProcess:
    merged: dict[str, dict[str, Any]] = {k: dict(v) for k, v in FAST.items()}
    for section, values in (settings or {}).items():
        merged.setdefault(section, {}).update(values)
    return SidecarProcess(
        directory, zmq_address=proxy.out_address, tiled_uri=tiled.uri, api_key=tiled.api_key, settings=merged
    )


@contextlib.contextmanager
def running(sidecar: SidecarProcess) -> Iterator[SidecarProcess]:
    """Start the sidecar; whatever the test did to it, SIGTERM/SIGKILL it at the end."""
    try:
        sidecar.start()
        yield sidecar
    finally:
        sidecar.process.terminate(30)


@contextlib.contextmanager
def tiled_not_started(directory: Path) -> Iterator[TiledServer]:
    """A Tiled server whose port is known but which is not running yet (Tiled down)."""
    server = TiledServer(directory)
    try:
        yield server
    finally:
        server.close()


def connect(acq: Acquisition, sidecar: SidecarProcess) -> None:
    """Wait until the sidecar's receiver sees what this Publisher sends (slow joiners)."""
    before = sidecar.messages_seen()
    acq.wait_subscribers(lambda: sidecar.messages_seen() > before)


def cli(sidecar: SidecarProcess, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run `tiled-writer-sidecar ARGS --spool-dir SPOOL` with the sidecar's environment (API key)."""
    return subprocess.run(
        [*sidecar_command(), *args, "--spool-dir", str(sidecar.spool_dir)],
        capture_output=True,
        text=True,
        env=sidecar.env,
        timeout=timeout,
        check=False,
    )


def spool_status(sidecar: SidecarProcess) -> dict[str, Any]:
    """What `status --json` reports, computed in this process (for fast polling only)."""
    return status_report(SpoolDir(sidecar.spool_dir, create=False))


def health(sidecar: SidecarProcess) -> tuple[int, dict[str, Any]]:
    response = httpx.get(sidecar.health_url, timeout=10)
    return response.status_code, response.json()


def run_of(status: dict[str, Any], uid: str) -> dict[str, Any]:
    for run in status["runs"]:
        if run["uid"] == uid:
            return dict(run)
    raise AssertionError(f"run {uid} is not in the status report: {[r['uid'] for r in status['runs']]}")


# -- plans and faults -----------------------------------------------------------


def count(num: int, delay: float = 0.05) -> Any:
    return bp.count([det], num, delay=delay)


def count_until(
    done: threading.Event, *, min_events: int, extra: int, delay: float = 0.05, max_events: int = 5000
) -> Any:
    """Like `bp.count([det])`, but goes on until `done` is set, then `extra` more events.

    At least `min_events` events; at most `max_events` (then the test fails:
    the fault thread never said the system was back).
    """

    @bpp.stage_decorator([det])
    @bpp.run_decorator(md={"plan_name": "count_until", "detectors": [det.name]})
    def inner() -> Any:
        n = 0
        done_at: int | None = None
        while n < max_events:
            yield from bps.trigger_and_read([det])
            n += 1
            if done_at is None and done.is_set():
                done_at = n
            if n >= min_events and done_at is not None and n - done_at >= extra:
                return
            yield from bps.sleep(delay)

    return (yield from inner())


class SeqWatch:
    """RunEngine callback: the last seq_num of `stream` emitted; other threads can wait for one."""

    def __init__(self, stream: str = "primary") -> None:
        self.stream = stream
        self._descriptors: set[str] = set()
        self._cond = threading.Condition()
        self.seq = 0
        self.stopped = False

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        with self._cond:
            if name == "start":
                self.seq, self.stopped = 0, False
            elif name == "descriptor" and doc.get("name") == self.stream:
                self._descriptors.add(doc["uid"])
            elif name == "event" and doc["descriptor"] in self._descriptors:
                self.seq = doc["seq_num"]
            elif name == "stop":
                self.stopped = True
            self._cond.notify_all()

    def wait_for(self, seq: int, timeout: float = 120.0) -> None:
        """Block until seq_num `seq` was emitted (AssertionError if the run stopped first)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self.seq >= seq or self.stopped, timeout)
            if not ok or self.seq < seq:
                raise AssertionError(f"seq_num {seq} never came (last {self.seq}, stopped={self.stopped})")


class Fault:
    """RunEngine callback: at seq_num `at` of the primary stream, run `action` in a thread."""

    def __init__(self, at: int, action: Callable[[], object], stream: str = "primary") -> None:
        self.at = at
        self.action = action
        self.stream = stream
        self._descriptors: set[str] = set()
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.fired_at: float | None = None
        self.finished_at: float | None = None

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "descriptor" and doc.get("name") == self.stream:
            self._descriptors.add(doc["uid"])
        elif (
            name == "event"
            and self.thread is None
            and doc["descriptor"] in self._descriptors
            and doc["seq_num"] == self.at
        ):
            self.fired_at = time.monotonic()
            self.thread = threading.Thread(target=self._run, name=f"fault@{self.at}", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:
            self.action()
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread by join()
            self.error = err
        finally:
            self.finished_at = time.monotonic()

    def join(self, timeout: float = 300.0) -> None:
        if self.thread is None:
            raise AssertionError(f"the fault at seq_num {self.at} never fired")
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"the fault at seq_num {self.at} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error

    def run(self, acq: Acquisition, plan: Any, *, join_timeout: float = 300.0) -> list[str]:
        """Run `plan` with this fault armed; wait for the fault's thread; return the run uids."""
        token = acq.subscribe(self)
        try:
            uids = acq.run(plan)
        finally:
            acq.unsubscribe(token)
        self.join(join_timeout)
        return uids


# -- what Tiled holds ---------------------------------------------------------------


def run_documents(docs: list[Document], uid: str) -> int:
    """How many documents the RunEngine emitted for run `uid`."""
    descriptors = {d["uid"] for n, d in docs if n == "descriptor" and d["run_start"] == uid}
    total = 0
    for name, doc in docs:
        if (
            (name == "start" and doc["uid"] == uid)
            or (name in ("descriptor", "stop") and doc["run_start"] == uid)
            or (name in ("event", "event_page") and doc["descriptor"] in descriptors)
        ):
            total += 1
    return total


@dataclass
class Audit:
    uid: str
    sent: int  # rows the RunEngine emitted
    in_tiled: int  # rows Tiled holds
    duplicates: int  # rows whose seq_num Tiled holds more than once
    gap: int  # events the sidecar reports missing (status --json `gaps`)
    received: int  # events the receiver counted
    status: dict[str, Any]
    rows: list[dict[str, Any]]
    expected: list[dict[str, Any]]
    emitted_documents: int

    @property
    def missing_seq(self) -> list[int]:
        have = {row["seq_num"] for row in self.rows}
        return [row["seq_num"] for row in self.expected if row["seq_num"] not in have]


def audit_run(
    client: Any, acq: Acquisition, uid: str, status: dict[str, Any], stream: str = "primary"
) -> Audit:
    docs = acq.documents
    expected = expected_rows(docs, stream, run_uid=uid)
    rows = frame_rows(read_stream(client, uid, stream))
    seqs = [row["seq_num"] for row in rows]
    run = run_of(status, uid)
    return Audit(
        uid=uid,
        sent=len(expected),
        in_tiled=len(rows),
        duplicates=len(seqs) - len(set(seqs)),
        gap=int(run["gaps"].get(stream, 0)),
        received=int(run["events"].get(stream, 0)),
        status=run,
        rows=rows,
        expected=expected,
        emitted_documents=run_documents(docs, uid),
    )


def assert_complete(audit: Audit) -> None:
    """Every row emitted is in Tiled exactly once, nothing reported missing."""
    assert audit.duplicates == 0, f"{audit.uid}: {audit.duplicates} duplicated rows"
    assert audit.rows == audit.expected, (
        f"{audit.uid}: Tiled holds {audit.in_tiled} rows, {audit.sent} were emitted; "
        f"missing seq_nums {audit.missing_seq[:20]}"
    )
    run = audit.status
    assert run["gaps"] == {}, f"{audit.uid}: gaps reported for a complete run: {run['gaps']}"
    assert run["state"] == "uploaded", f"{audit.uid}: state {run['state']}: {run['problems']}"
    assert run["documents"] == audit.emitted_documents, run
    assert run["uploaded_documents"] == audit.emitted_documents, run


def assert_exact_gap(audit: Audit, *, expect_loss: bool = True) -> None:
    """What reached the receiver is in Tiled exactly once; what did not is reported exactly."""
    assert audit.duplicates == 0, f"{audit.uid}: {audit.duplicates} duplicated rows"
    by_seq = {row["seq_num"]: row for row in audit.expected}
    wrong = [row for row in audit.rows if by_seq.get(row["seq_num"]) != row]
    assert not wrong, f"{audit.uid}: rows in Tiled that were never emitted as such: {wrong[:3]}"
    assert [r["seq_num"] for r in audit.rows] == sorted(r["seq_num"] for r in audit.rows), "rows out of order"
    assert audit.in_tiled == audit.received, (
        f"{audit.uid}: the receiver counted {audit.received} events, Tiled holds {audit.in_tiled}"
    )
    lost = audit.sent - audit.in_tiled
    assert audit.gap == lost, (
        f"{audit.uid}: {lost} events lost (seq_nums {audit.missing_seq[:10]}...), "
        f"{audit.gap} reported: {audit.status['gaps']}"
    )
    if expect_loss:
        assert lost > 0, f"{audit.uid}: nothing was lost; the fault missed its window"
    run = audit.status
    if lost:
        assert run["state"] == "incomplete", f"{audit.uid}: state {run['state']} with a gap of {lost}"
        assert any("missing" in p for p in run["problems"]), run["problems"]
    assert run["uploaded_documents"] == run["documents"], run


# -- the RunEngine never waits ---------------------------------------------------------


def re_ratio(with_fault: float, without: float) -> float:
    """Wall time ratio of the same plan with and without the fault; asserts the bound."""
    assert with_fault < RE_FACTOR * without + RE_SLACK_S, (
        f"the RunEngine was held up: {with_fault:.2f} s with the fault, {without:.2f} s without"
    )
    return with_fault / without


def per_event_ratio(with_fault: float, events_fault: int, without: float, events_without: int) -> float:
    """As `re_ratio`, per event (for adaptive plans whose length depends on the fault)."""
    fault, base = with_fault / events_fault, without / events_without
    assert fault < RE_FACTOR * base + RE_SLACK_S / events_without, (
        f"the RunEngine was held up: {fault * 1000:.1f} ms/event with the fault, "
        f"{base * 1000:.1f} ms/event without"
    )
    return fault / base


def report_cell(cell: str, audits: list[Audit], ratio: float | None, note: str = "") -> str:
    line = (
        f"CELL {cell}: sent={sum(a.sent for a in audits)} in_tiled={sum(a.in_tiled for a in audits)} "
        f"duplicates={sum(a.duplicates for a in audits)} gap_reported={sum(a.gap for a in audits)} "
        f"re_time_ratio={'n/a' if ratio is None else f'{ratio:.2f}'}"
    )
    if note:
        line += f"  ({note})"
    print(f"\n{line}", flush=True)
    return line


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    return wait_until(predicate, timeout, interval=interval, what=what)


#: Pause of cell 3 (the issue asks for 40 s; only this test pays for it).
HANG_SECONDS = 40.0


def test_cell1_tiled_down_before_the_run(proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path) -> None:
    """Tiled is down before the run and started after it: the run is spooled, then uploaded whole."""
    with (
        tiled_not_started(tmp_path / "tiled") as tiled,
        running(make_sidecar(tmp_path / "sidecar", proxy, tiled)) as sidecar,
    ):
        connect(acquisition, sidecar)
        (uid,) = acquisition.run(count(40))
        with_fault = acquisition.last_duration
        wait_for(lambda: run_of(spool_status(sidecar), uid)["closed"], 30, "the run spooled and closed")
        code, body = health(sidecar)
        assert code == 200, body  # Tiled down is reported, but the sidecar is healthy
        assert run_of(sidecar.status(), uid)["state"] == "pending"

        tiled.start()
        status = sidecar.wait_drained([uid])
        client = tiled.client()
        audit = audit_run(client, acquisition, uid, status)
        assert_complete(audit)

        # The same plan with Tiled up: the RunEngine's reference time, and the next run is complete.
        (uid2,) = acquisition.run(count(40))
        ratio = re_ratio(with_fault, acquisition.last_duration)
        status = sidecar.wait_drained([uid2])
        audit2 = audit_run(client, acquisition, uid2, status)
        assert_complete(audit2)
    report_cell("1", [audit], ratio)


def test_cell2_tiled_killed_mid_run(
    tiled_server: TiledServer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """Tiled SIGKILLed at seq_num 20 of 60 while rows are being flushed, restarted after the run."""
    with running(make_sidecar(tmp_path / "sidecar", proxy, tiled_server)) as sidecar:
        connect(acquisition, sidecar)
        sidecar.wait_uploader_connected()
        (base_uid,) = acquisition.run(count(60))
        without = acquisition.last_duration
        sidecar.wait_drained([base_uid])

        # Kill Tiled once some of this run's rows are in it (a partial run is left behind).
        fault = Fault(20, tiled_server.kill)
        (uid,) = fault.run(acquisition, count(60))
        ratio = re_ratio(acquisition.last_duration, without)
        assert not tiled_server.running
        tiled_server.start()
        status = sidecar.wait_drained([uid, base_uid])
        client = tiled_server.client()
        audits = [audit_run(client, acquisition, u, status) for u in (base_uid, uid)]
        for audit in audits:
            assert_complete(audit)
        assert run_of(status, uid)["attempts"] >= 2, "the killed upload was not retried"
    report_cell("2", audits[1:], ratio)


def test_cell3_tiled_hung_40s_mid_run(
    tiled_server: TiledServer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """Tiled SIGSTOPped for 40 s at seq_num 20 of 60, then SIGCONT: everything arrives once."""
    paused = threading.Event()
    with running(make_sidecar(tmp_path / "sidecar", proxy, tiled_server)) as sidecar:
        connect(acquisition, sidecar)
        sidecar.wait_uploader_connected()
        (base_uid,) = acquisition.run(count(60))
        without = acquisition.last_duration
        sidecar.wait_drained([base_uid])

        def hang() -> None:
            tiled_server.pause()
            paused.set()

        fault = Fault(20, hang)
        (uid,) = fault.run(acquisition, count(60))
        ratio = re_ratio(acquisition.last_duration, without)
        assert paused.is_set() and fault.fired_at is not None
        # The fault lasts 40 s by definition: this sleep is the outage, not a wait for something.
        time.sleep(max(0.0, fault.fired_at + HANG_SECONDS - time.monotonic()))
        code, body = health(sidecar)
        assert code == 200, body  # a hung Tiled does not make the sidecar unhealthy
        assert run_of(spool_status(sidecar), uid)["state"] != "uploaded"
        tiled_server.resume()
        status = sidecar.wait_drained([uid], timeout=180)
        client = tiled_server.client()
        audit = audit_run(client, acquisition, uid, status)
        assert_complete(audit)
    report_cell("3", [audit], ratio, note=f"hung {HANG_SECONDS:.0f} s")


def test_cell4_tiled_restarted_twice_in_one_run(
    tiled_server: TiledServer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """Tiled restarted (SIGTERM + cold start) twice while one long run goes on."""
    watch = SeqWatch()
    acquisition.subscribe(watch)
    with running(make_sidecar(tmp_path / "sidecar", proxy, tiled_server)) as sidecar:
        connect(acquisition, sidecar)
        sidecar.wait_uploader_connected()
        base_events = 40
        (base_uid,) = acquisition.run(count(base_events))
        without = acquisition.last_duration
        sidecar.wait_drained([base_uid])

        back = threading.Event()
        restarts: list[int] = []

        def restart_twice() -> None:
            tiled_server.restart()
            restarts.append(watch.seq)
            watch.wait_for(watch.seq + 10)  # rows flow into the restarted Tiled again
            tiled_server.restart()
            restarts.append(watch.seq)
            back.set()

        fault = Fault(10, restart_twice)
        (uid,) = fault.run(acquisition, count_until(back, min_events=30, extra=20))
        assert len(restarts) == 2
        events = watch.seq
        ratio = per_event_ratio(acquisition.last_duration, events, without, base_events)
        status = sidecar.wait_drained([uid])
        client = tiled_server.client()
        audit = audit_run(client, acquisition, uid, status)
        assert_complete(audit)
    report_cell("4", [audit], ratio, note=f"{events} events, restarts at seq_num 10 and {restarts[0]}+")


def test_cell11_runs_back_to_back_while_tiled_down(
    proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """Five runs while Tiled is down: all uploaded, in acquisition order, when it comes back."""
    with (
        tiled_not_started(tmp_path / "tiled") as tiled,
        running(make_sidecar(tmp_path / "sidecar", proxy, tiled)) as sidecar,
    ):
        connect(acquisition, sidecar)
        uids: list[str] = []
        for n in (30, 10, 25, 5, 40):
            uids += acquisition.run(count(n, delay=0.0))
        down_times = acquisition.durations[-5:]
        wait_for(
            lambda: all(run_of(spool_status(sidecar), u)["closed"] for u in uids), 30, "the runs spooled"
        )
        assert [r["state"] for r in sidecar.status()["runs"]] == ["pending"] * 5

        tiled.start()
        status = sidecar.wait_drained(uids)
        client = tiled.client()
        audits = [audit_run(client, acquisition, u, status) for u in uids]
        for audit in audits:
            assert_complete(audit)
        in_tiled = [key for key in client if key in uids]
        assert in_tiled == uids, "runs were not written in acquisition order"
        starts = [client[u].metadata["start"]["time"] for u in uids]
        assert starts == sorted(starts)

        # The same plans with Tiled up: the RunEngine's reference.
        for n in (30, 10, 25, 5, 40):
            acquisition.run(count(n, delay=0.0))
        ratio = re_ratio(sum(down_times), sum(acquisition.durations[-5:]))
    report_cell("11", audits, ratio, note="5 runs")
