"""`status` shows what documents named, escaped: never markup, never a control character.

The spool is written with the package's own `Received`/`Uploaded` files,
holding what a hostile RunEngine (or a uid that ends in a newline) leaves
there: a plan name that is rich markup plus an ESC sequence, stream names
with newlines, a quarantine reason with an OSC 52 clipboard write. The
renderer is checked in process, and the console script in a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from tiled_writer_sidecar.commands.status import (
    CHECK_CRIT_AGE_S,
    CHECK_WARN_AGE_S,
    check_report,
    print_status,
    status_report,
)
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.state_files import Received, Uploaded
from tiled_writer_sidecar.testing.sidecar import sidecar_command

PLAN = "[/bold]\x1b[2J"
STREAM = "[/y]\n"
UID_NEWLINE = "5a2c4e1e-0000-4000-8000-000000000001\n"
REASON = "Tiled said no: [red]\x1b]52;c;aGk=\x07\rOK"
CONTROL = "\x1b\r\x07\n\u202e"


def hostile_spool(root: Path) -> SpoolDir:
    """Two runs: hostile names in a pending run; a quarantined run whose uid ends in a newline."""
    spool = SpoolDir(root)
    spool.runs_dir.mkdir(exist_ok=True)
    first = spool.run_dir("run-hostile-names")
    first.mkdir()
    Received(
        uid="run-hostile-names",
        scan_id=3,
        plan_name=PLAN,
        documents=7,
        events={STREAM: 2},
        missing={STREAM: 1},
        expected_events={STREAM: 4, "primary\u202e": 1},
        closed=True,
        stop_received=True,
    ).save(first)
    second = spool.run_dir("run-newline-uid")
    second.mkdir()
    Received(uid=UID_NEWLINE, scan_id=4, plan_name="count", documents=3, closed=True).save(second)
    Uploaded(state="quarantined", reason=REASON, damage=[f"bad record in {STREAM}"]).save(second)
    return spool


def rendered(report: dict[str, object]) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=400)
    print_status(report, False, console)
    return buffer.getvalue()


def test_table_shows_markup_and_controls_escaped(tmp_path: Path) -> None:
    """The table prints (no MarkupError) every hostile name literally, controls as escapes, and
    no control character at all."""
    out = rendered(status_report(hostile_spool(tmp_path / "spool")))
    assert "[/bold]\\x1b[2J" in out
    assert "[/y]\\n events missing" in out
    assert "5a2c4e1e-0000-4000-8000-000000000001\\n" in out
    assert "[red]\\x1b]52;c;aGk=\\x07\\rOK" in out
    assert "primary\\u202e" in out
    assert not any(c in out for c in CONTROL.replace("\n", "")), repr(out)
    assert all(line.count("\n") == 0 for line in out.splitlines())


def test_json_escapes_controls_and_keeps_the_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json: one object, no raw control character in the output, and the values decode back to
    exactly what the documents held."""
    report = status_report(hostile_spool(tmp_path / "spool"))
    print_status(report, True, Console(file=io.StringIO()))
    out = capsys.readouterr().out
    assert not any(c in out for c in CONTROL.replace("\n", ""))
    decoded = json.loads(out)
    runs = {r["uid"]: r for r in decoded["runs"]}
    assert runs["run-hostile-names"]["plan_name"] == PLAN
    assert runs[UID_NEWLINE]["reason"] == REASON


@pytest.mark.process
def test_status_command_exits_0_and_prints_escaped(tmp_path: Path) -> None:
    """The console script, table and --json, over the hostile spool: exit 0, no traceback, the
    names escaped (table) or JSON-escaped (--json)."""
    spool = hostile_spool(tmp_path / "spool")
    base = [*sidecar_command(), "status", "--spool-dir", str(spool.root)]
    table = subprocess.run(
        base, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "300"}
    )
    assert table.returncode == 0, table.stderr
    assert "Traceback" not in table.stderr
    assert "[/bold]\\x1b[2J" in table.stdout
    assert "\x1b" not in table.stdout
    as_json = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=120)
    assert as_json.returncode == 0, as_json.stderr
    assert "\x1b" not in as_json.stdout and "\\u001b[2J" in as_json.stdout
    assert json.loads(as_json.stdout)["runs"][0]["plan_name"] == PLAN


# ------------------------------------------------------------- status --check (issue 22)


def report(**changes: object) -> dict[str, object]:
    """A status report of a healthy sidecar with two uploaded runs, with `changes` applied."""
    base: dict[str, object] = {
        "runs": [{"state": "uploaded"}, {"state": "uploaded"}],
        "totals": {
            "runs": 2,
            "by_state": {"uploaded": 2},
            "gaps": 0,
            "oldest_unuploaded_age_seconds": None,
        },
        "receiver_running": True,
        "uploader_running": True,
        "uploader": {"tiled": "up"},
    }
    totals = dict(base["totals"])  # type: ignore[call-overload]
    for key in ("gaps", "oldest_unuploaded_age_seconds", "by_state"):
        if key in changes:
            totals[key] = changes.pop(key)
    return {**base, "totals": totals, **changes}


@pytest.mark.parametrize(
    ("changes", "code", "says"),
    [
        ({}, 0, "OK - 2 run(s), tiled up"),
        ({"uploader_running": False}, 1, "WARNING - uploader not running"),
        ({"uploader": {"tiled": "down"}}, 1, "WARNING - tiled down"),
        ({"gaps": 3}, 1, "WARNING - 3 events missing"),
        ({"by_state": {"uploaded": 1, "quarantined": 1}}, 1, "WARNING - 1 run(s) quarantined"),
        ({"oldest_unuploaded_age_seconds": 2000.0}, 1, "WARNING - oldest run waiting 2000 s"),
        ({"oldest_unuploaded_age_seconds": 20000.0}, 2, "CRITICAL - oldest run waiting 20000 s"),
        ({"uploader": {"tiled": "unauthorized"}}, 2, "CRITICAL - tiled unauthorized"),
        ({"uploader": {"tiled": "not_tiled"}, "gaps": 1}, 2, "CRITICAL - tiled not_tiled; 1 events missing"),
        ({"receiver_running": False, "uploader_running": False}, 2, "CRITICAL - receiver not running"),
    ],
)
def test_check_maps_each_finding_to_its_nagios_code(changes: dict[str, object], code: int, says: str) -> None:
    """The worst finding decides the exit code; the line lists every finding, then perfdata."""
    got, line = check_report(report(**changes), warn_age=CHECK_WARN_AGE_S, crit_age=CHECK_CRIT_AGE_S)
    assert got == code
    assert line.startswith(f"TILED-WRITER-SIDECAR {says} | runs=")
