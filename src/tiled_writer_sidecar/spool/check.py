"""`verify`: read every record of every run, check framing and CRC, report.

Reports, per run and segment, the records found, the corrupt byte ranges
(segment and offset) and torn tails, in either format (v2, or v1 written by
an earlier release). With ``repair``, torn tails (a record cut short by a
crash, at the end of a run's last segment) are truncated; corruption in the
middle is only reported (the uploader skips it and marks the run
incomplete). Repair refuses to touch a spool whose receiver runs. Nothing is
opened through a symlink: a run directory or segment that is one (or is not
a regular file, or has other links) is reported and never read or written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tiled_writer_sidecar.errors import SpoolLockedError
from tiled_writer_sidecar.spool import record
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.segment import (
    NotRegularFile,
    detect_format,
    list_segments,
    open_in,
    scan_segment,
    tail_is_torn,
    truncate_tail_fd,
)


@dataclass
class SegmentReport:
    run: str
    segment: str
    records: int = 0
    corrupt: list[tuple[int, int]] = field(default_factory=list)
    torn_tail: int = 0
    repaired: bool = False
    #: Why the segment could not be checked (a symlink, a damaged file header), if so.
    problem: str | None = None
    format: str = ""


def verify_spool(spool: SpoolDir, repair: bool = False) -> list[SegmentReport]:
    if repair and spool.is_locked("receiver"):
        raise SpoolLockedError("the receiver is running on this spool; stop it before --repair")
    reports = []
    run_dirs, links = spool.run_listing()
    listed: list[tuple[str, Path | None]] = [(d.name, Path(d.path)) for d in run_dirs] + [
        (n, None) for n in links
    ]
    for name, run_dir in sorted(listed, key=lambda item: item[0]):
        if run_dir is None:
            reports.append(_refused(name, "(run directory)", "a symlink: not read, not repaired"))
            continue
        segments = list_segments(run_dir)
        for i, path in enumerate(segments):
            reports.append(_verify_segment(run_dir, path, last=i == len(segments) - 1, repair=repair))
    return reports


def _refused(run: str, segment: str, why: str) -> SegmentReport:
    # Shown as a corrupt range by callers that only know `corrupt`, so verify exits non-zero.
    return SegmentReport(run, f"{segment} ({why})", corrupt=[(0, 0)], problem=why)


def _verify_segment(run_dir: Path, path: Path, *, last: bool, repair: bool) -> SegmentReport:
    try:
        fd = open_in(run_dir, path.name, os.O_RDWR if repair and last else os.O_RDONLY, write=repair and last)
    except NotRegularFile:
        return _refused(run_dir.name, path.name, "a symlink or not a regular file: not read, not repaired")
    try:
        size = os.fstat(fd).st_size
        fmt = detect_format(fd)
        report = SegmentReport(run_dir.name, path.name, format=fmt.kind)
        if fmt.kind == "damaged":
            report.corrupt.append((0, size))
            report.problem = "neither a file header nor a record at its start: not read"
            return report
        if fmt.recovered:
            report.corrupt.append((0, record.FILE_HEADER_SIZE))
            report.problem = "file header damaged in both copies: its salt recovered from a record"
        end = fmt.first_record
        for item in scan_segment(fd, fmt, end, size):
            if isinstance(item, record.Corruption):
                report.corrupt.append((item.offset, item.length))
            else:
                report.records += 1
            end = item.end
        if end < size:
            if last and tail_is_torn(fd, fmt, end, size):
                report.torn_tail = size - end
                if repair:
                    truncate_tail_fd(fd)
                    report.repaired = True
            else:  # a damaged record at the end is kept and reported, never cut
                report.corrupt.append((end, size - end))
        return report
    finally:
        os.close(fd)
