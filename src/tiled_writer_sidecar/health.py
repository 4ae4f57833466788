"""The sidecar's health: one snapshot, the body of ``/healthz`` and systemd's STATUS line.

`health_snapshot` reads the receiver's counters (`stats.ReceiverStats`), its
`RunLedger` (the runs not yet finished, kept incrementally: a snapshot reads
at most `CHECKS_PER_SNAPSHOT` ``uploaded.json`` files and the newest
`RECENT_RUNS` runs, never the whole spool; without a ledger it lists the
spool) and the uploader's ``uploader.json`` (`spool.index.UploaderStatus`). It is unhealthy only when the sidecar cannot
receive or spool (receiver loop stalled, spool not writable or full, the
subscription broken); Tiled being down is reported but is not unhealthy:
the sidecar is built for that. It is "degraded" (still HTTP 200) with
`warnings` when it runs but cannot do its job: no proxy connection for
`subscription.NO_PROXY_WARN_S`, or Tiled refusing the API key or not being
Tiled. ``as_dict`` is the JSON the monitor reads.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from .spool.directory import SpoolDir
from .spool.index import Backlog, Received, RunView, Uploaded, UploaderStatus
from .states import HealthStatus, TiledState
from .stats import ReceiverStats

LOOP_STALL_SECONDS = 10.0
RECENT_RUNS = 20  # runs listed in the snapshot, newest last
CHECKS_PER_SNAPSHOT = 64  # uploaded.json files a snapshot reads: the oldest waiting runs, then in turn
#: Before the first uploader.json: zero counts (never changed).
NO_UPLOADER_YET = UploaderStatus(tiled=TiledState.UNKNOWN)


class RunLedger:
    """The runs the uploader has not finished, kept by the receiver as it spools (O(1) per run).

    `note` a run as it starts, closes or is reopened (its `Received` is the
    live one: an open run's counts need no update); `load` the runs found in
    the spool at start-up. The backlog's totals are running sums over the
    closed runs plus a sum over the open ones (few). Which runs are finished
    is learnt from their ``uploaded.json``, a bounded number per `backlog`
    call: the oldest waiting runs first (the uploader finishes those first),
    then the others in turn.
    """

    def __init__(self, spool: SpoolDir) -> None:
        self.spool = spool
        self.lock = threading.Lock()
        self.runs = 0  # runs spooled: found at start-up and started since
        self.pending: dict[str, list[Any]] = {}  # uid -> [received, uploaded documents], oldest first
        self.open: set[str] = set()  # pending runs still receiving (their counts change)
        self.closed_documents = self.closed_bytes = 0  # backlog of the pending closed runs
        self.recent: deque[str] = deque(maxlen=RECENT_RUNS)
        self._turn = 0

    def load(self, views: Iterable[RunView]) -> None:
        """The runs of the spool at start-up (oldest first)."""
        for view in views:
            if view.uploaded.state.finished:
                with self.lock:
                    self.runs += 1
                    self.recent.append(view.uid)
            else:
                self.note(view.received, view.uploaded.documents)

    def note(self, received: Received, uploaded: int = 0) -> None:
        """A run started, closed or was reopened (`received` is its current state)."""
        with self.lock:
            uid = received.uid
            entry = self.pending.get(uid)
            if entry is None:
                self.runs += 1
                self.recent.append(uid)
                entry = self.pending[uid] = [received, uploaded]
            elif uid not in self.open:
                self._count(entry, -1)
            entry[0] = received
            if received.closed:
                self.open.discard(uid)
                self._count(entry, 1)
            else:
                self.open.add(uid)

    def _count(self, entry: list[Any], sign: int) -> None:
        received, uploaded = entry
        self.closed_documents += sign * max(0, received.documents - uploaded)
        self.closed_bytes += sign * received.bytes

    def backlog(self) -> tuple[int, int, int, float | None]:
        """Runs, documents and bytes not yet uploaded, and the oldest run's first document time, after
        reading a bounded number of ``uploaded.json``."""
        with self.lock:
            uids = list(islice(self.pending, CHECKS_PER_SNAPSHOT // 2))
            rest = len(self.pending) - len(uids)
            if rest > 0:
                start = len(uids) + self._turn % rest
                uids += list(islice(self.pending, start, start + CHECKS_PER_SNAPSHOT - len(uids)))
                self._turn += CHECKS_PER_SNAPSHOT - CHECKS_PER_SNAPSHOT // 2
            for uid in uids:
                self._check(uid)
            documents, size = self.closed_documents, self.closed_bytes
            for uid in self.open:
                received, uploaded = self.pending[uid]
                documents += max(0, received.documents - uploaded)
                size += received.bytes
            oldest = self.pending[next(iter(self.pending))][0].first_received if self.pending else None
            return len(self.pending), documents, size, oldest

    def _check(self, uid: str) -> None:
        """Read one run's ``uploaded.json``: forget it if finished, else update what Tiled has."""
        directory = self.spool.runs_dir / uid
        uploaded = Uploaded.load(directory)
        entry = self.pending[uid]
        closed = uid not in self.open
        if closed:
            self._count(entry, -1)
        if uploaded.state.finished or not directory.is_dir():
            del self.pending[uid]
            self.open.discard(uid)
            return
        entry[1] = uploaded.documents
        if closed:
            self._count(entry, 1)

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
    state: TiledState
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
    status: HealthStatus  # ok, degraded (warnings) or unhealthy (reasons)
    reasons: list[str]
    warnings: list[str]
    receiver: ReceiverHealth
    spool: SpoolHealth
    tiled: TiledHealth
    upload: UploadHealth
    runs: list[dict[str, Any]]

    @property
    def healthy(self) -> bool:
        return self.status != HealthStatus.UNHEALTHY

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
        backlog_runs, backlog_documents, backlog_bytes, oldest = ledger.backlog()
        runs_count, newest = ledger.runs, ledger.newest()
    else:  # no receiver keeps a ledger (a test, a tool): list the spool
        views = spool.runs()
        backlog = Backlog.of(views)
        backlog_runs, backlog_documents, backlog_bytes = backlog.runs, backlog.documents, backlog.bytes
        oldest = backlog.oldest
        runs_count, newest = len(views), views[-RECENT_RUNS:]
    uploader = UploaderStatus.load(spool.root)
    known = uploader or NO_UPLOADER_YET
    reasons = []
    if now - loop_beat > LOOP_STALL_SECONDS:
        reasons.append(f"receiver loop stalled for {now - loop_beat:.0f} s")
    if not stats.spool_writable:
        reasons.append("spool is not writable or full; documents are being dropped")
    if stats.subscription_problem:
        reasons.append(stats.subscription_problem)
    warnings = [stats.proxy_absent] if stats.proxy_absent else []
    if known.tiled.misconfigured:
        warnings.append(f"tiled {known.tiled}: {known.last_error or 'check [tiled]'}")
    return Health(
        status=HealthStatus.UNHEALTHY if reasons else HealthStatus.DEGRADED if warnings else HealthStatus.OK,
        reasons=reasons,
        warnings=warnings,
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
            backlog_runs=backlog_runs,
            backlog_documents=backlog_documents,
            backlog_bytes=backlog_bytes,
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
