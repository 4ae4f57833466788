"""Where an upload's time goes, read from a profile: phases, HTTP requests, state files, objects.

- `StackSampler` is a wall-clock sampling profiler of every thread of this
  process (``sys._current_frames`` every ~1 ms, from its own thread), so it
  also sees an uploader that uploads several runs at once in worker threads
  (cProfile and pyinstrument see only the thread that started them). Each
  sample's stack is put in one phase: the innermost frame that matches a
  `Phase` marker (file suffix + function name) names it, and whether an
  ``httpx.Client.send`` frame is on the stack says "waiting for HTTP".
  Samples of a thread running no upload, sidecar or TiledWriter code (a
  progress ticker, an idle pool thread) are ignored.
- `RequestLog` wraps ``httpx.Client.send``: every request with its latency
  and the phase that sent it (the same classification, on the caller's
  stack), so requests per run are counted, not sampled.
- `Counters` wraps ``os.fsync``, the spool's ``atomic_write_json`` and the
  constructors of TiledWriter's ``RunNormalizer`` and ``_RunWriter``: exact
  counts and time.

Markers name functions of the current code; a phase renamed by a later
change shows up as "other", with the unmatched innermost functions listed
(`Breakdown.unmatched`), so the markers can follow.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

Marker = tuple[str, str]  # (file path suffix, function name)
IDLE = "idle waits (Event.wait, join; not in a request)"


@dataclass(frozen=True)
class Phase:
    label: str
    markers: tuple[Marker, ...]


_SC = "tiled_writer_sidecar/"
_TW = "bluesky_tiled_plugins/writing/tiled_writer.py"

#: The sidecar uploader's phases (the innermost matching frame wins).
SIDECAR_PHASES = (
    Phase(
        "scheduling: listing runs, loading their state",
        ((_SC + "upload/scheduler.py", "_schedule"), (_SC + "upload/scheduler.py", "_candidates")),
    ),
    Phase(IDLE, (("threading.py", "wait"), ("threading.py", "join"))),
    Phase(
        "run start: exists check, delete partial",
        ((_SC + "upload/run_upload.py", "start"), (_SC + "upload/tiled_calls.py", "run_exists")),
    ),
    Phase(
        "TiledWriter objects: construction",
        (
            (_SC + "upload/run_writer.py", "__init__"),
            (_TW, "__init__"),
        ),
    ),
    Phase(
        "connecting (from_uri)",
        ((_SC + "upload/tiled_calls.py", "connect"), (_SC + "upload/connection.py", "connected")),
    ),
    Phase(
        "reading the spool (segments, decode)",
        ((_SC + "spool/segment.py", "read"), (_SC + "spool/codec.py", "unpack_document")),
    ),
    Phase("documents: checks and normalizing", ((_SC + "upload/run_upload.py", "feed"), (_TW, "event"))),
    Phase("start: create the run node", ((_TW, "start"),)),
    Phase("descriptor: create the stream nodes", ((_TW, "descriptor"),)),
    Phase(
        "rows: create table, append",
        ((_TW, "_write_internal_data"), (_SC + "upload/run_writer.py", "flush")),
    ),
    Phase("stop: close nodes, update metadata", ((_TW, "stop"), (_TW, "_close_stream_tree"))),
    Phase(
        "verification read-back",
        ((_SC + "upload/run_upload.py", "verify"), (_SC + "upload/tiled_calls.py", "read_seq_nums")),
    ),
    Phase(
        "state files (uploaded.json, uploader.json)",
        (
            (_SC + "spool/state_files.py", "atomic_write_json"),
            (_SC + "spool/state_files.py", "save"),
            (_SC + "spool/state_files.py", "load"),
        ),
    ),
    Phase("releasing the run's segments", ((_SC + "spool/directory.py", "release_run"),)),
    Phase(
        "uploader loop (other)",
        ((_SC + "upload/scheduler.py", "run"), (_SC + "upload/run_upload.py", "pump")),
    ),
)

#: In-process ``TiledWriter(client)``'s phases.
INPROCESS_PHASES = (
    Phase(IDLE, (("threading.py", "wait"), ("threading.py", "join"))),
    Phase("TiledWriter objects: construction", ((_TW, "__init__"), (_TW, "_factory"))),
    Phase(
        "documents: validation and normalizing (RunNormalizer)",
        ((_TW, "event"), ("event_model/__init__.py", "__call__"), ("jsonschema/validators.py", "validate")),
    ),
    Phase("start: create the run node", ((_TW, "start"),)),
    Phase("descriptor: create the stream nodes", ((_TW, "descriptor"),)),
    Phase("rows: create table, append", ((_TW, "_write_internal_data"),)),
    Phase("stop: close nodes, update metadata", ((_TW, "stop"), (_TW, "_close_stream_tree"))),
)

OTHER = "other"
_HTTP: Marker = ("httpx/_client.py", "send")
#: A thread is sampled only while one of these is on its stack (the upload's threads, not a ticker's).
_OURS = ("/benchmarks/_upload.py", "/tiled_writer_sidecar/", "/bluesky_tiled_plugins/")


class Classifier:
    """Puts a stack into a phase (innermost marker wins) and says whether it waits for HTTP."""

    def __init__(self, phases: tuple[Phase, ...], scope: tuple[str, ...] = _OURS) -> None:
        self.scope = scope
        self.by_name: dict[str, list[tuple[str, str]]] = {}
        for phase in phases:
            for suffix, name in phase.markers:
                self.by_name.setdefault(name, []).append((suffix, phase.label))
        self.labels = [p.label for p in phases]

    def classify(self, frame: FrameType | None) -> tuple[str | None, bool, bool, str]:
        """(phase or None, in HTTP, ours, innermost function) of the stack ending at `frame`."""
        phase: str | None = None
        http = ours = idle = False
        innermost = ""
        while frame is not None:
            code = frame.f_code
            filename = code.co_filename
            if not innermost:
                innermost = f"{filename.rsplit('/', 1)[-1]}:{code.co_name}"
            if not ours and any(part in filename for part in self.scope):
                ours = True
            if not http and code.co_name == _HTTP[1] and filename.endswith(_HTTP[0]):
                http = True
            if phase is None:
                for suffix, label in self.by_name.get(code.co_name, ()):
                    if filename.endswith(suffix):
                        if label == IDLE:
                            idle = True
                        else:
                            phase = label
                        break
            frame = frame.f_back
        if idle and not http:  # a wait inside a request is the request's; any other wait is idle
            phase = IDLE
        return phase, http, ours, innermost


class StackSampler:
    """Samples every thread's stack every `interval` seconds while entered; thread-seconds per phase."""

    def __init__(self, classifier: Classifier, interval: float = 0.001) -> None:
        self.classifier = classifier
        self.interval = interval
        self.seconds: Counter[str] = Counter()  # phase -> thread-seconds
        self.http_seconds: Counter[str] = Counter()  # phase -> thread-seconds waiting for HTTP
        self.unmatched: Counter[str] = Counter()  # innermost function of samples in no phase
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)
        self._switch = sys.getswitchinterval()

    def __enter__(self) -> StackSampler:
        sys.setswitchinterval(self.interval)  # let the sampler in between a busy thread's bytecodes
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        sys.setswitchinterval(self._switch)

    def _run(self) -> None:
        me = threading.get_ident()
        last = time.perf_counter()
        while not self._stop.wait(self.interval):
            now = time.perf_counter()
            dt, last = now - last, now
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                phase, http, ours, innermost = self.classifier.classify(frame)
                if not ours:
                    continue
                label = phase or OTHER
                self.seconds[label] += dt
                if http:
                    self.http_seconds[label] += dt
                if phase is None:
                    self.unmatched[innermost] += 1
                self.samples += 1


@dataclass
class RequestLog:
    """Every HTTP request made while installed: latency, method + endpoint kind, and the phase that sent it."""

    classifier: Classifier
    requests: list[tuple[str, str, float]] = field(default_factory=list)  # (phase, kind, seconds)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextlib.contextmanager
    def installed(self) -> Iterator[RequestLog]:
        import httpx

        original = httpx.Client.send
        log = self

        def send(client: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            phase = log.classifier.classify(sys._getframe(1))[0] or OTHER
            t0 = time.perf_counter()
            try:
                return original(client, request, *args, **kwargs)
            finally:
                seconds = time.perf_counter() - t0
                parts = request.url.path.split("/")
                kind = parts[3] if len(parts) > 3 and parts[1:3] == ["api", "v1"] else "other"
                with log._lock:
                    log.requests.append((phase, f"{request.method} {kind}", seconds))

        httpx.Client.send = send  # type: ignore[method-assign]
        try:
            yield self
        finally:
            httpx.Client.send = original  # type: ignore[method-assign]


class Counters:
    """Exact counts (and time) of fsyncs, atomic state-file writes and TiledWriter objects built."""

    def __init__(self, *, tiledwriter: bool = True) -> None:
        self.tiledwriter = tiledwriter  # False: not TiledWriter's objects (spares importing it)
        self.counts: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()

    def _wrap(self, owner: Any, name: str, label: str) -> Any:
        original = getattr(owner, name)
        counters = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                counters.counts[label] += 1
                counters.seconds[label] += time.perf_counter() - t0

        setattr(owner, name, wrapper)
        return original

    @contextlib.contextmanager
    def installed(self) -> Iterator[Counters]:
        from tiled_writer_sidecar.spool import state_files

        targets: list[tuple[Any, str, str]] = [
            (os, "fsync", "fsync"),
            (state_files, "atomic_write_json", "atomic state-file writes"),
        ]
        if self.tiledwriter:
            from bluesky_tiled_plugins.writing import tiled_writer

            targets += [
                (tiled_writer.RunNormalizer, "__init__", "RunNormalizer built"),
                (tiled_writer._RunWriter, "__init__", "_RunWriter built"),
            ]
        saved = [(owner, name, self._wrap(owner, name, label)) for owner, name, label in targets]
        try:
            yield self
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)


class Profiling:
    """The sampler, the request log and the counters, installed together around a timed upload."""

    def __init__(self, phases: tuple[Phase, ...], scope: tuple[str, ...] = _OURS) -> None:
        classifier = Classifier(phases, scope)
        self.sampler = StackSampler(classifier)
        self.requests = RequestLog(classifier)
        self.counters = Counters()
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Profiling:
        self._stack.enter_context(self.requests.installed())
        self._stack.enter_context(self.counters.installed())
        self._stack.enter_context(self.sampler)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def breakdown(self, *, runs: int, events: int, wall_seconds: float) -> dict[str, Any]:
        return breakdown(
            runs=runs,
            events=events,
            wall_seconds=wall_seconds,
            sampler=self.sampler,
            requests=self.requests,
            counters=self.counters,
        )


def breakdown(
    *,
    runs: int,
    events: int,
    wall_seconds: float,
    sampler: StackSampler,
    requests: RequestLog,
    counters: Counters,
) -> dict[str, Any]:
    """Per-run figures of one profiled upload of `runs` runs of `events` events."""
    per_ms = 1000.0 / runs
    phases = {
        label: {
            "ms_per_run": seconds * per_ms,
            "http_ms_per_run": sampler.http_seconds.get(label, 0.0) * per_ms,
        }
        for label, seconds in sampler.seconds.most_common()
    }
    by_phase: dict[str, list[float]] = {}
    by_kind: dict[str, list[float]] = {}
    for phase, kind, seconds in requests.requests:
        by_phase.setdefault(phase, []).append(seconds)
        by_kind.setdefault(kind, []).append(seconds)
    latencies = sorted(s for _, _, s in requests.requests)

    def stats(values: list[float]) -> dict[str, float]:
        return {"per_run": len(values) / runs, "mean_ms": 1000 * sum(values) / len(values)}

    return {
        "runs": runs,
        "events": events,
        "wall_ms_per_run": wall_seconds * per_ms,
        "thread_ms_per_run": sum(sampler.seconds.values()) * per_ms,
        "samples": sampler.samples,
        "phases": phases,
        "unmatched": dict(sampler.unmatched.most_common(8)),
        "http": {
            "requests_per_run": len(latencies) / runs,
            "ms_per_run": sum(latencies) * per_ms,
            "latency_ms": {
                "mean": 1000 * sum(latencies) / len(latencies) if latencies else None,
                "p50": 1000 * latencies[len(latencies) // 2] if latencies else None,
                "p90": 1000 * latencies[int(len(latencies) * 0.9)] if latencies else None,
                "max": 1000 * latencies[-1] if latencies else None,
            },
            "by_phase": {k: stats(v) for k, v in sorted(by_phase.items(), key=lambda kv: -len(kv[1]))},
            "by_kind": {k: stats(v) for k, v in sorted(by_kind.items(), key=lambda kv: -len(kv[1]))},
        },
        "counts_per_run": {k: n / runs for k, n in sorted(counters.counts.items())},
        "counted_ms_per_run": {k: s * per_ms for k, s in sorted(counters.seconds.items())},
    }
