"""Issue 12, upload side, end to end: no run, name or setting can stop the upload of other runs.

Everything is real: Tiled (the session's server, one container per test),
bluesky's `bluesky-0MQ-proxy`, a RunEngine with `ophyd.sim` devices
publishing through the standard `Publisher`, and the `tiled-writer-sidecar
run` daemon with its uploader child. Hostile documents go out on that very
Publisher socket (`send_raw`); hostile spool content (what the receiver
could once let through) is planted in the spool before the daemon starts.
One test per class of the issue:

- 6, slots: more never-stopped runs than the uploader used to have
  slots (64) do not keep a newer run from being uploaded;
- 7, uids and untrusted spool content: a run directory whose uid ends in a
  newline, a log whose start names another run, and a document that raises
  inside TiledWriter are each quarantined with their reason; a scan
  published afterwards is in Tiled row for row and the uploader never
  restarted;
- 9, names: a stream named ``../<other run>/primary`` never reaches
  another run's node: the run is quarantined naming the stream, the other
  run's rows are unchanged, and the next run is uploaded;
- 11, configuration: the uploader's argv holds no configuration (it comes
  on a pipe), a Tiled URI with credentials is refused with one line naming
  ``TILED_API_KEY``/``api_key_file`` (exit 2, the secret not repeated), and
  ``http://`` to a non-loopback host is warned about once.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import pytest
from ophyd.sim import det, motor

from tests.support.daemon import assert_rows_in_tiled, make_sidecar
from tests.support.framing import frame, new_uid
from tests.support.spool import plant_closed_run
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.testing import (
    Acquisition,
    TiledContainer,
    ZmqProxy,
    wait_until,
)
from tiled_writer_sidecar.testing.sidecar import SidecarProcess, sidecar_command
from tiled_writer_sidecar.testing.tiled_readback import frame_rows, read_stream

Document = tuple[str, dict[str, Any]]
SECRET = "hostile-secret-5c1e"


# -- helpers -------------------------------------------------------------------


def a_run(uid: str, events: int, *, stream: str = "primary", t0: float | None = None) -> list[Document]:
    """start, one stream of scalar `det` events, stop: plain documents as a RunEngine emits them."""
    t0 = t0 or time.time()
    desc_uid = new_uid()
    docs: list[Document] = [
        ("start", {"uid": uid, "time": t0, "scan_id": 1, "plan_name": "count"}),
        (
            "descriptor",
            {
                "uid": desc_uid,
                "run_start": uid,
                "time": t0,
                "name": stream,
                "data_keys": {"det": {"dtype": "number", "shape": [], "source": "SIM:det"}},
                "object_keys": {"det": ["det"]},
                "configuration": {},
                "hints": {},
            },
        ),
    ]
    for i in range(1, events + 1):
        t = t0 + 0.01 * i
        event = {
            "uid": new_uid(),
            "descriptor": desc_uid,
            "time": t,
            "seq_num": i,
            "data": {"det": float(i)},
            "timestamps": {"det": t},
            "filled": {},
        }
        docs.append(("event", event))
    docs.append(
        (
            "stop",
            {
                "uid": new_uid(),
                "run_start": uid,
                "time": t0 + 1,
                "exit_status": "success",
                "num_events": {stream: events},
            },
        )
    )
    return docs


def states(sidecar: SidecarProcess) -> dict[str, dict[str, Any]]:
    return {run["uid"]: run for run in sidecar.status()["runs"]}


def wait_states(sidecar: SidecarProcess, wanted: dict[str, str], timeout: float) -> dict[str, dict[str, Any]]:
    """Poll `status --json` until each uid in `wanted` has its state; return the runs."""
    runs: dict[str, dict[str, Any]] = {}

    def reached() -> bool:
        nonlocal runs
        runs = states(sidecar)
        return all(runs.get(uid, {}).get("state") == state for uid, state in wanted.items())

    try:
        wait_until(reached, timeout, interval=0.5, what=f"runs in states {wanted}")
    except Exception:
        print({uid: (runs.get(uid) or {}).get("state") for uid in wanted}, sidecar.log_tail(60))
        raise
    return runs


def uploader_children(sidecar: SidecarProcess) -> list[int]:
    pid = sidecar.process.pid
    assert pid is not None
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def assert_uploader_never_restarted_and_no_traceback(sidecar: SidecarProcess) -> None:
    log = sidecar.log_tail(100_000)
    assert "uploader exited" not in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert sidecar.process.running


# -- class 6: uploader slots -----------------------------------------------------


OPEN_RUNS = 70  # more than the 64 runs the uploader used to keep in memory at most


@pytest.mark.timeout(900)  # 70 runs created in Tiled one by one, on a loaded 2-core machine
def test_never_stopped_runs_do_not_keep_a_newer_run_from_being_uploaded(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """70 starts that never stop, then a real scan: the scan is in Tiled row for row, the open runs too.

    Before: the open runs took all 64 in-memory slots of the uploader and
    the scan stayed `pending` forever.
    """
    with make_sidecar(tmp_path, proxy, tiled_container) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        assert acquisition.publisher is not None
        open_uids = [new_uid() for _ in range(OPEN_RUNS)]
        for n, uid in enumerate(open_uids):
            start = {"uid": uid, "time": time.time(), "scan_id": 1000 + n, "plan_name": "never-stopped"}
            acquisition.publisher.send_raw(frame("start", start))
        wait_until(lambda: len(states(sidecar)) >= OPEN_RUNS, 60, interval=0.5, what="the open runs spooled")
        (scan,) = acquisition.run(bp.scan([det], motor, -1, 1, 9))

        runs = sidecar.wait_drained([scan], timeout=120)
        by_uid = {run["uid"]: run for run in runs["runs"]}
        assert by_uid[scan]["state"] == "uploaded", by_uid[scan]
        assert_rows_in_tiled(tiled_container, acquisition, scan)
        # The open runs are live in Tiled too (their start written), none dropped.
        wait_until(
            lambda: set(open_uids) <= set(tiled_container.client()),
            60,
            interval=0.5,
            what="open runs in Tiled",
        )
        assert all(by_uid[uid]["state"] in ("receiving", "uploading") for uid in open_uids)
        assert_uploader_never_restarted_and_no_traceback(sidecar)


# -- class 7: uids and untrusted spool content ----------------------------------------


def test_runs_that_cannot_be_uploaded_are_quarantined_and_later_runs_flow(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """Planted: a uid with a trailing newline, a log whose start is another run's, an invalid event.

    Each is quarantined with its reason (the last after the same rejection
    repeated), no request is made with the bad uid, and a scan published
    afterwards is uploaded row for row without the uploader restarting.
    Before: the newline uid failed every pass with InvalidURL and no later
    run was ever uploaded.
    """
    spool = SpoolDir(tmp_path / "sidecar" / "spool")
    newline_uid = new_uid() + "\n"
    plant_closed_run(spool, newline_uid, newline_uid, a_run(newline_uid, 3))
    foreign_dir, other_start = new_uid(), new_uid()
    plant_closed_run(spool, foreign_dir, foreign_dir, a_run(other_start, 3))
    invalid = new_uid()
    documents = a_run(invalid, 3)
    del documents[3][1]["timestamps"]  # schema-invalid: TiledWriter's normalizer refuses it
    plant_closed_run(spool, invalid, invalid, documents)

    with make_sidecar(tmp_path, proxy, tiled_container) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        (scan,) = acquisition.run(bp.count([det], 5))
        sidecar.wait_drained([scan], timeout=120)
        assert_rows_in_tiled(tiled_container, acquisition, scan)

        runs = wait_states(
            sidecar,
            {newline_uid: "quarantined", foreign_dir: "quarantined", invalid: "quarantined"},
            timeout=120,
        )
        assert "not a safe Tiled key" in runs[newline_uid]["reason"]
        assert "not this run's start" in runs[foreign_dir]["reason"]
        assert "failed 2 times the same way while Tiled answered" in runs[invalid]["reason"]  # `policy`
        in_tiled = set(tiled_container.client())
        assert newline_uid.strip() not in in_tiled and other_start not in in_tiled
        assert_uploader_never_restarted_and_no_traceback(sidecar)


# -- class 9: names that would address another node -------------------------------------


def test_a_stream_named_after_another_runs_path_never_touches_that_run(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """A run whose stream is ``../<victim>/primary``: quarantined naming the stream; the victim unchanged.

    The hostile run has as many events as the victim, so a read-back that
    followed the dot segments would count the victim's rows as its own.
    """
    with make_sidecar(tmp_path, proxy, tiled_container) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        (victim,) = acquisition.run(bp.count([det], 5))
        sidecar.wait_drained([victim], timeout=120)
        before = frame_rows(read_stream(tiled_container.client(), victim, "primary"))

        hostile = new_uid()
        assert acquisition.publisher is not None
        for name, doc in a_run(hostile, 5, stream=f"../{victim}/primary"):
            acquisition.publisher.send_raw(frame(name, doc))
        (after,) = acquisition.run(bp.scan([det], motor, -1, 1, 7))
        sidecar.wait_drained([after], timeout=120)
        assert_rows_in_tiled(tiled_container, acquisition, after)

        runs = wait_states(sidecar, {hostile: "quarantined"}, timeout=120)
        assert "stream name" in runs[hostile]["reason"] and victim in runs[hostile]["reason"]
        assert frame_rows(read_stream(tiled_container.client(), victim, "primary")) == before
        assert list(tiled_container.client()[victim]) == ["primary"]
        assert_uploader_never_restarted_and_no_traceback(sidecar)


# -- class 11: configuration -------------------------------------------------------------


def test_the_uploaders_argv_holds_no_configuration(
    tiled_container: TiledContainer, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """The uploader child (readable by any local user in `ps`) shows neither the spool, the URI nor JSON.

    It gets the config on a pipe and still uploads; it offers itself to the
    OOM killer before the receiver.
    """
    with make_sidecar(tmp_path, proxy, tiled_container) as sidecar:
        acquisition.wait_subscribers(lambda: sidecar.messages_seen() > 0)
        sidecar.wait_uploader_connected()
        (child,) = uploader_children(sidecar)
        argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        shown = b" ".join(argv).decode()
        assert "tiled_writer_sidecar.upload.main" in shown
        for leaked in (str(sidecar.spool_dir), tiled_container.uri, "{", "config"):
            assert leaked not in shown, shown
        assert int(Path(f"/proc/{child}/oom_score_adj").read_text()) > 0
        (scan,) = acquisition.run(bp.count([det], 3))
        sidecar.wait_drained([scan], timeout=120)
        assert_rows_in_tiled(tiled_container, acquisition, scan)


@pytest.mark.process
@pytest.mark.parametrize(
    "uri",
    [f"https://beamline:{SECRET}@tiled.example.org", f"https://tiled.example.org/api?api_key={SECRET}"],
    ids=["userinfo", "query"],
)
def test_a_tiled_uri_with_credentials_is_refused_with_one_line(uri: str, tmp_path: Path) -> None:
    """`run` exits 2 before doing anything, names where the key belongs, and never repeats it."""
    result = subprocess.run(
        [*sidecar_command(), "run", "--spool-dir", str(tmp_path / "spool"), "--tiled-uri", uri],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "TILED_API_KEY" in lines[0] and "api_key_file" in lines[0]
    assert SECRET not in result.stdout + result.stderr
    assert not (tmp_path / "spool").exists()


def test_plain_http_to_another_host_is_warned_about_once(proxy: ZmqProxy, tmp_path: Path) -> None:
    """A daemon pointed at http:// on a non-loopback address (TEST-NET-1, nothing answers) warns once."""
    sidecar = SidecarProcess(
        tmp_path / "sidecar", zmq_address=proxy.out_address, tiled_uri="http://192.0.2.1:8000", api_key=SECRET
    )
    with sidecar:
        wait_until(lambda: "sidecar running" in sidecar.log_tail(1000), 30, what="the daemon's start line")
        log = sidecar.log_tail(100_000)
        warnings = [line for line in log.splitlines() if "not a loopback address" in line]
        assert len(warnings) == 1, log
        assert "192.0.2.1" in warnings[0] and "https://" in warnings[0]
        assert SECRET not in log
