"""What `monitor` knows, as a pure model fed one decoded document at a time.

`MonitorState.feed(name, doc)` (decode thread) only updates small counters and
bounded buffers: the last `MAX_RUNS` runs, the last `PLOT_POINTS` values of
the plotted key, rate buckets. `snapshot()` (render thread) copies everything
shown, under the same lock, into one JSON-able dict that is the whole screen,
sidecar health (``/healthz`` bodies or the last poll's error) and the 0MQ
connection state included; rendering never touches live state. No clock is
read implicitly: `clock` (monotonic, rates) and `wall` (epoch seconds, ages).

Routing, per-stream counts and gaps are `tracker.RunTracker`'s; duplicates
come from its `on_repeat`. A document of a run whose start was missed is an
orphan; one the tracker otherwise rejects is malformed. Per run it adds
identity (scan_id, uid, plan, start time), a recent rate per stream, the
latest value of every scalar data key, the plot and the exit status. The
plotted key is `plot_key` if given, else the first hinted scalar numeric
field of the first detector in the primary stream.

Documents are untrusted: `feed` checks what it will show before the tracker
counts it and confines any exception to its document (``monitor-malformed``);
run uids and data keys longer than `MAX_KEY`, counts beyond 2**63 and times
that are not finite epoch seconds are refused or ignored; every text in the
snapshot has passed `text.clean`. It is not markup-safe: render it as plain
rich `Text` only.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, TypeGuard

from tiled_writer_sidecar.documents.tracker import RunTracker, TrackedRun
from tiled_writer_sidecar.errors import ValidationError
from tiled_writer_sidecar.states import HealthStatus, RejectionCategory, rejection_category
from tiled_writer_sidecar.text import clean

#: Finished runs kept for the "last runs" table (open runs are always kept).
MAX_RUNS = 20
#: Values of the plotted key kept for the live plot.
PLOT_POINTS = 240
#: Scalar data keys whose latest value is kept, per stream.
MAX_LATEST_KEYS = 64
#: Longest string value kept for display.
MAX_STRING = 80
#: Longest uid or data key accepted (a real uid has 36 characters).
MAX_KEY = 256
#: Longest stream name shown.
MAX_NAME = 64
#: Counts (seq_num, num_events) at or above this are refused.
MAX_COUNT = 2**63
#: Window and resolution of the recent-rate meters, in seconds.
RATE_WINDOW = 5.0
RATE_RESOLUTION = 0.5

#: Documents counted per run and, when their run is unknown, as orphans (resources and datums
#: are routed by the tracker too, but counted only in the totals by name).
RUN_DOCUMENTS = frozenset({"start", "descriptor", "event", "event_page", "stop"})
SCALAR_DTYPES = frozenset({"number", "integer", "boolean", "string"})
NUMERIC_DTYPES = frozenset({"number", "integer"})


def as_shown_value(value: Any) -> Any:
    """A numpy scalar (anything with `.item()`) as plain Python; text made safe by `text.clean`.

    Numbers stay numbers (non-finite floats and integers beyond 64 bits become
    text); anything else becomes cleaned, bounded text.
    """
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (list, tuple, dict)):
        try:
            value = item()
        except Exception:  # noqa: BLE001 - a hostile scalar is shown by its type only
            return clean(f"<{type(value).__name__}>", MAX_STRING)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= 64 else clean(value, MAX_STRING)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no NaN/inf
    return clean(value, MAX_STRING)


def as_count(value: Any) -> int:
    """`value` as a count in [0, MAX_COUNT) (ValueError otherwise: the document is malformed)."""
    number = int(value)
    if not 0 <= number < MAX_COUNT:
        raise ValueError(f"count out of range ({clean(number, 24)})")
    return number


def as_key(value: Any) -> str:
    """A uid or data key used for lookups (raw, so lookups match), refused if longer than MAX_KEY."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_KEY:
        raise ValueError(f"key of {len(text)} characters")
    return text


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_COUNT


def epoch(value: Any) -> float | None:
    """Epoch seconds if `value` is a plausible time (finite, 0 to year 5000), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            return None
        if math.isfinite(seconds) and 0 <= seconds < 1e11:
            return seconds
    return None


def stream_name(value: Any) -> str:
    """A stream name as shown and keyed: cleaned and bounded."""
    return clean(value or "primary", MAX_NAME)


def sidecar_state(status: object) -> str:
    """The sidecar as the monitor shows it, from /healthz's ``status``: up, degraded, else unhealthy."""
    return _SIDECAR_STATES.get(str(status), "unhealthy")


_SIDECAR_STATES: dict[str, str] = {HealthStatus.OK: "up", HealthStatus.DEGRADED: "degraded"}


def _by_name(counts: Mapping[str, int], names: Sequence[str] = ()) -> dict[str, int]:
    """Per-stream counts of the tracker (raw stream names) keyed by the name shown."""
    shown = dict.fromkeys(names, 0)
    for raw, count in counts.items():
        name = stream_name(raw)
        shown[name] = shown.get(name, 0) + count
    return shown


def _rows(name: str, doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The data rows of an event or event_page (ValueError/KeyError/IndexError if malformed)."""
    data = doc["data"]
    if not isinstance(data, Mapping):
        raise ValueError("data is not a mapping")
    if name == "event":
        return [data]
    count = len(doc["seq_num"])
    return [{key: values[i] for key, values in data.items()} for i in range(count)]


class RateMeter:
    """Events per second over the last `window` seconds, in `resolution` buckets."""

    def __init__(self, window: float = RATE_WINDOW, resolution: float = RATE_RESOLUTION) -> None:
        self.window = window
        self.resolution = resolution
        self._buckets: deque[list[float]] = deque()  # [bucket start, count]
        self._first: float | None = None

    def add(self, count: int, now: float) -> None:
        start = math.floor(now / self.resolution) * self.resolution
        if self._first is None:
            self._first = now
        if self._buckets and self._buckets[-1][0] == start:
            self._buckets[-1][1] += count
        else:
            self._buckets.append([start, float(count)])
        self._prune(now)

    def _prune(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] + self.resolution <= now - self.window:
            self._buckets.popleft()

    def rate(self, now: float) -> float:
        self._prune(now)
        if not self._buckets or self._first is None:
            return 0.0
        span = min(self.window, max(self.resolution, now - self._first))
        return sum(b[1] for b in self._buckets) / span


@dataclass
class StreamState:
    """What the screen shows of one stream beyond the tracker's counts."""

    name: str
    duplicates: int = 0  # duplicate or late seq_nums (counted as events by the tracker)
    last_seq_num: int = 0
    first_arrival: float | None = None
    last_arrival: float | None = None
    rate: RateMeter = field(default_factory=RateMeter)
    scalar_keys: dict[str, str] = field(default_factory=dict)  # key -> dtype
    latest: dict[str, Any] = field(default_factory=dict)

    def mean_rate(self, events: int) -> float | None:
        if self.first_arrival is None or self.last_arrival is None or events < 2:
            return None
        span = self.last_arrival - self.first_arrival
        return (events - 1) / span if span > 0 else None


@dataclass
class RunState:
    """One run on screen: the tracker's run (counts, gaps) and what only the screen needs."""

    uid: str
    tracked: TrackedRun
    scan_id: Any = None
    plan_name: str | None = None
    start_time: float | None = None
    detectors: list[str] = field(default_factory=list)
    documents: int = 0
    streams: dict[str, StreamState] = field(default_factory=dict)
    stopped: bool = False
    exit_status: str | None = None
    reason: str | None = None
    stop_time: float | None = None
    num_events: dict[str, int] = field(default_factory=dict)
    plot_stream: str | None = None
    plot_key: str | None = None
    plot_values: deque[float] = field(default_factory=lambda: deque(maxlen=PLOT_POINTS))
    plot_count: int = 0

    def stream(self, name: str) -> StreamState:
        stream = self.streams.get(name)
        if stream is None:
            stream = self.streams[name] = StreamState(name)
        return stream

    def events(self) -> dict[str, int]:
        """Events received per stream shown (the tracker's count; 0 for a stream without any)."""
        return _by_name(self.tracked.received.events, list(self.streams))

    def gaps(self) -> dict[str, int]:
        """Events missing per stream shown: the tracker's holes and stop.num_events shortfalls."""
        return _by_name(self.tracked.received.gaps())

    @property
    def state(self) -> str:
        if not self.stopped:
            return "running"
        return self.exit_status or "stopped"


def _hinted_fields(descriptor: Mapping[str, Any], detector: str) -> list[str]:
    hints = descriptor.get("hints")
    if isinstance(hints, Mapping):
        entry = hints.get(detector)
        if isinstance(entry, Mapping) and isinstance(entry.get("fields"), list):
            return [f for f in entry["fields"] if isinstance(f, str)]
    return []


def default_plot_key(start: Mapping[str, Any] | None, descriptor: Mapping[str, Any]) -> str | None:
    """The first detector's first hinted (else first) scalar numeric data key, or None."""
    data_keys = descriptor.get("data_keys")
    if not isinstance(data_keys, Mapping):
        return None

    def numeric(key: str) -> bool:
        spec = data_keys.get(key)
        return (
            isinstance(spec, Mapping)
            and spec.get("dtype") in NUMERIC_DTYPES
            and not spec.get("shape")
            and "external" not in spec
        )

    object_keys = descriptor.get("object_keys")
    object_keys = object_keys if isinstance(object_keys, Mapping) else {}
    detectors = (start or {}).get("detectors")
    for detector in detectors if isinstance(detectors, list) else []:
        if not isinstance(detector, str):
            continue
        owned = object_keys.get(detector)
        candidates = _hinted_fields(descriptor, detector) + (owned if isinstance(owned, list) else [])
        for key in candidates:
            if isinstance(key, str) and numeric(key):
                return key
    # No detector listed (or none numeric): any hinted field, then any numeric key.
    hints = descriptor.get("hints")
    for obj in hints if isinstance(hints, Mapping) else {}:
        for key in _hinted_fields(descriptor, obj):
            if numeric(key):
                return key
    return next((key for key in data_keys if isinstance(key, str) and numeric(key)), None)


class MonitorState:
    """Everything the monitor shows; thread-safe; see the module docstring."""

    def __init__(
        self,
        *,
        address: str = "",
        plot_key: str | None = None,
        sidecar_url: str = "",
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.lock = threading.Lock()
        self.clock = clock
        self.wall = wall
        self.address = address
        self.requested_plot_key = plot_key
        self.started = wall()
        # 0MQ side
        self.connection = "connecting"
        self.connection_detail = ""
        self.connection_since = self.started
        self.connects = 0
        self.messages = 0
        self.bytes = 0
        self.documents: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.orphans = 0  # documents of runs that started before the monitor
        self.errors = 0
        self.last_error: str | None = None
        self.runs: OrderedDict[str, RunState] = OrderedDict()
        self.tracker: RunTracker[TrackedRun] = RunTracker(on_repeat=self._repeated, safe_uids=False)
        # sidecar side
        self.sidecar_url = sidecar_url
        self.sidecar_state = "unknown"
        self.sidecar_since: float | None = None
        self.sidecar_error: str | None = None
        self.sidecar_polls = 0
        self.health: dict[str, Any] | None = None
        self._upload_samples: deque[tuple[float, int, int]] = deque(maxlen=16)

    # ---------------------------------------------------------- 0MQ side
    def set_connection(self, state: str, detail: str = "") -> None:
        """`state`: connecting, connected, disconnected (or error)."""
        with self.lock:
            if state == "connected":
                self.connects += 1
            if state != self.connection:
                self.connection = state
                self.connection_since = self.wall()
            self.connection_detail = clean(detail, 300)

    def note_message(self, size: int) -> None:
        with self.lock:
            self.messages += 1
            self.bytes += size

    def reject(self, reason: str) -> None:
        with self.lock:
            self.rejected[clean(reason, 64)] += 1

    def error(self, message: str) -> None:
        with self.lock:
            self.errors += 1
            self.last_error = clean(message, 300)

    def feed(self, name: str, doc: Mapping[str, Any]) -> None:
        """Account for one decoded document; never raises for a malformed one."""
        now = self.clock()
        with self.lock:
            self.documents[name] += 1
            try:
                self._feed(name, doc, now)
            except Exception as err:  # noqa: BLE001 - one document's trouble stays with it
                self.rejected["monitor-malformed"] += 1
                self.last_error = clean(f"{name}: {type(err).__name__}: {err}", 300)

    def _feed(self, name: str, doc: Mapping[str, Any], now: float) -> None:
        """Check what will be shown, let the tracker route and count, then update the screen's state."""
        rows: list[Mapping[str, Any]] = []
        num_events: dict[str, int] = {}
        if name == "start":
            as_key(doc["uid"])
        elif name in ("event", "event_page"):
            rows = _rows(name, doc)
        elif name == "stop":
            counts = doc.get("num_events")
            items = islice(counts.items(), MAX_LATEST_KEYS) if isinstance(counts, Mapping) else ()
            num_events = {stream_name(k): as_count(v) for k, v in items}
        try:
            tracked = self.tracker.route(name, doc if isinstance(doc, dict) else dict(doc))
        except ValidationError as rejected:
            if rejection_category(rejected.reason) != RejectionCategory.ORPHAN:
                raise
            self.orphans += name in RUN_DOCUMENTS
            return
        if name == "start":
            self._start(tracked, doc)
            return
        run = self.runs[tracked.uid]
        run.documents += name in RUN_DOCUMENTS
        if name == "descriptor":
            self._descriptor(run, tracked.streams[doc["uid"]], doc)
        elif name in ("event", "event_page"):
            descriptor = doc["descriptor"]
            stream = run.stream(stream_name(tracked.streams[descriptor]))
            stream.last_seq_num = tracked.last_seq[descriptor]
            self._events(run, stream, rows, now)
        elif name == "stop":
            self._stop(run, doc, num_events)

    def _repeated(self, tracked: TrackedRun, stream: str, seq_num: int) -> None:
        """The tracker's `on_repeat`: a duplicate or late seq_num (an event, not a gap)."""
        run = self.runs.get(tracked.uid)
        if run is not None:
            run.stream(stream_name(stream)).duplicates += 1

    def _start(self, tracked: TrackedRun, doc: Mapping[str, Any]) -> None:
        detectors = doc.get("detectors")
        run = RunState(
            uid=tracked.uid,
            tracked=tracked,
            scan_id=as_shown_value(doc.get("scan_id")),
            plan_name=as_shown_value(doc.get("plan_name")),
            start_time=epoch(doc.get("time")),
            detectors=[d for d in detectors[:MAX_LATEST_KEYS] if isinstance(d, str)]
            if isinstance(detectors, list)
            else [],
            documents=1,
        )
        self.runs[run.uid] = run
        self._evict()

    def _evict(self) -> None:
        finished = [uid for uid, run in self.runs.items() if run.stopped]
        while len(self.runs) > MAX_RUNS and finished:
            self.runs.pop(finished.pop(0))
        while len(self.runs) > 4 * MAX_RUNS:  # open runs whose stop never came
            self.tracker.close(self.runs.pop(next(iter(self.runs))).tracked)

    def _descriptor(self, run: RunState, raw_name: str, doc: Mapping[str, Any]) -> None:
        name = stream_name(raw_name)
        stream = run.stream(name)
        data_keys = doc.get("data_keys")
        for data_key, spec in (data_keys if isinstance(data_keys, Mapping) else {}).items():
            if len(stream.scalar_keys) >= MAX_LATEST_KEYS:
                break
            if (
                isinstance(data_key, str)
                and len(data_key) <= MAX_KEY
                and isinstance(spec, Mapping)
                and spec.get("dtype") in SCALAR_DTYPES
                and not spec.get("shape")
                and "external" not in spec
            ):
                stream.scalar_keys[data_key] = str(spec["dtype"])
        if run.plot_key is None:
            wanted = self.requested_plot_key
            if wanted is not None:
                if isinstance(data_keys, Mapping) and wanted in data_keys:
                    run.plot_key, run.plot_stream = wanted, name
            elif name == "primary":
                plot_key = default_plot_key({"detectors": run.detectors}, doc)
                if plot_key is not None and len(plot_key) <= MAX_KEY:
                    run.plot_key, run.plot_stream = plot_key, name

    def _events(
        self, run: RunState, stream: StreamState, rows: Sequence[Mapping[str, Any]], now: float
    ) -> None:
        stream.rate.add(len(rows), now)
        if stream.first_arrival is None:
            stream.first_arrival = now
        stream.last_arrival = now
        if rows:
            latest = rows[-1]
            for key in stream.scalar_keys:
                if key in latest:
                    stream.latest[key] = latest[key]  # made as_shown_value() in snapshot()
        if run.plot_key is not None and run.plot_stream == stream.name:
            for row in rows:
                value = as_shown_value(row.get(run.plot_key))
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    run.plot_values.append(float(value))
                    run.plot_count += 1

    def _stop(self, run: RunState, doc: Mapping[str, Any], num_events: dict[str, int]) -> None:
        run.stopped = True
        run.exit_status = as_shown_value(doc.get("exit_status"))
        run.reason = as_shown_value(doc.get("reason")) or None
        run.stop_time = epoch(doc.get("time"))
        run.num_events = num_events
        self.tracker.close(run.tracked)
        self._evict()

    # ------------------------------------------------------- sidecar side
    def set_health(self, health: Mapping[str, Any] | None, error: str | None = None) -> None:
        """Record one poll of the sidecar's /healthz: its body, or why there is none."""
        with self.lock:
            self.sidecar_polls += 1
            if health is None:
                state = "down"
                self.sidecar_error = clean(error or "no answer", 300)
            else:
                state = sidecar_state(health.get("status"))
                self.sidecar_error = None
                upload = health.get("upload")
                if isinstance(upload, Mapping):
                    rows, docs = upload.get("rows"), upload.get("documents")
                    if _is_count(rows) and _is_count(docs):
                        self._upload_samples.append((self.clock(), rows, docs))
            if state != self.sidecar_state:
                self.sidecar_state = state
                self.sidecar_since = self.wall()
                if state == "down":
                    self._upload_samples.clear()
            self.health = dict(health) if health is not None else None

    def _upload_rates(self) -> tuple[float | None, float | None]:
        samples = self._upload_samples
        if len(samples) < 2:
            return None, None
        (t0, rows0, docs0), (t1, rows1, docs1) = samples[0], samples[-1]
        if t1 <= t0:
            return None, None
        return max(0, rows1 - rows0) / (t1 - t0), max(0, docs1 - docs0) / (t1 - t0)

    # ------------------------------------------------------------ snapshot
    def snapshot(self) -> dict[str, Any]:
        """Everything on screen as one JSON-able dict (a copy; see module docstring)."""
        now, wall = self.clock(), self.wall()
        with self.lock:
            runs = [self._run_dict(run, now, wall, latest=False) for run in reversed(self.runs.values())]
            current = next(reversed(self.runs.values()), None)
            rows_rate, docs_rate = self._upload_rates()
            return {
                "time": wall,
                "monitor_started": self.started,
                "zmq": {
                    "address": clean(self.address, 300),
                    "connection": self.connection,
                    "detail": self.connection_detail,
                    "since": self.connection_since,
                    "connects": self.connects,
                    "messages": self.messages,
                    "bytes": self.bytes,
                    "documents": dict(self.documents),
                    "rejected": dict(self.rejected),
                    "orphans": self.orphans,
                    "errors": self.errors,
                    "last_error": self.last_error,
                },
                "run": self._run_dict(current, now, wall, latest=True) if current else None,
                "runs": runs,
                "plot": self._plot_dict(current),
                "gaps": sum(sum(run.gaps().values()) for run in self.runs.values()),
                "sidecar": {
                    "url": clean(self.sidecar_url, 300),
                    "state": self.sidecar_state,
                    "since": self.sidecar_since,
                    "error": self.sidecar_error,
                    "polls": self.sidecar_polls,
                    "upload_rows_per_second": rows_rate,
                    "upload_documents_per_second": docs_rate,
                    "health": self.health,
                },
            }

    def _plot_dict(self, run: RunState | None) -> dict[str, Any]:
        if run is None:
            return {"key": _shown(self.requested_plot_key), "stream": None, "values": [], "count": 0}
        return {
            "key": _shown(run.plot_key or self.requested_plot_key),
            "stream": run.plot_stream,
            "values": list(run.plot_values),
            "count": run.plot_count,
        }

    def _run_dict(self, run: RunState, now: float, wall: float, *, latest: bool) -> dict[str, Any]:
        end = run.stop_time if run.stopped else wall
        events, gaps = run.events(), run.gaps()
        streams = {}
        for name, s in run.streams.items():
            entry: dict[str, Any] = {
                "events": events.get(name, 0),
                "rate": round(s.rate.rate(now), 3),
                "mean_rate": s.mean_rate(events.get(name, 0)),
                "last_seq_num": s.last_seq_num,
                "gaps": gaps.get(name, 0),
                "duplicates": s.duplicates,
            }
            if latest:
                entry["latest"] = {clean(k, MAX_STRING): as_shown_value(v) for k, v in s.latest.items()}
            streams[name] = entry
        return {
            "uid": clean(run.uid, MAX_KEY),
            "scan_id": run.scan_id,
            "plan_name": run.plan_name,
            "start_time": run.start_time,
            "elapsed_seconds": (end - run.start_time) if end is not None and run.start_time else None,
            "state": run.state,
            "exit_status": run.exit_status,
            "reason": run.reason,
            "documents": run.documents,
            "events": events,
            "num_events": run.num_events or None,
            "gaps": gaps,
            "streams": streams,
        }


def _shown(name: str | None) -> str | None:
    return None if name is None else clean(name, MAX_STRING)


__all__ = ["MonitorState", "RateMeter", "as_shown_value", "default_plot_key"]
