"""Issue 12, class 7 (text part), end to end: text from documents never reaches a terminal or a
log line unescaped.

Everything is real: a RunEngine with `ophyd.sim` devices publishes through
bluesky's `Publisher` to `bluesky-0MQ-proxy`, the `tiled-writer-sidecar run`
daemon spools and uploads to a real Tiled, `monitor` runs live in a tmux
pane (its screen read with ``capture-pane``), and ``status`` runs as the
console script. The RunEngine's runs carry what an operator's typo or a
hostile plan can put into a name: a plan called ``[/bold]\\x1b[2J`` (rich
markup that closes nothing, then "clear screen"), a stream called
``[/y]\\n``, and a plan name holding a newline and a fake log line.
"""

from __future__ import annotations

import json
import re
import subprocess
import unicodedata
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import pytest
from ophyd.sim import det, det1

from tests.support.daemon import run_documents
from tests.support.monitor_pane import MonitorPane
from tiled_writer_sidecar.testing import (
    Acquisition,
    ZmqProxy,
    free_port,
    wait_until,
)
from tiled_writer_sidecar.testing.sidecar import SidecarProcess, sidecar_command

PLAN = "[/bold]\x1b[2J"
STREAM = "[/y]\n"
FORGING_PLAN = (
    "count\n2026-01-01 00:00:00,000 ERROR tiled_writer_sidecar.receive.receiver: SPOOL NOT WRITABLE"
)
#: What `text.clean` makes of them.
PLAN_SHOWN = "[/bold]\\x1b[2J"
STREAM_SHOWN = "[/y]\\n"
#: A line of the daemon's log: role, timestamp, level, logger (or the harness's start header).
LOG_LINE = re.compile(
    r"^(\[(receiver|uploader)\] )?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: "
    r"|^==== "
)


def hostile_plan(plan_name: str, stream: str, points: int) -> Any:
    """One run named `plan_name`: `points` readings of det1 into `stream`, and one into primary."""

    @bpp.run_decorator(md={"plan_name": plan_name})  # type: ignore[untyped-decorator]
    def inner() -> Any:
        for _ in range(points):
            yield from bps.trigger_and_read([det1], name=stream)
        yield from bps.trigger_and_read([det])

    return inner()


def status(sidecar: SidecarProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*sidecar_command(), "status", "--spool-dir", str(sidecar.spool_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**sidecar.env, "COLUMNS": "250"},
    )


def unsafe(text: str) -> list[str]:
    """Control characters other than the line ends, C1, bidi controls, U+2028/9."""
    return [
        c
        for c in text
        if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") and not c.isprintable()
    ]


def test_hostile_names_are_escaped_in_status_monitor_and_the_log(
    sidecar: SidecarProcess, proxy: ZmqProxy, acquisition: Acquisition, tmp_path: Path
) -> None:
    """Two RunEngine runs through the real proxy into the running daemon, watched by a live monitor:
    one whose plan is '[/bold]\\x1b[2J' with a stream '[/y]\\n', one whose plan name holds a newline
    and a fake log line. `status` and `status --json` exit 0 and print the names escaped; the
    monitor keeps running and shows them escaped; every line of the daemon's log starts with its
    timestamp prefix and holds no control character."""
    nobody = f"http://127.0.0.1:{free_port()}"
    with MonitorPane(tmp_path, zmq=proxy.out_address, sidecar=nobody, width=160) as pane:
        acquisition.wait_subscribers(lambda: pane.messages_on_screen() > 0)
        (forging,) = acquisition.run(hostile_plan(FORGING_PLAN, "main", 2))
        (hostile,) = acquisition.run(hostile_plan(PLAN, STREAM, 3))

        # The monitor shows the hostile run's names escaped, and keeps running.
        def shows_the_run() -> bool:
            text = pane.screen()
            if "monitor exit status" in text:
                raise AssertionError("the monitor exited:\n" + text)
            return (
                f"plan {PLAN_SHOWN}" in text
                and re.search(re.escape(STREAM_SHOWN) + r"\s+3\s", text) is not None
            )

        try:
            wait_until(shows_the_run, 60, what="the hostile run, escaped, on the monitor's screen")
        except TimeoutError:
            pytest.fail("screen was:\n" + pane.screen())
        assert hostile in pane.screen()

        # status: both runs spooled whole (their stops arrived), then the table and the JSON.
        docs = acquisition.documents
        sent = {uid: len(run_documents(docs, uid)) for uid in (forging, hostile)}

        def spooled() -> bool:
            runs = {r["uid"]: r for r in sidecar.status()["runs"]}
            return all(uid in runs and runs[uid]["documents"] == n for uid, n in sent.items())

        wait_until(spooled, 60, interval=0.25, what="both runs spooled")
        table = status(sidecar)
        assert table.returncode == 0, table.stderr
        assert "Traceback" not in table.stderr
        assert PLAN_SHOWN in table.stdout
        assert "count\\n2026-01-01" in table.stdout
        assert unsafe(table.stdout) == [], repr(table.stdout)
        as_json = status(sidecar, "--json")
        assert as_json.returncode == 0, as_json.stderr
        assert unsafe(as_json.stdout) == []
        runs = {r["uid"]: r for r in json.loads(as_json.stdout)["runs"]}
        assert runs[hostile]["plan_name"] == PLAN
        assert runs[forging]["plan_name"] == FORGING_PLAN

        # The monitor is still running after a few more frames; Ctrl+C ends it with status 0.
        messages = pane.messages_on_screen()
        acquisition.wait_subscribers(lambda: pane.messages_on_screen() > messages)
        assert "monitor exit status" not in pane.screen()
        assert pane.interrupt() == "0"
        assert "Traceback" not in pane.screen()

    # The daemon's log: one line per event, none forged, no control character.
    log = sidecar.process.log_path.read_bytes().decode("utf-8", "replace")
    forged = [line for line in log.splitlines() if not LOG_LINE.match(line)]
    assert forged == [], "\n".join(forged[:20])
    assert unsafe(log) == []
    # The names did reach the log (the run start lines), escaped (by the formatter, or by repr).
    assert PLAN_SHOWN in log
    assert "count\\n2026-01-01 00:00:00,000 ERROR" in log
    assert sidecar.process.running
