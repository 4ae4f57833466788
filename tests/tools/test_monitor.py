"""`tiled-writer-sidecar monitor`: live view and `--once --json`, with real processes.

The monitor runs as the console script in a subprocess, subscribed to a real
`bluesky-0MQ-proxy` fed by a real RunEngine (ophyd.sim devices, bluesky's
`Publisher`). Its sidecar panel reads a real `metrics.MetricsServer` (over a
real spool) or the real daemon; "sidecar down" is a port nothing listens on.
The live screen is read from tmux (`capture-pane`) or from a pseudo-terminal.
Readiness is always polled with a deadline: the monitor logs "receiving
from proxy" (to stderr, in `--once` mode) when its first message arrives, so
`Acquisition.wait_subscribers` knows its subscription is in effect.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import bluesky.preprocessors as bpp
import pytest
from ophyd.sim import det, det1, motor, motor1
from rich.console import Console

from tests.support.daemon import make_sidecar, run_documents
from tests.support.monitor import MonitorProcess
from tests.support.monitor_pane import MonitorPane
from tiled_writer_sidecar.config import ZmqConfig
from tiled_writer_sidecar.daemon.metrics import MetricsServer
from tiled_writer_sidecar.errors import ConfigError
from tiled_writer_sidecar.receive.counters import ReceiverStats
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.state_files import Received, atomic_write_json
from tiled_writer_sidecar.testing import (
    Acquisition,
    TiledServer,
    ZmqProxy,
    free_port,
    wait_until,
)
from tiled_writer_sidecar.testing.sidecar import sidecar_command
from tiled_writer_sidecar.tools.monitor.main import (
    MIN_RUNS_SHOWN,
    Subscriber,
    health_url,
    render,
    sparkline,
)
from tiled_writer_sidecar.tools.monitor.state import MonitorState

Document = tuple[str, dict[str, Any]]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>]|\r")


# ----------------------------------------------------------------- helpers
@pytest.fixture
def monitor(tmp_path: Path) -> Iterator[Callable[..., MonitorProcess]]:
    """Start monitors with `monitor(*args)`; all are killed in teardown."""
    started: list[MonitorProcess] = []

    def start(*args: str) -> MonitorProcess:
        process = MonitorProcess(tmp_path / f"monitor{len(started)}", *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def health_server(tmp_path: Path) -> Iterator[MetricsServer]:
    """The daemon's real /healthz over a spool holding one unuploaded run, Tiled down."""
    spool = SpoolDir(tmp_path / "spool")
    run_dir = spool.run_dir("backlog-run")
    run_dir.mkdir()
    Received(uid="backlog-run", scan_id=7, documents=5, bytes=2048, closed=True).save(run_dir)
    atomic_write_json(
        spool.root / "uploader.json",
        {
            "tiled": "down",
            "since": 1.0e9,
            "last_error": "ConnectError: connection refused",
            "documents": 40,
            "rows": 30,
            "last_lag_seconds": 0.25,
            "updated": 1.0e9,
        },
    )
    server = MetricsServer(f"127.0.0.1:{free_port()}", ReceiverStats(), spool)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def nobody_listens() -> str:
    return f"http://127.0.0.1:{free_port()}"


def sent_events(docs: list[Document], uid: str) -> dict[str, int]:
    """Events per stream name that the RunEngine emitted for run `uid`."""
    mine = run_documents(docs, uid)
    streams = {d["uid"]: d["name"] for n, d in mine if n == "descriptor"}
    return dict(Counter(streams[d["descriptor"]] for n, d in mine if n == "event"))


def stream_values(docs: list[Document], uid: str, stream: str, key: str) -> list[Any]:
    """The values of data key `key` in the events of `stream` of run `uid`, in order."""
    mine = run_documents(docs, uid)
    descriptors = {d["uid"] for n, d in mine if n == "descriptor" and d["name"] == stream}
    return [d["data"][key] for n, d in mine if n == "event" and d["descriptor"] in descriptors]


def assert_run_matches(seen: dict[str, Any], docs: list[Document], uid: str) -> None:
    mine = run_documents(docs, uid)
    start = mine[0][1]
    stop = mine[-1][1]
    assert seen["uid"] == uid
    assert seen["scan_id"] == start["scan_id"]
    assert seen["plan_name"] == start["plan_name"]
    assert seen["events"] == sent_events(docs, uid)
    assert seen["events"] == stop["num_events"]
    assert seen["exit_status"] == stop["exit_status"]
    assert seen["documents"] == len(mine)
    assert seen["gaps"] == {}


# ------------------------------------------------------------ pure parts
def test_health_url_accepts_host_port_and_full_urls() -> None:
    """--sidecar HOST:PORT, a base URL or a full /healthz URL; [metrics] address when absent."""
    assert health_url(None, "127.0.0.1:9478") == "http://127.0.0.1:9478/healthz"
    assert health_url("10.0.0.5:9000", "x") == "http://10.0.0.5:9000/healthz"
    assert health_url("http://h:1/", "x") == "http://h:1/healthz"
    assert health_url("https://h:1/custom/health", "x") == "https://h:1/custom/health"
    with pytest.raises(ConfigError, match="--sidecar"):
        health_url("ftp://h:1", "x")


def test_sparkline_puts_the_minimum_at_the_bottom_and_the_maximum_at_the_top() -> None:
    """Three rows: the minimum is one eighth of a block in the bottom row, the maximum a full column."""
    rows = sparkline([0.0, 5.0, 10.0], width=10, height=3)
    assert rows[0][0] == " " and rows[2][0] == "▁"
    assert [row[2] for row in rows] == ["█", "█", "█"]
    assert sparkline([1.0] * 50, width=20)[0] == "▄" * 20  # flat: mid-height, last `width` values


def test_render_shows_the_run_the_plot_and_a_down_sidecar() -> None:
    """The screen for a finished scan: scan_id, stream counts, plot key, last runs, sidecar down."""
    with Acquisition(None, md={"scan_id": 6}) as acq:
        (uid,) = acq.run(bp.scan([det1], motor, 0, 1, 9))
        state = MonitorState(address="tcp://127.0.0.1:5578", sidecar_url="http://127.0.0.1:9/healthz")
        for name, doc in acq.documents:
            state.feed(name, doc)
    state.set_health(None, "nothing listens there (sidecar not running?)")
    console = Console(record=True, width=140, force_terminal=False)
    console.print(render(state.snapshot(), 140))
    text = console.export_text()
    assert re.search(r"scan_id 7\b", text)
    assert re.search(r"primary\s+9\s", text)
    assert "plot det1" in text
    assert uid in text and uid[:8] in text.split("last runs")[1]
    assert "sidecar ● down" in text and "nothing listens there" in text


@pytest.mark.process
def test_json_without_once_is_a_usage_error() -> None:
    """`monitor --json` alone exits 2 with a one-line reason, before subscribing to anything."""
    done = subprocess.run(
        [*sidecar_command(), "monitor", "--json", "--zmq", "tcp://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["tiled-writer-sidecar: error: --json needs --once"]


def test_undecodable_messages_are_counted_as_rejected_not_raised() -> None:
    """Garbage and a forbidden pickle from the wire are counted by reason; no document is made."""
    state = MonitorState()
    subscriber = Subscriber(ZmqConfig(address=f"tcp://127.0.0.1:{free_port()}"), state)
    try:
        subscriber.handle([b"no-spaces-here"])
        subscriber.handle(
            [b" start \x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93."]
        )
    finally:
        subscriber.stop()
    zmq_part = state.snapshot()["zmq"]
    assert zmq_part["messages"] == 2
    assert sum(zmq_part["rejected"].values()) == 2
    assert zmq_part["documents"] == {}


# ------------------------------------------------------ real processes
def test_once_json_matches_what_the_run_engine_sent(
    proxy: ZmqProxy,
    acquisition: Acquisition,
    health_server: MetricsServer,
    monitor: Callable[..., MonitorProcess],
) -> None:
    """--once --json while a count and a scan-with-baseline run: scan_id, uid, per-stream counts,
    exit status and document totals equal what the RunEngine emitted; the sidecar panel is the
    health endpoint's (backlog, Tiled down since, last error)."""
    mon = monitor(
        "--zmq",
        proxy.out_address,
        "--sidecar",
        f"http://127.0.0.1:{health_server.port}",
        "--once",
        "--json",
        "--seconds",
        "120",
    )
    acquisition.wait_subscribers(lambda: "receiving from proxy" in mon.log())
    acquisition.RE.md["scan_id"] = 500
    (count_uid,) = acquisition.run(bp.count([det], 23))
    with_baseline = bpp.baseline_wrapper(bp.scan([det1], motor, -1, 1, 11), [motor1])  # type: ignore[no-untyped-call]
    (scan_uid,) = acquisition.run(with_baseline)
    mon.wait_log(f"run stop uid={scan_uid}")
    snap = mon.snapshot()

    docs = acquisition.documents
    assert snap["run"]["uid"] == scan_uid
    assert snap["run"]["scan_id"] == 502
    assert snap["run"]["events"] == {"baseline": 2, "primary": 11}
    runs = {run["uid"]: run for run in snap["runs"]}
    assert list(runs) == [scan_uid, count_uid]
    assert_run_matches(runs[count_uid], docs, count_uid)
    assert_run_matches(runs[scan_uid], docs, scan_uid)
    assert runs[count_uid]["events"] == {"primary": 23}
    assert snap["zmq"]["documents"] == dict(Counter(name for name, _ in docs))
    probes = snap["zmq"]["rejected"].pop("unknown-document", 0)  # wait_subscribers' probes
    assert snap["zmq"]["rejected"] == {}
    assert snap["zmq"]["messages"] == len(docs) + probes
    assert snap["zmq"]["connection"] == "connected"
    assert snap["gaps"] == 0
    assert snap["plot"]["key"] == "det1"
    assert snap["plot"]["values"] == stream_values(docs, scan_uid, "primary", "det1")

    sidecar = snap["sidecar"]
    assert sidecar["state"] == "up"
    assert sidecar["health"]["spool"]["backlog_documents"] == 5
    assert sidecar["health"]["spool"]["backlog_bytes"] == 2048
    assert sidecar["health"]["tiled"] == {
        "state": "down",
        "since": 1.0e9,
        "last_error": "ConnectError: connection refused",
    }
    assert sidecar["health"]["upload"]["last_lag_seconds"] == 0.25


@pytest.mark.process
def test_once_without_proxy_or_sidecar_says_so_and_exits_0(
    tmp_path: Path, monitor: Callable[..., MonitorProcess]
) -> None:
    """Nothing listens on the 0MQ address nor on the sidecar URL: exit 0, no traceback, and the
    snapshot (JSON and text) says the proxy is not there yet and the sidecar is down."""
    zmq_address = f"tcp://127.0.0.1:{free_port()}"
    url = nobody_listens()
    mon = monitor("--zmq", zmq_address, "--sidecar", url, "--once", "--json", "--seconds", "1")
    code, out, err = mon.popen.wait(30), mon.stdout_path.read_text(), mon.log()
    assert code == 0, err
    assert "Traceback" not in err
    snap = json.loads(out)
    assert snap["zmq"]["connection"] == "connecting"
    assert "bluesky-0MQ-proxy" in snap["zmq"]["detail"]
    assert snap["run"] is None
    assert snap["sidecar"]["state"] == "down"
    assert snap["sidecar"]["url"] == url + "/healthz"
    assert "nothing listens" in snap["sidecar"]["error"]

    text_mon = monitor("--zmq", zmq_address, "--sidecar", url, "--once", "--seconds", "0.5")
    assert text_mon.popen.wait(30) == 0
    screen = text_mon.stdout_path.read_text()
    assert "● connecting" in screen
    assert "waiting for a run" in screen
    assert "sidecar ● down" in screen


@pytest.mark.process
def test_monitor_started_before_the_proxy_follows_it_through_a_restart(
    tmp_path: Path, monitor: Callable[..., MonitorProcess]
) -> None:
    """Monitor first, proxy later, then a proxy restart between two scans: it reconnects by itself
    and both runs are complete in the snapshot."""
    proxy = ZmqProxy(log_path=tmp_path / "proxy.log")
    mon = monitor(
        "--zmq", proxy.out_address, "--sidecar", nobody_listens(), "--once", "--json", "--seconds", "120"
    )
    try:
        with proxy, Acquisition.for_proxy(proxy) as acq:
            mon.wait_log("connected to proxy")
            acq.wait_subscribers(lambda: "receiving from proxy" in mon.log())
            (first,) = acq.run(bp.count([det], 5))
            mon.wait_log(f"run stop uid={first}")

            proxy.restart()
            mon.wait_log("went away")
            mon.wait_log("connected to proxy", count=2)
            acq.wait_subscribers(lambda: mon.log().count("receiving from proxy") >= 2)
            (second,) = acq.run(bp.scan([det], motor, 0, 1, 6))
            mon.wait_log(f"run stop uid={second}")
            docs = acq.documents
    finally:
        proxy.close()
    snap = mon.snapshot()
    runs = {run["uid"]: run for run in snap["runs"]}
    assert_run_matches(runs[first], docs, first)
    assert_run_matches(runs[second], docs, second)
    assert snap["zmq"]["connects"] == 2


def test_live_screen_in_tmux_shows_scan_id_event_count_and_sidecar_down(
    proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """The live view in a 140x45 tmux pane shows the scan's scan_id, its event count, the plot and
    'sidecar down'; Ctrl+C ends it with status 0 and no traceback."""
    with MonitorPane(tmp_path, zmq=proxy.out_address, sidecar=nobody_listens(), width=140) as pane:
        acquisition.wait_subscribers(lambda: pane.messages_on_screen() > 0)
        acquisition.RE.md["scan_id"] = 4100
        (uid,) = acquisition.run(bp.count([det], 37))

        def shows_the_scan() -> bool:
            text = pane.screen()
            return all(
                (
                    re.search(r"scan_id 4101\b", text),
                    re.search(r"primary\s+37\s", text),
                    "● success" in text,
                    "sidecar ● down" in text,
                )
            )

        try:
            wait_until(shows_the_scan, 30, what="scan_id 4101, 37 events and 'sidecar down' on the screen")
        except TimeoutError:
            pytest.fail("screen was:\n" + pane.screen())
        text = pane.screen()
        assert uid in text
        assert "plot det" in text
        assert "nothing listens there" in text
        assert "● connected" in text

        assert pane.interrupt() == "0"
        assert "Traceback" not in pane.screen()


def test_an_80x24_pane_shows_the_run_history_and_q_quits(
    proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """In an 80x24 tmux pane (a default terminal) the screen fits: the last of 6 scans, the history of
    the newest `MIN_RUNS_SHOWN` (their uid prefixes; a header that wraps may take the sixth row) and the
    footer are on it; pressing q ends the monitor with status 0."""
    with MonitorPane(tmp_path, zmq=proxy.out_address, sidecar=nobody_listens(), width=80, height=24) as pane:
        acquisition.wait_subscribers(lambda: pane.messages_on_screen() > 0)
        uids = [uid for _ in range(6) for uid in acquisition.run(bp.count([det], 3))]

        def shows_every_run() -> bool:
            screen = pane.screen()
            history = screen.split("last runs")[-1]
            return all(uid[:8] in history for uid in uids[-MIN_RUNS_SHOWN:]) and "q or Ctrl+C quits" in screen

        try:
            wait_until(shows_every_run, 30, what="the newest runs in the history and the footer on 80x24")
        except TimeoutError:
            pytest.fail("screen was:\n" + pane.screen())
        lines = pane.screen().rstrip("\n").split("\n")
        assert len(lines) <= 24 and max(len(line) for line in lines) <= 80
        assert "tiled-writer-sidecar monitor" in lines[0]  # the header was not scrolled away
        pane.tmux("send-keys", "-t", "mon", "q")
        assert wait_until(pane.exit_status, 30, what="the monitor to exit on q") == "0"
        assert "Traceback" not in pane.screen()


def test_render_fits_the_height_it_is_given() -> None:
    """render(..., height) never takes more lines than that: compact panels, then fewer history rows."""
    with Acquisition(None, md={"scan_id": 1}) as acq:
        acq.run(bp.scan([det1], motor, 0, 1, 9))
        for _ in range(12):
            acq.run(bp.count([det1], 2))
        state = MonitorState(address="tcp://127.0.0.1:5578", sidecar_url="http://127.0.0.1:9/healthz")
        for name, doc in acq.documents:
            state.feed(name, doc)
    state.set_health(None, "nothing listens there (sidecar not running?)")
    for width, height in ((80, 24), (100, 30), (140, 45), (80, 60)):
        console = Console(record=True, width=width, force_terminal=False)
        console.print(render(state.snapshot(), width, height))
        shown = console.export_text().rstrip("\n").split("\n")
        assert len(shown) <= height, (width, height, len(shown))
        assert "last runs" in "\n".join(shown) and "q or Ctrl+C quits" in shown[-1]


def test_a_slow_terminal_loses_no_events(proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path) -> None:
    """Nobody reads the monitor's pseudo-terminal while 3000 events are published, so rendering blocks
    on a full pty; once the terminal is read again the screen shows all 3000 events, no gap."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 45, 140, 0, 0))
    config = tmp_path / "monitor.toml"
    config.write_text("")
    process = subprocess.Popen(
        [
            *sidecar_command(),
            "monitor",
            "--config",
            str(config),
            "--zmq",
            proxy.out_address,
            "--sidecar",
            nobody_listens(),
        ],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "140", "LINES": "45"},
    )
    os.close(slave)
    output = bytearray()

    def read_available() -> str:
        while select.select([master], [], [], 0)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output.extend(chunk)
        return ANSI.sub("", output[-20000:].decode(errors="replace"))

    try:

        def messages_seen() -> bool:
            found = re.findall(r"([\d,]+) messages", read_available())
            return bool(found) and int(found[-1].replace(",", "")) > 0

        acquisition.wait_subscribers(messages_seen)
        read_available()
        # Stop reading: the pty fills up and the monitor's renderer blocks on write.
        (uid,) = acquisition.run(bp.count([det], 3000))
        pending = struct.unpack("i", fcntl.ioctl(master, termios.FIONREAD, b"\0\0\0\0"))[0]
        assert pending >= 4095, "the pty's line buffer (4095 bytes) should be full"
        assert process.poll() is None

        def shows_all() -> bool:
            return re.search(r"primary\s+3000\s", read_available()) is not None

        wait_until(shows_all, 60, what="3000 events on the screen")
        text = read_available()
        assert "gaps detected: 0" in text
        assert uid[:8] in text
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        os.close(master)


def test_sidecar_panel_from_the_real_daemon(
    tiled_server: TiledServer,
    proxy: ZmqProxy,
    acquisition: Acquisition,
    tmp_path: Path,
    monitor: Callable[..., MonitorProcess],
) -> None:
    """Real proxy, RunEngine, sidecar daemon and Tiled: the monitor sees the scan and, from /healthz,
    Tiled up, the run uploaded, an empty backlog and the uploaded document count."""
    with make_sidecar(tmp_path, proxy, tiled_server) as sidecar:
        mon = monitor(
            "--zmq",
            proxy.out_address,
            "--sidecar",
            sidecar.health_url,
            "--once",
            "--json",
            "--seconds",
            "120",
        )
        acquisition.wait_subscribers(
            lambda: sidecar.messages_seen() > 0 and "receiving from proxy" in mon.log()
        )
        (uid,) = acquisition.run(bp.count([det], 25))
        sidecar.wait_drained([uid])
        # uploader.json (behind /healthz) is rewritten about once a second: wait for its counters.
        sent = len(run_documents(acquisition.documents, uid))
        wait_until(lambda: sidecar.health()["upload"]["documents"] >= sent, 30, what="/healthz counters")
        mon.wait_log(f"run stop uid={uid}")
        snap = mon.snapshot()
    assert_run_matches(snap["runs"][0], acquisition.documents, uid)
    health = snap["sidecar"]["health"]
    assert snap["sidecar"]["state"] == "up"
    assert health["tiled"]["state"] == "up"
    assert health["spool"]["backlog_documents"] == 0
    assert health["upload"]["documents"] == sent
    uploaded = {run["uid"]: run for run in health["runs"]}
    assert uploaded[uid]["state"] == "uploaded"
    assert uploaded[uid]["uploaded_documents"] == len(run_documents(acquisition.documents, uid))


# ------------------------------------------------------------ hostile input
def hostile_snapshot() -> dict[str, Any]:
    """A snapshot after a run with markup and escape sequences in its names, and a hostile /healthz."""
    state = MonitorState(address="tcp://127.0.0.1:5578", sidecar_url="http://127.0.0.1:9/healthz")
    uid = "r-hostile\n"
    for name, doc in [
        ("start", {"uid": uid, "time": 1.7e9, "scan_id": "[bold]", "plan_name": "[/bold]\x1b[2J"}),
        ("descriptor", {"uid": "d1", "run_start": uid, "name": "[/y]\n", "data_keys": {}}),
        ("event", {"descriptor": "d1", "seq_num": 1, "data": {}}),
        ("stop", {"run_start": uid, "time": 1.7e9 + 1, "exit_status": "[/]", "reason": "\x1b]52;c;aGk=\x07"}),
    ]:
        state.feed(name, doc)
    state.set_health(
        {
            "status": "[/red]",
            "reasons": ["\x1b[31mred\r"],
            "tiled": {"state": "[/x]", "since": float("inf"), "last_error": "[/e]\n"},
            "spool": {"backlog_documents": "lots", "backlog_bytes": 10**400},
            "upload": {"rows": "x", "last_lag_seconds": float("nan")},
            "runs": [{"uid": uid, "state": "[/s]", "documents": "?"}, "not a run"],
        }
    )
    return state.snapshot()


def test_render_shows_markup_and_escape_sequences_literally() -> None:
    """A plan '[/bold]\\x1b[2J', a stream '[/y]\\n', a uid ending in a newline and a /healthz body
    of wrong types: the screen renders (no MarkupError, no TypeError), shows each name escaped, and
    writes no ESC, CR or BEL of the data's to the terminal."""
    snap = hostile_snapshot()
    console = Console(
        record=True, width=200, force_terminal=True, color_system="truecolor", file=io.StringIO()
    )
    console.print(render(snap, 200))
    raw = console.file.getvalue()  # type: ignore[attr-defined]
    text = console.export_text()
    assert "plan [/bold]\\x1b[2J" in text
    assert re.search(r"\[/y\]\\n\s+1\s", text)
    assert "uid r-hostile\\n" in text
    assert "\\x1b]52;c;aGk=\\x07" in text and "[/e]\\n" in text and "\\x1b[31mred\\r" in text
    data_controls = re.sub(r"\x1b\[[0-9;]*m", "", raw).replace("\n", "")
    assert not re.search(r"[\x00-\x1f\x7f-\x9f]", data_controls), repr(data_controls)


def test_connection_state_follows_the_subscription_counters(caplog: pytest.LogCaptureFixture) -> None:
    """The monitor reads the shared Subscription's state now and then: a refused attempt shows
    "nothing listens there yet", and a reconnection that happened between two looks (connects
    went up while it looked connected) is still logged as a went-away and counted as a connect."""
    state = MonitorState()
    subscriber = Subscriber(ZmqConfig(address=f"tcp://127.0.0.1:{free_port()}"), state)
    subscription = subscriber.subscription
    caplog.set_level(logging.INFO, logger="tiled_writer_sidecar.tools.monitor.main")
    try:
        subscription.retries += 1
        subscriber._follow_connection()
        assert (state.connection, state.connects) == ("connecting", 0)
        assert "bluesky-0MQ-proxy" in state.connection_detail
        subscription.connects, subscription.connected = 1, True
        subscriber._follow_connection()
        assert (state.connection, state.connects) == ("connected", 1)
        subscription.connects = 2  # disconnected and connected again between two looks
        subscriber._follow_connection()
        assert (state.connection, state.connects) == ("connected", 2)
        assert caplog.text.count("went away") == 1 and caplog.text.count("connected to proxy") == 2
        subscription.connected = False
        subscriber._follow_connection()
        assert state.connection == "disconnected"
        subscription.problem = "the proxy refused the subscription: authentication refused"
        subscriber._follow_connection()
        assert state.connection == "error" and "CURVE" in state.connection_detail
    finally:
        subscriber.stop()


def test_any_exception_from_the_decoder_is_counted_not_raised() -> None:
    """A decoder that raises something other than RejectedMessage (a bug, MemoryError...) costs that
    one message: counted as decode-error, its message escaped in the error line, the next decodes."""
    calls = iter([MemoryError("boom\x1b[2J"), ("start", {"uid": "r1", "time": 1.0})])

    def flaky(frames: list[bytes], **kwargs: Any) -> tuple[str, dict[str, Any]]:
        outcome = next(calls)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    state = MonitorState()
    subscriber = Subscriber(ZmqConfig(address=f"tcp://127.0.0.1:{free_port()}"), state, decode=flaky)
    try:
        subscriber.handle([b"x"])
        subscriber.handle([b"y"])
    finally:
        subscriber.stop()
    snap = state.snapshot()
    assert snap["zmq"]["rejected"] == {"decode-error": 1}
    assert snap["zmq"]["last_error"] == "decode: MemoryError: boom\\x1b[2J"
    assert snap["run"]["uid"] == "r1"


def test_an_oversized_message_is_counted_and_the_subscription_survives(
    proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path, monitor: Callable[..., MonitorProcess]
) -> None:
    """[zmq] max_message_bytes = 64 KiB and a 1 MiB frame through the real proxy: the monitor counts
    it as oversized and still receives the next run whole (with ZMQ_MAXMSGSIZE, libzmq dropped the
    connection to the proxy instead and nothing more arrived)."""
    config = tmp_path / "small.toml"
    config.write_text('[log]\nlevel = "INFO"\n[zmq]\nmax_message_bytes = 65536\n')
    mon = monitor(
        "--config", str(config), "--zmq", proxy.out_address, "--sidecar", nobody_listens(),
        "--once", "--json", "--seconds", "120",
    )  # fmt: skip
    acquisition.wait_subscribers(lambda: "receiving from proxy" in mon.log())
    assert acquisition.publisher is not None
    acquisition.publisher.send_raw(b" start " + b"x" * 2**20)
    (uid,) = acquisition.run(bp.count([det], 5))
    mon.wait_log(f"run stop uid={uid}")
    snap = mon.snapshot()
    assert snap["zmq"]["rejected"].get("oversized") == 1
    assert_run_matches(snap["runs"][0], acquisition.documents, uid)


def test_live_view_log_lines_are_escaped() -> None:
    """In the live view, warnings go through rich above the screen: a hostile message (markup,
    ESC, newline) prints as one escaped line, never as markup or a terminal control."""
    from tiled_writer_sidecar.tools.monitor.main import _quiet_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, color_system="truecolor", width=200)
    try:
        _quiet_logging(console)
        logging.getLogger("tiled_writer_sidecar.monitor").warning("proxy said [/bold]\x1b[2J\nFORGED")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    out = buffer.getvalue()
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert "proxy said [/bold]\\x1b[2J\\nFORGED" in plain
    assert plain.count("\n") == 1 and "\x1b" not in plain
