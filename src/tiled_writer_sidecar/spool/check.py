"""`verify`: read every record of every run, check framing and CRC, report.

Reports, per run and segment, the records found, the corrupt byte ranges
(segment and offset) and torn tails. With ``repair``, torn tails (a record
cut short by a crash, at the end of a run's last segment) are truncated;
corruption in the middle is only reported (the uploader skips it and marks
the run incomplete). Repair refuses to touch a spool whose receiver runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import SpoolLockedError
from . import record
from .directory import SpoolDir
from .segment import list_segments, truncate_torn_tail


@dataclass
class SegmentReport:
    run: str
    segment: str
    records: int = 0
    corrupt: list[tuple[int, int]] = field(default_factory=list)
    torn_tail: int = 0
    repaired: bool = False


def verify_spool(spool: SpoolDir, repair: bool = False) -> list[SegmentReport]:
    if repair and spool.is_locked("receiver"):
        raise SpoolLockedError("the receiver is running on this spool; stop it before --repair")
    reports = []
    for run_dir in sorted(p for p in spool.runs_dir.iterdir() if p.is_dir()):
        segments = list_segments(run_dir)
        for i, path in enumerate(segments):
            data = path.read_bytes()
            report = SegmentReport(run_dir.name, path.name)
            end = 0
            for item in record.scan(data):
                if isinstance(item, record.Corruption):
                    report.corrupt.append((item.offset, item.length))
                else:
                    report.records += 1
                end = item.end
            if end < len(data):
                if i == len(segments) - 1:
                    report.torn_tail = len(data) - end
                    if repair:
                        truncate_torn_tail(path)
                        report.repaired = True
                else:
                    report.corrupt.append((end, len(data) - end))
            reports.append(report)
    return reports
