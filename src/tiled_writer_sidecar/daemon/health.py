"""The sidecar's health: one snapshot, the body of ``/healthz`` and systemd's STATUS line.

`health_snapshot` reads the receiver's counters (`counters.ReceiverStats`), its
`RunLedger` (the runs not yet finished, kept incrementally: a snapshot reads
at most `CHECKS_PER_SNAPSHOT` ``uploaded.json`` files and the newest
`RECENT_RUNS` runs, never the whole spool; without a ledger it lists the
spool) and the uploader's ``uploader.json`` (`spool.state_files.UploaderStatus`). It is unhealthy only when the sidecar cannot
receive or spool (receiver loop stalled, spool not writable or full, the
subscription broken); Tiled being down is reported but is not unhealthy:
the sidecar is built for that. It is "degraded" (still HTTP 200) with
`warnings` when it runs but cannot do its job: no proxy connection for
`subscription.NO_PROXY_WARN_S`, or Tiled refusing the API key or not being
Tiled. ``as_dict`` is the JSON the monitor reads.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from tiled_writer_sidecar.receive.counters import ReceiverStats
from tiled_writer_sidecar.receive.ledger import RECENT_RUNS
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.state_files import (
    Backlog,
    UploaderStatus,
)
from tiled_writer_sidecar.states import HealthStatus, TiledState

LOOP_STALL_SECONDS = 10.0
#: Before the first uploader.json: zero counts (never changed).
NO_UPLOADER_YET = UploaderStatus(tiled=TiledState.UNKNOWN)


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
