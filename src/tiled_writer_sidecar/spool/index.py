"""The per-run view of the spool: what was received, what Tiled has.

Each run directory holds its log (segments) and two small JSON files, each
with exactly one writer and always replaced atomically (tmp, fsync, rename,
fsync dir), so a reader sees the old or the new version, never half of one:

- ``received.json`` — written by the receiver: run identity (uid, scan_id,
  plan), documents and bytes spooled, events per stream, gaps found
  (missing seq_nums, ``stop.num_events`` mismatches, a stop that never came),
  documents dropped (disk full), and ``closed`` once no more documents will
  be appended.
- ``uploaded.json`` — written by the uploader: ``uploading`` / ``uploaded`` /
  ``quarantined``, documents confirmed by Tiled, the reason for a
  quarantine, and how many attempts it took.

`RunView.state` combines both into the one word `status` reports.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

RECEIVED = "received.json"
UPLOADED = "uploaded.json"

STATES = ("receiving", "pending", "uploading", "uploaded", "incomplete", "quarantined")


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace `path` with `data` so that readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, json.dumps(data, sort_keys=True).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class Received:
    uid: str
    scan_id: int | None = None
    plan_name: str | None = None
    start_time: float | None = None
    first_received: float = field(default_factory=time.time)
    last_received: float = field(default_factory=time.time)
    documents: int = 0
    bytes: int = 0
    events: dict[str, int] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)
    expected_events: dict[str, int] | None = None
    stop_received: bool = False
    exit_status: str | None = None
    dropped: int = 0
    closed: bool = False
    close_reason: str | None = None

    @classmethod
    def load(cls, run_dir: Path) -> Received | None:
        data = read_json(run_dir / RECEIVED)
        if data is None:
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, run_dir: Path) -> None:
        atomic_write_json(run_dir / RECEIVED, asdict(self))

    def gaps(self) -> dict[str, int]:
        """Events missing per stream: seq_num holes and stop.num_events shortfalls."""
        gaps = {k: v for k, v in self.missing.items() if v}
        for stream, expected in (self.expected_events or {}).items():
            shortfall = expected - self.events.get(stream, 0) - gaps.get(stream, 0)
            if shortfall > 0:
                gaps[stream] = gaps.get(stream, 0) + shortfall
        return gaps

    def problems(self) -> list[str]:
        """Why this run is incomplete, one phrase each; empty if it is complete."""
        problems = [f"{n} {s} events missing" for s, n in sorted(self.gaps().items())]
        if self.closed and not self.stop_received:
            problems.append(f"stop never came ({self.close_reason or 'closed'})")
        if self.dropped:
            problems.append(f"{self.dropped} documents dropped (spool full)")
        return problems


@dataclass
class Uploaded:
    state: str = "pending"
    documents: int = 0
    attempts: int = 0
    reason: str | None = None
    damage: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    updated: float = field(default_factory=time.time)

    @classmethod
    def load(cls, run_dir: Path) -> Uploaded:
        data = read_json(run_dir / UPLOADED)
        if data is None:
            return cls()
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, run_dir: Path) -> None:
        self.updated = time.time()
        atomic_write_json(run_dir / UPLOADED, asdict(self))


@dataclass
class RunView:
    """One run as `status` shows it."""

    directory: Path
    received: Received
    uploaded: Uploaded

    @property
    def uid(self) -> str:
        return self.received.uid

    @property
    def state(self) -> str:
        up = self.uploaded.state
        if up == "quarantined":
            return "quarantined"
        if up == "uploaded":
            return "incomplete" if self.received.problems() or self.uploaded.damage else "uploaded"
        if not self.received.closed:
            return "uploading" if up == "uploading" else "receiving"
        return "uploading" if up == "uploading" else "pending"

    def as_dict(self) -> dict[str, Any]:
        r = self.received
        return {
            "uid": r.uid,
            "scan_id": r.scan_id,
            "plan_name": r.plan_name,
            "state": self.state,
            "documents": r.documents,
            "uploaded_documents": self.uploaded.documents,
            "bytes": r.bytes,
            "events": r.events,
            "gaps": r.gaps(),
            "problems": r.problems() + self.uploaded.damage,
            "closed": r.closed,
            "first_received": r.first_received,
            "last_received": r.last_received,
            "attempts": self.uploaded.attempts,
            "reason": self.uploaded.reason,
        }
