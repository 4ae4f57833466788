"""The sidecar's health: one snapshot, the body of ``/healthz`` and systemd's STATUS line.

`health_snapshot` reads the receiver's counters (`stats.ReceiverStats`), its
`RunLedger` (the runs not yet finished, kept incrementally: a snapshot reads
at most `CHECKS_PER_SNAPSHOT` ``uploaded.json`` files and the newest
`RECENT_RUNS` runs, never the whole spool; without a ledger it lists the
spool) and the uploader's ``uploader.json`` (`spool.index.UploaderStatus`). It is unhealthy only when the sidecar cannot
receive or spool (receiver loop stalled, spool not writable or full, the
subscription broken); Tiled being down is reported but is not unhealthy:
the sidecar is built for that. ``as_dict`` is the JSON the monitor reads.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .spool.directory import SpoolDir
from .spool.index import Received, RunView, Uploaded, UploaderStatus
from .stats import ReceiverStats

LOOP_STALL_SECONDS = 10.0
RECENT_RUNS = 20  # runs listed in the snapshot, newest last
CHECKS_PER_SNAPSHOT = 64  # uploaded.json files a snapshot reads: the oldest waiting runs, then in turn
NO_UPLOADER_YET = UploaderStatus(
    tiled="unknown"
)  # before the first uploader.json: zero counts (never changed)


class RunLedger:
    """The runs the uploader has not finished, kept by the receiver as it spools (O(1) per run).

    `add` a run as it starts (its `Received` is the live one, so its counts
    need no update); `load` the runs found in the spool at start-up. Which
    runs are finished is learnt from their ``uploaded.json``, a bounded
    number per `waiting` call: the oldest waiting runs first (the uploader
    finishes those first), then the others in turn.
    """

    def __init__(self, spool: SpoolDir) -> None:
        self.spool = spool
        self.lock = threading.Lock()
        self.runs = 0  # runs spooled: found at start-up and started since
        self.pending: dict[
            str, tuple[Received, int]
        ] = {}  # uid -> (received, uploaded documents), oldest first
        self.recent: deque[str] = deque(maxlen=RECENT_RUNS)
        self._turn = 0

    def load(self, views: Iterable[RunView]) -> None:
        """The runs of the spool at start-up (oldest first)."""
        with self.lock:
            for view in views:
                self.runs += 1
                self.recent.append(view.uid)
                if not view.uploaded.state.finished:
                    self.pending[view.uid] = (view.received, view.uploaded.documents)

    def add(self, received: Received) -> None:
        """A run started (or was adopted): it waits for the uploader."""
        with self.lock:
            if received.uid not in self.pending:
                self.runs += 1
                self.recent.append(received.uid)
            self.pending[received.uid] = (received, 0)

    def waiting(self) -> list[tuple[Received, int]]:
        """The runs not yet finished, oldest first, after reading a bounded number of ``uploaded.json``."""
        with self.lock:
            uids = list(self.pending)
            n = CHECKS_PER_SNAPSHOT // 2
            rest = uids[n:]
            start = self._turn % len(rest) if rest else 0
            checks = uids[:n] + (rest[start:] + rest[:start])[: CHECKS_PER_SNAPSHOT - n]
            self._turn = start + CHECKS_PER_SNAPSHOT - n
            for uid in checks:
                directory = self.spool.runs_dir / uid
                uploaded = Uploaded.load(directory)
                if uploaded.state.finished or not directory.is_dir():
                    del self.pending[uid]
                else:
                    self.pending[uid] = (self.pending[uid][0], uploaded.documents)
            return list(self.pending.values())

    def newest(self) -> list[RunView]:
        """The `RECENT_RUNS` newest runs as `status` shows them (those still in the spool)."""
        with self.lock:
            uids = list(self.recent)
        views = []
        for uid in uids:
            directory: Path = self.spool.runs_dir / uid
            received = Received.load(directory)
            if received is not None:
                views.append(RunView(directory, received, Uploaded.load(directory)))
        return views


@dataclass(frozen=True)
class ReceiverHealth:
    connected: bool
    messages: int
    documents: int
    rejected: dict[str, int]
    gaps: int
    dropped: int
    last_message_age_seconds: float | None


@dataclass(frozen=True)
class SpoolHealth:
    directory: str
    bytes: int
    runs: int
    backlog_runs: int
    backlog_documents: int
    backlog_bytes: int
    oldest_unuploaded_age_seconds: float | None
    writable: bool


@dataclass(frozen=True)
class TiledHealth:
    state: str
    since: float | None
    last_error: str | None


@dataclass(frozen=True)
class UploadHealth:
    documents: int
    rows: int
    runs_uploaded: int
    runs_quarantined: int
    retries: int
    last_lag_seconds: float | None
    status_age_seconds: float | None  # None: no uploader.json yet


@dataclass(frozen=True)
class Health:
    status: str  # "ok" or "unhealthy"
    reasons: list[str]
    receiver: ReceiverHealth
    spool: SpoolHealth
    tiled: TiledHealth
    upload: UploadHealth
    runs: list[dict[str, Any]]

    @property
    def healthy(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def status_line(self) -> str:
        """One line for systemd's STATUS=."""
        return (
            f"received {self.receiver.documents} docs; backlog {self.spool.backlog_documents} docs in "
            f"{self.spool.backlog_runs} run(s); tiled {self.tiled.state}"
        )


def health_snapshot(stats: ReceiverStats, spool: SpoolDir, loop_beat: float) -> Health:
    """The sidecar's state now; `loop_beat` is when the receiver loop last went round."""
    now = time.time()
    ledger = stats.ledger
    if ledger is not None:
        waiting = ledger.waiting()
        runs_count, newest = ledger.runs, ledger.newest()
    else:  # no receiver keeps a ledger (a test, a tool): list the spool
        views = spool.runs()
        waiting = [(r.received, r.uploaded.documents) for r in views if not r.uploaded.state.finished]
        runs_count, newest = len(views), views[-RECENT_RUNS:]
    oldest = min((received.first_received for received, _ in waiting), default=None)
    uploader = UploaderStatus.load(spool.root)
    known = uploader or NO_UPLOADER_YET
    reasons = []
    if now - loop_beat > LOOP_STALL_SECONDS:
        reasons.append(f"receiver loop stalled for {now - loop_beat:.0f} s")
    if not stats.spool_writable:
        reasons.append("spool is not writable or full; documents are being dropped")
    if stats.subscription_problem:
        reasons.append(stats.subscription_problem)
    return Health(
        status="unhealthy" if reasons else "ok",
        reasons=reasons,
        receiver=ReceiverHealth(
            connected=stats.connected,
            messages=stats.messages,
            documents=sum(stats.documents.values()),
            rejected=dict(stats.rejected),
            gaps=stats.gaps,
            dropped=stats.dropped,
            last_message_age_seconds=now - stats.last_message if stats.last_message else None,
        ),
        spool=SpoolHealth(
            directory=str(spool.root),
            bytes=stats.spool_bytes,
            runs=runs_count,
            backlog_runs=len(waiting),
            backlog_documents=sum(max(0, received.documents - up) for received, up in waiting),
            backlog_bytes=sum(received.bytes for received, _ in waiting),
            oldest_unuploaded_age_seconds=now - oldest if oldest else None,
            writable=stats.spool_writable,
        ),
        tiled=TiledHealth(
            state=known.tiled,
            since=uploader.since if uploader else None,
            last_error=uploader.last_error if uploader else None,
        ),
        upload=UploadHealth(
            documents=known.documents,
            rows=known.rows,
            runs_uploaded=known.runs_uploaded,
            runs_quarantined=known.runs_quarantined,
            retries=known.retries,
            last_lag_seconds=known.last_lag_seconds,
            status_age_seconds=now - uploader.updated if uploader else None,
        ),
        runs=[r.as_dict() for r in newest],
    )
