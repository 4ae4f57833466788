"""The sidecar's health: one snapshot, the body of ``/healthz`` and systemd's STATUS line.

`health_snapshot` reads the receiver's counters (`stats.ReceiverStats`), the
spool's per-run files and the uploader's ``uploader.json``
(`spool.index.UploaderStatus`). It is unhealthy only when the sidecar cannot
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

from .spool.directory import SpoolDir
from .spool.index import UploaderStatus
from .stats import ReceiverStats

LOOP_STALL_SECONDS = 10.0
RECENT_RUNS = 20  # runs listed in the snapshot, newest last
NO_UPLOADER_YET = UploaderStatus(
    tiled="unknown"
)  # before the first uploader.json: zero counts (never changed)


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
    status: str  # "ok", "degraded" (warnings) or "unhealthy" (reasons)
    reasons: list[str]
    warnings: list[str]
    receiver: ReceiverHealth
    spool: SpoolHealth
    tiled: TiledHealth
    upload: UploadHealth
    runs: list[dict[str, Any]]

    @property
    def healthy(self) -> bool:
        return self.status != "unhealthy"

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
    runs = spool.runs()
    pending = [r for r in runs if not r.uploaded.state.finished]
    oldest = min((r.received.first_received for r in pending), default=None)
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
    if known.tiled in ("unauthorized", "not_tiled"):
        warnings.append(f"tiled {known.tiled}: {known.last_error or 'check [tiled]'}")
    return Health(
        status="unhealthy" if reasons else "degraded" if warnings else "ok",
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
            runs=len(runs),
            backlog_runs=len(pending),
            backlog_documents=sum(max(0, r.received.documents - r.uploaded.documents) for r in pending),
            backlog_bytes=sum(r.received.bytes for r in pending),
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
        runs=[r.as_dict() for r in runs[-RECENT_RUNS:]],
    )
