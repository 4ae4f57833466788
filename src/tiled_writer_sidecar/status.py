"""`status`: what the spool holds, per run and in total, as a table or JSON."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from .spool.directory import SpoolDir
from .spool.index import STATES, read_json


def status_report(spool: SpoolDir) -> dict[str, Any]:
    runs = [view.as_dict() for view in spool.runs()]
    now = time.time()
    waiting = [r for r in runs if r["state"] in ("receiving", "pending", "uploading")]
    oldest = min((r["first_received"] for r in waiting), default=None)
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
        },
        "receiver_running": spool.is_locked("receiver"),
        "uploader_running": spool.is_locked("uploader"),
        "uploader": read_json(spool.root / "uploader.json"),
    }


def print_status(report: dict[str, Any], as_json: bool, console: Console) -> None:
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return
    table = Table(title=f"spool {report['spool']}")
    for column in ("uid", "scan_id", "plan", "state", "documents", "uploaded", "gaps / problems"):
        table.add_column(column)
    for run in report["runs"]:
        table.add_row(
            run["uid"],
            str(run["scan_id"]),
            run["plan_name"] or "",
            run["state"],
            str(run["documents"]),
            str(run["uploaded_documents"]),
            "; ".join(run["problems"] + ([run["reason"]] if run["reason"] else [])),
        )
    console.print(table)
    totals = report["totals"]
    states = ", ".join(f"{n} {s}" for s, n in totals["by_state"].items() if n)
    age = totals["oldest_unuploaded_age_seconds"]
    uploader = report.get("uploader") or {}
    console.print(
        f"{totals['runs']} run(s) ({states or 'none'}); {totals['documents']} documents, "
        f"{totals['uploaded_documents']} uploaded; {totals['bytes']} bytes in segments; "
        f"{totals['gaps']} events missing" + (f"; oldest not yet uploaded: {age:.0f} s" if age else "")
    )
    console.print(
        f"receiver {'running' if report['receiver_running'] else 'not running'}, "
        f"uploader {'running' if report['uploader_running'] else 'not running'}"
        + (f", tiled {uploader.get('tiled')}" if uploader else "")
    )
