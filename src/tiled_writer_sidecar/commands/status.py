"""`status`: what the spool holds, per run and in total, as a table or JSON, or a monitoring check.

`check_report` is the one rule for ``status --check`` (Nagios plugin
convention: exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN; one line on stdout
with performance data after ``|``). CRITICAL: the receiver is not running,
Tiled refuses the API key or is not Tiled, or a run
has waited `crit_age` for upload. WARNING: the uploader is not running, Tiled
is down, a run is quarantined, events are missing, or a run has waited
`warn_age`.

Names in the spool come from documents (uid, plan name, stream names in the
problems, quarantine reasons): the table shows each through `text.clean` as a
plain rich `Text`, and the JSON escapes every control character.
"""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.orphans import orphan_report
from tiled_writer_sidecar.spool.state_files import (
    STATES,
    Backlog,
    RunState,
    UploaderStatus,
)
from tiled_writer_sidecar.states import TiledState
from tiled_writer_sidecar.text import clean, rich_text


def status_report(spool: SpoolDir) -> dict[str, Any]:
    views = spool.runs()
    runs = [view.as_dict() for view in views]
    now = time.time()
    oldest = Backlog.of(views).oldest
    orphans = orphan_report(spool)
    return {
        "spool": str(spool.root),
        "runs": runs,
        "totals": {
            "runs": len(runs),
            "documents": sum(r["documents"] for r in runs),
            "uploaded_documents": sum(r["uploaded_documents"] for r in runs),
            "bytes": spool.total_bytes(),
            "by_state": {s: sum(1 for r in runs if r["state"] == s) for s in STATES},
            "gaps": sum(sum(r["gaps"].values()) for r in runs),
            "oldest_unuploaded_age_seconds": now - oldest if oldest else None,
            "start_missing_runs": orphans["start_missing_runs"],
            "start_missing_documents": orphans["start_missing_documents"],
        },
        "start_missing": orphans["runs"],
        "receiver_running": spool.is_locked("receiver"),
        "uploader_running": spool.is_locked("uploader"),
        "uploader": uploader.fields_as_json() if (uploader := UploaderStatus.load(spool.root)) else None,
    }


OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
CHECK_NAMES = ("OK", "WARNING", "CRITICAL", "UNKNOWN")
CHECK_WARN_AGE_S = 1800.0  # as the alert rule TiledWriterSidecarBacklogOld
CHECK_CRIT_AGE_S = 4 * 3600.0


def check_report(report: dict[str, Any], *, warn_age: float, crit_age: float) -> tuple[int, str]:
    """(exit code, one line) for ``status --check``: the rule is the module docstring's."""
    totals = report["totals"]
    uploader = report.get("uploader") or {}
    tiled = TiledState.of(uploader.get("tiled"))
    age = totals["oldest_unuploaded_age_seconds"] or 0.0
    quarantined = totals["by_state"].get("quarantined", 0)
    backlog = sum(1 for r in report["runs"] if RunState(r["state"]).waiting)
    findings: list[tuple[int, str]] = []
    if not report["receiver_running"]:
        findings.append((CRITICAL, "receiver not running"))
    elif not report["uploader_running"]:
        findings.append((WARNING, "uploader not running"))
    if tiled.misconfigured:
        findings.append((CRITICAL, f"tiled {tiled}"))
    elif tiled == TiledState.DOWN:
        findings.append((WARNING, "tiled down"))
    if age >= crit_age or age >= warn_age:
        findings.append((CRITICAL if age >= crit_age else WARNING, f"oldest run waiting {age:.0f} s"))
    if quarantined:
        findings.append((WARNING, f"{quarantined} run(s) quarantined"))
    if totals["gaps"]:
        findings.append((WARNING, f"{totals['gaps']} events missing"))
    code = max((c for c, _ in findings), default=OK)
    summary = "; ".join(clean(message) for _, message in findings) or (
        f"{totals['runs']} run(s), tiled {clean(tiled)}"
    )
    perf = (
        f"runs={totals['runs']} backlog_runs={backlog} "
        f"oldest_age={age:.0f}s;{warn_age:.0f};{crit_age:.0f} gaps={totals['gaps']} quarantined={quarantined}"
    )
    return code, f"TILED-WRITER-SIDECAR {CHECK_NAMES[code]} - {summary} | {perf}"


def print_status(report: dict[str, Any], as_json: bool, console: Console) -> None:
    """Print `report`: JSON (every non-ASCII or control character \\u-escaped) or a table.

    Every value in the table comes from the spool, that is from documents: each
    is shown with `text.clean` as a plain `Text`, never as rich markup.
    """
    if as_json:
        print(json.dumps(report, indent=2, default=str, ensure_ascii=True))
        return
    table = Table(title=rich_text(f"spool {clean(report['spool'], 1000)}"))
    for column in ("uid", "scan_id", "plan", "state", "documents", "uploaded", "gaps / problems"):
        table.add_column(column)
    for run in report["runs"]:
        table.add_row(*_row(run))
    console.print(table)
    console.print(_totals_line(report["totals"]))
    if orphans := report.get("start_missing"):
        console.print(
            rich_text(
                f"{len(orphans)} run(s) with start missing (kept, not uploaded until it comes): "
                + ", ".join(f"{clean(o['uid'])} ({o['documents']} documents)" for o in orphans[:20]),
                limit=2000,
            )
        )
    uploader = report.get("uploader") or {}
    console.print(
        rich_text(
            f"receiver {'running' if report['receiver_running'] else 'not running'}, "
            f"uploader {'running' if report['uploader_running'] else 'not running'}"
            + (f", tiled {clean(uploader.get('tiled'))}" if uploader else "")
        )
    )
    if (drain := _drain_line(uploader)) is not None:
        console.print(drain)


def _drain_line(uploader: dict[str, Any]) -> Text | None:
    """The uploader's drain rate over the last minute and the backlog's ETA (None before a rate exists)."""
    runs_per_s, rows_per_s = uploader.get("runs_per_second"), uploader.get("rows_per_second")
    if not isinstance(runs_per_s, (int, float)) or not isinstance(rows_per_s, (int, float)):
        return None
    eta = uploader.get("backlog_eta_seconds")
    return rich_text(
        f"upload rate {runs_per_s:.2f} runs/s, {rows_per_s:.0f} rows/s (last minute); "
        f"backlog {uploader.get('backlog_runs', 0)} run(s)"
        + (f", ETA {eta:.0f} s" if isinstance(eta, (int, float)) else ""),
        limit=500,
    )


def _row(run: dict[str, Any]) -> list[Text]:
    problems = run.get("problems")
    reason = run.get("reason")
    notes = [clean(p) for p in problems] if isinstance(problems, list) else []
    attempts = run.get("attempts")
    if isinstance(attempts, int) and attempts > 1:
        notes.append(f"{attempts} attempts")
    if reason:
        notes.append(clean(reason, 500))
    return [
        rich_text(run.get("uid")),
        rich_text(run.get("scan_id")),
        rich_text(run.get("plan_name") or ""),
        rich_text(run.get("state")),
        rich_text(run.get("documents")),
        rich_text(run.get("uploaded_documents")),
        rich_text("; ".join(notes), limit=2000),
    ]


def _totals_line(totals: dict[str, Any]) -> Text:
    states = ", ".join(f"{n} {s}" for s, n in totals["by_state"].items() if n)
    age = totals["oldest_unuploaded_age_seconds"]
    return rich_text(
        f"{totals['runs']} run(s) ({states or 'none'}); {totals['documents']} documents, "
        f"{totals['uploaded_documents']} uploaded; {totals['bytes']} bytes in segments; "
        f"{totals['gaps']} events missing" + (f"; oldest not yet uploaded: {age:.0f} s" if age else ""),
        limit=2000,
    )
