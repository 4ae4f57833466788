"""`verify`: the spool's framing and CRC checked (`spool.check`), one line per segment, and an exit code."""

from __future__ import annotations

from pathlib import Path

from tiled_writer_sidecar.spool.check import verify_spool
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.text import clean


def verify(spool_dir: Path, *, repair: bool) -> int:
    """One line per segment and a total; 1 if a corruption or a torn tail is left unrepaired."""
    reports = verify_spool(SpoolDir(spool_dir, create=False), repair=repair)
    bad = 0
    for r in reports:
        problems = [r.problem] if r.problem else [f"{n} corrupt bytes at offset {o}" for o, n in r.corrupt]
        if r.torn_tail:
            problems.append(f"torn tail of {r.torn_tail} bytes" + (" (truncated)" if r.repaired else ""))
        if problems:
            bad += 1
        summary = "; ".join(problems) if problems else None
        print(
            clean(f"{r.run}/{r.segment}: {r.records} records" + (f": {summary}" if summary else ", ok"), 1000)
        )
    records = sum(r.records for r in reports)
    print(f"{len(reports)} segment(s), {records} records, {bad} with problems")
    unrepaired = any(r.corrupt or (r.torn_tail and not r.repaired) for r in reports)
    return 1 if unrepaired else 0
