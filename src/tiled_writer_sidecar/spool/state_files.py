"""The per-run view of the spool: what was received, what Tiled has.

Beside its log, each run directory holds two small JSON files, each with
exactly one writer and replaced atomically (tmp, fsync, rename, fsync dir),
so a reader sees the old or the new version, never half of one:

- ``received.json`` (receiver): run identity (uid, scan_id, plan), documents
  and bytes spooled, events per stream, gaps (missing seq_nums,
  ``stop.num_events`` mismatches, a stop that never came), late events
  kept and duplicate copies rejected, documents dropped (disk full),
  ``start_missing`` for an orphan (spool/orphans/, never uploaded) and
  ``closed`` once no more will be appended.
- ``uploaded.json`` (uploader): ``uploading`` / ``uploaded`` /
  ``quarantined``, documents confirmed by Tiled, a quarantine's reason and
  the attempts it took.

`RunView.state` combines both into the one word `status` reports. The
spool's root holds ``uploader.json`` (`UploaderStatus`), written by the
uploader about once a second, read by ``/metrics``, ``/healthz`` and `status`.

`save` writes plain JSON values only (`coerce`: ints within 64 bits, finite floats,
names and other strings within their limits, dicts and lists of at most
`MAX_ITEMS` entries, numpy numbers as Python numbers, anything else
``None``). `load` never raises: it returns the same plain values, defaults
for unusable fields, ``None``/defaults for a file it cannot read. No file is
opened through a symlink; temporary files have unpredictable names and are
created exclusively.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

from tiled_writer_sidecar.coerce import (
    MAX_NAME,
    as_bool,
    as_counts,
    as_float,
    as_floats,
    as_int,
    as_json_value,
    as_text,
    as_texts,
)
from tiled_writer_sidecar.states import TiledState

RECEIVED = "received.json"
UPLOADED = "uploaded.json"
UPLOADER = "uploader.json"  # in the spool's root, not in a run directory
Payload = bytes  # a log record's payload (`Received` has a field named ``bytes``)


class UploadState(StrEnum):
    """The uploader's word for a run, in ``uploaded.json``."""

    PENDING = "pending"  # not started (the default when uploaded.json is missing)
    UPLOADING = "uploading"  # started; after a stop of the uploader it is rewritten
    UPLOADED = "uploaded"  # Tiled has every record and verification passed
    QUARANTINED = "quarantined"  # cannot be uploaded (reason in ``reason``); `replay UID` retries it

    @property
    def finished(self) -> bool:
        """The uploader is done with the run: it is never looked at again unless replayed by uid."""
        return self in (UploadState.UPLOADED, UploadState.QUARANTINED)


class RunState(StrEnum):
    """The one word `status` shows for a run: ``received.json`` and ``uploaded.json`` combined."""

    RECEIVING = "receiving"  # open (no stop yet), upload not started
    PENDING = "pending"  # closed, upload not started
    UPLOADING = "uploading"
    UPLOADED = "uploaded"
    INCOMPLETE = "incomplete"  # uploaded, but with gaps, drops, damage or no stop
    QUARANTINED = "quarantined"

    @property
    def waiting(self) -> bool:
        """Not in Tiled yet: what the backlog and the oldest-not-uploaded age count."""
        return self in (RunState.RECEIVING, RunState.PENDING, RunState.UPLOADING)


STATES = tuple(RunState)

#: Largest index file `read_json` reads; a bigger one reads as missing.
MAX_JSON_BYTES = 16 * 2**20
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace `path` with `data` so that readers never see a partial file.

    The temporary file has a random name and is created exclusively without
    following a symlink; values `json` cannot write are written as plain
    values (see `as_json_value`) instead of raising.
    """
    encoded = _dumps(data)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
    try:
        try:
            view = memoryview(encoded)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _dumps(data: dict[str, Any]) -> bytes:
    try:
        return json.dumps(data, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError):
        return json.dumps(as_json_value(data), sort_keys=True).encode()


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None if it is missing, a symlink, too big, or not a JSON object."""
    try:
        fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    except OSError:
        return None
    try:
        raw = os.read(fd, MAX_JSON_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) > MAX_JSON_BYTES:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------ plain JSON values (../coerce.py)


def _fields_of(cls: type, data: dict[str, Any], coerce: dict[str, Callable[[Any], Any]]) -> dict[str, Any]:
    """The fields of `cls` found in `data`, coerced; a field that does not coerce keeps its default."""
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = coerce[f.name](data[f.name])
        if value is not None or f.name in _OPTIONAL:
            kwargs[f.name] = value
    return kwargs


_OPTIONAL = {
    "scan_id",
    "plan_name",
    "start_time",
    "expected_events",
    "exit_status",
    "close_reason",
    "orphan",
    "reason",
    "last_error",
    "last_lag_seconds",
    "runs_per_second",
    "rows_per_second",
    "backlog_eta_seconds",
}


def _optional_counts(value: Any) -> dict[str, int] | None:
    return None if value is None else as_counts(value)


def _state(value: Any) -> UploadState:
    try:
        return UploadState(value)
    except ValueError:
        return UploadState.PENDING


def _name(value: Any) -> str | None:
    return as_text(value, MAX_NAME)


def _number(value: Any) -> int:
    return as_int(value) or 0


def _time(value: Any) -> float:
    return as_float(value) or 0.0


def _flag(value: Any) -> bool:
    return as_bool(value)


_RECEIVED_FIELDS: dict[str, Callable[[Any], Any]] = {
    "uid": lambda v: as_text(v) or "",
    "scan_id": as_int,
    "plan_name": _name,
    "start_time": as_float,
    "first_received": _time,
    "last_received": _time,
    "documents": _number,
    "bytes": _number,
    "events": as_counts,
    "missing": as_counts,
    "expected_events": _optional_counts,
    "stop_received": _flag,
    "exit_status": _name,
    "dropped": _number,
    "closed": _flag,
    "close_reason": as_text,
    "start_missing": _flag,
    "orphan": as_text,
    "out_of_order": as_counts,
    "duplicates": _number,
    "datum_rows": as_counts,
}
_UPLOADED_FIELDS: dict[str, Callable[[Any], Any]] = {
    "state": _state,
    "documents": _number,
    "attempts": _number,
    "reason": as_text,
    "damage": as_texts,
    "rows": as_counts,
    "updated": _time,
    "created": _flag,
    "creating": _flag,
}


def _plain_dict(value: Any) -> dict[str, Any]:
    return as_json_value(value) if isinstance(value, dict) else {}


_UPLOADER_STATUS_FIELDS: dict[str, Callable[[Any], Any]] = {
    "tiled": TiledState.of,
    "since": _time,
    "last_error": as_text,
    "documents": _number,
    "rows": _number,
    "runs_uploaded": _number,
    "runs_quarantined": _number,
    "rewrites": _number,
    "retries": _number,
    "append_retries": _number,
    "flushes": _number,
    "last_lag_seconds": as_float,
    "lag_seconds": as_floats,
    "lag_histogram": _plain_dict,
    "runs_per_second": as_float,
    "rows_per_second": as_float,
    "backlog_runs": _number,
    "backlog_eta_seconds": as_float,
    "updated": _time,
}


class _IndexFile:
    """An index file's typed fields, coerced to and from plain JSON (see the module docstring)."""

    FILE: ClassVar[str]
    FIELDS: ClassVar[dict[str, Callable[[Any], Any]]]

    @classmethod
    def _fields_in(cls, directory: Path) -> dict[str, Any] | None:
        """The file's fields as constructor arguments, coerced; None if it cannot be read."""
        data = read_json(directory / cls.FILE)
        return None if data is None else _fields_of(cls, data, cls.FIELDS)

    def fields_as_json(self) -> dict[str, Any]:
        """The fields as plain, bounded JSON values (see the module docstring)."""
        return {name: coerce(getattr(self, name)) for name, coerce in self.FIELDS.items()}

    def save(self, directory: Path) -> None:
        atomic_write_json(directory / self.FILE, self.fields_as_json())


@dataclass
class Received(_IndexFile):
    FILE: ClassVar[str] = RECEIVED
    FIELDS: ClassVar[dict[str, Callable[[Any], Any]]] = _RECEIVED_FIELDS

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
    start_missing: bool = False  # an orphan: documents of a run whose start never came (yet)
    orphan: str | None = None  # what keys an orphan: "run_start" (its uid) or "descriptor"
    out_of_order: dict[str, int] = field(default_factory=dict)  # late events that filled a hole
    duplicates: int = 0  # copies of a received seq_num, rejected
    datum_rows: dict[str, int] = field(
        default_factory=dict
    )  # highest seq_num stream_datums cover, per stream

    @classmethod
    def load(cls, run_dir: Path) -> Received | None:
        """The run's received.json, or None if it is missing, unreadable or has no usable uid."""
        kwargs = cls._fields_in(run_dir)
        return cls(**kwargs) if kwargs and kwargs.get("uid") else None

    # ------------------------------------- changes, each one method (tracker, spooler and ingest call them)
    def resume(self) -> None:
        """Left open by an earlier receiver: its identity made plain again, what its log determines zeroed."""
        self.scan_id = as_int(self.scan_id)
        self.plan_name = as_text(self.plan_name, MAX_NAME)
        self.start_time = as_float(self.start_time)
        self.first_received = as_float(self.first_received) or 0.0
        self.last_received = as_float(self.last_received) or 0.0
        self.dropped = as_int(self.dropped, 0, 2**63) or 0
        self.exit_status = None
        self.forget_routed()

    def forget_routed(self) -> None:
        """Zero what routing its log counts (events, holes, late events, rows, the stop): it is replayed."""
        self.events, self.missing, self.out_of_order, self.datum_rows = {}, {}, {}, {}
        self.expected_events, self.stop_received = None, False

    def note_events(self, stream: str, count: int) -> None:
        """`count` events of `stream` received."""
        self.events[stream] = self.events.get(stream, 0) + count

    def note_hole(self, stream: str, count: int) -> None:
        """A seq_num hole: `count` events of `stream` missing."""
        self.missing[stream] = self.missing.get(stream, 0) + count

    def note_late(self, stream: str) -> None:
        """A late event of `stream` filled one missing seq_num."""
        left = self.missing[stream] - 1
        if left:
            self.missing[stream] = left
        else:
            del self.missing[stream]
        self.out_of_order[stream] = self.out_of_order.get(stream, 0) + 1

    def note_datum_rows(self, stream: str, rows: int) -> None:
        """stream_datums of `stream` cover its rows up to `rows`."""
        self.datum_rows[stream] = max(self.datum_rows.get(stream, 0), rows)

    def note_stop(self, exit_status: str | None, expected_events: dict[str, int] | None) -> None:
        """Its stop came (plain values)."""
        self.stop_received, self.exit_status, self.expected_events = True, exit_status, expected_events

    def note_duplicate(self) -> None:
        """A copy of a received seq_num was rejected."""
        self.duplicates += 1

    def note_spooled(self, size: int, now: float) -> None:
        """One record of `size` bytes (header included) staged for its log at `now` (wall clock)."""
        self.documents += 1
        self.bytes += size
        self.last_received = now

    def note_unwritten(self, size: int) -> None:
        """A staged record of `size` bytes the disk refused: no longer counted (`note_dropped` counts it)."""
        self.documents -= 1
        self.bytes -= size

    def note_dropped(self) -> None:
        """One document lost (spool full or unwritable)."""
        self.dropped += 1

    def recount(self, payloads: Iterable[Payload], header: int) -> Iterator[Payload]:
        """Count its log's records anew (`header` bytes each besides the payload) as they pass through."""
        self.documents = self.bytes = 0
        for payload in payloads:
            self.documents += 1
            self.bytes += header + len(payload)
            yield payload

    def close(self, reason: str) -> None:
        """No more documents will be appended (`reason`: ``stop``, or why it closed without one)."""
        self.closed, self.close_reason = True, reason

    def gaps(self) -> dict[str, int]:
        """Events missing per stream: seq_num holes and stop.num_events shortfalls."""
        gaps = {k: v for k, v in self.missing.items() if v}
        for stream, expected in (self.expected_events or {}).items():
            rows = max(self.events.get(stream, 0), self.datum_rows.get(stream, 0))
            shortfall = expected - rows - gaps.get(stream, 0)
            if shortfall > 0:
                gaps[stream] = gaps.get(stream, 0) + shortfall
        return gaps

    def problems(self) -> list[str]:
        """Why this run is incomplete, one phrase each; empty if it is complete."""
        problems = [f"{n} {s} events missing" for s, n in sorted(self.gaps().items())]
        if self.start_missing:
            problems.append("start missing")
        if self.closed and not self.stop_received:
            problems.append(f"stop never came ({self.close_reason or 'closed'})")
        if self.dropped:
            problems.append(f"{self.dropped} documents dropped (spool full)")
        return problems


@dataclass
class Uploaded(_IndexFile):
    FILE: ClassVar[str] = UPLOADED
    FIELDS: ClassVar[dict[str, Callable[[Any], Any]]] = _UPLOADED_FIELDS

    state: UploadState = UploadState.PENDING
    documents: int = 0
    attempts: int = 0
    reason: str | None = None
    damage: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    updated: float = field(default_factory=time.time)
    #: This spool created the run in Tiled (so only it may delete it there; docs/design.md, "Upload").
    created: bool = False
    #: This spool sent the request that creates the run and has not recorded the answer yet.
    creating: bool = False

    def __post_init__(self) -> None:
        self.state = _state(self.state)  # a plain string from a caller becomes its UploadState

    @classmethod
    def load(cls, run_dir: Path) -> Uploaded:
        """The run's uploaded.json; defaults (pending) if it is missing or unreadable.

        A file written before ``created`` was recorded: an ``uploading`` run was created here
        (those versions checked that Tiled had no such run first), any other was not.
        """
        data = read_json(run_dir / cls.FILE)
        if data is None:
            return cls()
        kwargs = _fields_of(cls, data, cls.FIELDS)
        if "created" not in data:
            kwargs["created"] = kwargs.get("state") == UploadState.UPLOADING
        return cls(**kwargs)

    def save(self, run_dir: Path) -> None:
        self.updated = time.time()
        super().save(run_dir)

    # ----------------------- changes, each one method (run_upload and the scheduler call them)
    def note_creating(self, creating: bool) -> None:
        """The request that creates the run in Tiled is about to be sent (True), or did not land (False)."""
        self.creating = creating

    def start_attempt(self) -> None:
        """This spool created the run in Tiled (or rewrote it): a new attempt starts from nothing."""
        self.state = UploadState.UPLOADING
        self.created = True
        self.creating = False
        self.attempts += 1
        self.documents = 0
        self.damage = []
        self.reason = None

    def note_documents(self, documents: int) -> None:
        """Tiled holds the run's first `documents` documents."""
        self.documents = documents

    def note_waiting(self, reason: str) -> None:
        """The attempt failed and the run waits to be tried again, for `reason` (shown by ``status``)."""
        self.reason = reason

    def finish(self, documents: int, rows: dict[str, int]) -> None:
        """Tiled holds the whole run, verified: `rows` per stream."""
        self.state = UploadState.UPLOADED
        self.documents = documents
        self.rows = rows

    def quarantine(self, reason: str) -> None:
        """The run can never be uploaded as it is, for `reason`."""
        self.state = UploadState.QUARANTINED
        self.reason = reason


@dataclass
class UploaderStatus(_IndexFile):
    """What the uploader tells the receiver's /metrics and /healthz and `status` (``uploader.json``)."""

    FILE: ClassVar[str] = UPLOADER
    FIELDS: ClassVar[dict[str, Callable[[Any], Any]]] = _UPLOADER_STATUS_FIELDS

    tiled: TiledState = TiledState.CONNECTING  # as `connection.TiledLink.set_state` records it
    since: float = field(default_factory=time.time)
    last_error: str | None = None
    documents: int = 0
    rows: int = 0
    runs_uploaded: int = 0
    runs_quarantined: int = 0
    rewrites: int = 0
    retries: int = 0
    append_retries: int = 0
    flushes: int = 0
    last_lag_seconds: float | None = None
    lag_seconds: list[float] = field(default_factory=list)  # the last 1,000 (benchmarks read them)
    lag_histogram: dict[str, Any] = field(default_factory=dict)  # cumulative: /metrics exports it
    runs_per_second: float | None = None  # runs uploaded per second over the last RATE_WINDOW_S
    rows_per_second: float | None = None  # rows written per second, same window
    backlog_runs: int = 0  # runs not uploaded yet (open, pending, uploading, backing off)
    backlog_eta_seconds: float | None = None  # backlog_runs / runs_per_second (None: no rate yet)
    updated: float = field(default_factory=time.time)

    @classmethod
    def load(cls, spool_root: Path) -> UploaderStatus | None:
        """The spool's uploader.json, coerced field by field; None if it is missing or unreadable."""
        kwargs = cls._fields_in(spool_root)
        return None if kwargs is None else cls(**kwargs)

    def save(self, spool_root: Path) -> None:
        self.updated = time.time()
        super().save(spool_root)

    # --------------------------- changes, each one method (scheduler, run_upload, connection call them)
    def note_tiled(self, state: TiledState, error: str | None = None) -> tuple[TiledState, float] | None:
        """Tiled is in `state`, `error` says why; the previous (state, since) if it changed, else None."""
        if error:
            self.last_error = error
        if state == self.tiled:
            return None
        previous = (self.tiled, self.since)
        self.tiled, self.since = state, time.time()
        return previous

    def note_error(self, error: str) -> None:
        """The last failure, one line."""
        self.last_error = error

    def note_retry(self, error: str | None = None, *, append: bool = False) -> None:
        """A step (`append`: a run's append, retried in place) failed and is retried; `error` says why."""
        self.retries += 1
        if append:
            self.append_retries += 1
        if error is not None:
            self.last_error = error

    def note_rewrite(self) -> None:
        """A partial run in Tiled was deleted to be written again."""
        self.rewrites += 1

    def note_flush(self, rows: int, lag: float | None, lag_histogram: dict[str, Any] | None) -> None:
        """`rows` written to Tiled in one flush, `lag` seconds after acquisition (None: unknown), and the
        lag histogram with it."""
        self.flushes += 1
        self.rows += rows
        if lag is not None:
            self.last_lag_seconds = lag
            self.lag_seconds.append(lag)
            del self.lag_seconds[:-1000]
        if lag_histogram is not None:
            self.lag_histogram = lag_histogram

    def note_uploaded(self, documents: int, unflushed_rows: int) -> None:
        """A run uploaded and verified: its `documents`, and rows Tiled holds that no flush counted."""
        self.runs_uploaded += 1
        self.documents += documents
        self.rows += unflushed_rows

    def note_quarantined(self, error: str) -> None:
        """A run quarantined; `error` says which and why."""
        self.runs_quarantined += 1
        self.last_error = error

    def note_backlog(self, runs: int, rates: tuple[float, float] | None = None) -> None:
        """`runs` not uploaded yet; `rates`: (runs, rows) uploaded per second lately, if measured."""
        self.backlog_runs = runs
        if rates is None:
            return
        self.runs_per_second, self.rows_per_second = rates
        self.backlog_eta_seconds = runs / self.runs_per_second if self.runs_per_second > 0 else None


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
    def state(self) -> RunState:
        up = self.uploaded.state
        if up == UploadState.QUARANTINED:
            return RunState.QUARANTINED
        if up == UploadState.UPLOADED:
            incomplete = self.received.problems() or self.uploaded.damage
            return RunState.INCOMPLETE if incomplete else RunState.UPLOADED
        if up == UploadState.UPLOADING:
            return RunState.UPLOADING
        return RunState.PENDING if self.received.closed else RunState.RECEIVING

    @property
    def waiting(self) -> bool:
        """Not in Tiled yet (`RunState.waiting`: the uploader has not finished it)."""
        return self.state.waiting

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


@dataclass(frozen=True)
class Backlog:
    """The runs not in Tiled yet (`RunView.waiting`), as `status` and ``/healthz`` count them."""

    runs: int = 0
    documents: int = 0  # received and not yet confirmed by Tiled
    bytes: int = 0
    oldest: float | None = None  # first_received of the oldest waiting run

    @classmethod
    def of(cls, views: Iterable[RunView]) -> Backlog:
        waiting = [view for view in views if view.waiting]
        return cls(
            runs=len(waiting),
            documents=sum(max(0, v.received.documents - v.uploaded.documents) for v in waiting),
            bytes=sum(v.received.bytes for v in waiting),
            oldest=min((v.received.first_received for v in waiting), default=None),
        )
