"""RunTracker: which run each document belongs to, and the one definition of gaps.

A pure `event_model.DocumentRouter` (no files, no sockets), one method per
document kind; the receiver, its crash recovery and `monitor` share it
(docs/design.md, "The receive side: three parts, composed once"). Contract:

- `route(name, doc)` returns the open `TrackedRun` the document belongs to,
  or raises `ValidationError(reason)` and changes nothing. A start opens a
  run; descriptors, resources and stream_resources name theirs
  (``run_start``; a legacy resource without it goes to the newest open run);
  events, event_pages and stream_datums follow their descriptor, datums and
  datum_pages their resource. A stop is routed, then the caller `close`\\ s
  the run.
- Ownership: a descriptor or (stream_)resource uid belongs to the first run
  that declared it; another run declaring it, open or recently closed, is
  rejected (``descriptor-claimed`` / ``resource-claimed``). A run repeating
  its own declaration is accepted.
- Gaps, per descriptor: a seq_num above the highest seen + 1 adds the hole
  to ``missing[stream]``; one at or below it is a received event, never a
  gap, and never fills a counted hole. A stop's ``num_events`` is kept as
  ``expected_events``; `Received.gaps` adds a shortfall beyond the holes. A
  seq_num must be an integer in 1..2**53 (``bad-seq-num``).
- Only plain bounded values reach `Received` (`plain_int`, `plain_str`).
- Memory is bounded: descriptors and resources per run and across open
  runs, and the closed runs remembered (to say ``after-stop``).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from event_model import DocumentRouter

from .errors import ValidationError
from .spool.directory import is_safe_uid
from .spool.index import Received

MAX_SEQ_NUM = 2**53
MAX_DESCRIPTORS_PER_RUN = 10_000
MAX_RESOURCES_PER_RUN = 100_000
# Across all open runs (a few hundred bytes each), so max_open_runs hostile runs stay within ~100 MiB.
MAX_DESCRIPTORS_OPEN = 100_000
MAX_RESOURCES_OPEN = 500_000
MAX_STREAMS = 10_000  # entries kept from a stop's num_events
MAX_TEXT = 256  # characters kept of plan names, stream names, exit status
CLOSED_RUN_MEMORY = 1000  # closed runs remembered, to reject their late documents as after-stop
CLOSED_UID_MEMORY = 100_000  # descriptor / resource uids of closed runs remembered
ROUTED = (
    "start",
    "descriptor",
    "resource",
    "stream_resource",
    "event",
    "event_page",
    "datum",
    "datum_page",
    "stream_datum",
    "stop",
)

GapHandler = Callable[["TrackedRun", str, int, int], None]  # run, stream, first, last missing seq_num
RepeatHandler = Callable[["TrackedRun", str, int], None]  # run, stream, a duplicate or late seq_num


def plain_int(value: object, low: int, high: int) -> int | None:
    """`value` as a plain int if it is an integer (or integral float) in low..high, else None."""
    if type(value) is int:
        number = value
    elif isinstance(value, bool):
        return None
    elif isinstance(value, float):
        if not value.is_integer():
            return None
        number = int(value)
    else:
        try:
            number = operator.index(value)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001  # anything that is not an integer
            return None
    return int(number) if low <= number <= high else None


def plain_str(value: object, limit: int = MAX_TEXT) -> str | None:
    """`value` as a plain str of at most `limit` characters, or None if it is not a string."""
    if not isinstance(value, str):
        return None
    return str.__str__(value)[:limit]


def plain_float(value: object) -> float | None:
    """`value` as a finite plain float, or None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except Exception:  # noqa: BLE001  # a Real that will not convert
        return None
    return number if math.isfinite(number) else None


def plain_counts(value: object) -> dict[str, int]:
    """A stop's ``num_events`` as ``{stream: count}`` of plain values; entries that are not dropped."""
    counts: dict[str, int] = {}
    if not isinstance(value, Mapping):
        return counts
    for key, count in value.items():
        stream, number = plain_str(key), plain_int(count, 0, MAX_SEQ_NUM)
        if stream is not None and number is not None:
            counts[stream] = number
            if len(counts) >= MAX_STREAMS:
                break
    return counts


def seq_num(value: object) -> int:
    """A seq_num as a plain int in 1..2**53, or ``ValidationError("bad-seq-num")``."""
    number = plain_int(value, 1, MAX_SEQ_NUM)
    if number is None:
        what = "out of range" if isinstance(value, int) else f"a {type(value).__name__}"
        raise ValidationError("bad-seq-num", f"seq_num must be an integer in 1..2**53, not {what}")
    return number


def received_from_start(doc: Mapping[str, Any]) -> Received:
    """A run's `Received` from its start document, plain bounded values only."""
    return Received(
        uid=str.__str__(doc["uid"]),
        scan_id=plain_int(doc.get("scan_id"), -(2**63), 2**63 - 1),
        plan_name=plain_str(doc.get("plan_name")),
        start_time=plain_float(doc.get("time")),
    )


@dataclass(eq=False, slots=True)
class TrackedRun:
    """One open run: its counters (`received`) and what it declared."""

    received: Received
    streams: dict[str, str] = field(default_factory=dict)  # descriptor uid -> stream name
    last_seq: dict[str, int] = field(default_factory=dict)  # descriptor uid -> highest seq_num
    resources: list[str] = field(default_factory=list)
    uid: str = field(init=False)

    def __post_init__(self) -> None:
        self.uid = self.received.uid


class RunTracker(DocumentRouter):
    """Routes documents to open runs and counts their gaps; see the module docstring."""

    def __init__(
        self,
        on_gap: GapHandler | None = None,
        *,
        on_repeat: RepeatHandler | None = None,
        safe_uids: bool = True,
    ) -> None:
        """`on_gap` / `on_repeat` hear of each hole / duplicate-or-late seq_num as it is counted.

        `safe_uids=False` (the monitor: it shows runs, never stores them)
        accepts any string as a run uid, not only a safe directory name.
        """
        super().__init__()
        self.runs: dict[str, TrackedRun] = {}  # open runs, oldest first
        self.run_of_descriptor: dict[str, TrackedRun] = {}
        self.run_of_resource: dict[str, TrackedRun] = {}
        self.closed_runs: dict[str, None] = {}
        self.closed_owner: dict[str, str] = {}  # descriptor / resource uid -> its closed run
        self.on_gap = on_gap
        self.on_repeat = on_repeat
        self.safe_uids = safe_uids
        self._run: TrackedRun | None = None
        self._routes: dict[str, Callable[[Any], object]] = {name: getattr(self, name) for name in ROUTED}

    # ---------------------------------------------------------------- public
    def route(self, name: str, doc: dict[str, Any]) -> TrackedRun:
        """The open run `doc` belongs to (counted), or ValidationError with nothing changed."""
        if name == "event":  # most of the traffic: the next seq_num of a known descriptor
            descriptor = doc["descriptor"]
            run = self.run_of_descriptor.get(descriptor)
            if run is not None:
                seq = doc["seq_num"]
                last = run.last_seq[descriptor]
                if type(seq) is int and seq == last + 1:
                    run.last_seq[descriptor] = seq
                    events = run.received.events
                    stream = run.streams[descriptor]
                    events[stream] = events.get(stream, 0) + 1
                    return run
        method = self._routes.get(name)
        if method is None:
            raise ValidationError("unknown-document", name[:40])
        self._run = None
        method(doc)
        run = self._run
        assert run is not None
        return run

    def resume(self, received: Received) -> TrackedRun:
        """Open a run known from the spool (crash recovery); its log is then replayed through `route`.

        What ``received.json`` says is untrusted: its identity is made plain
        again, and the counters the log determines (events, missing,
        expected_events, stop) start from zero.
        """
        received.scan_id = plain_int(received.scan_id, -(2**63), 2**63 - 1)
        received.plan_name = plain_str(received.plan_name)
        received.start_time = plain_float(received.start_time)
        received.first_received = plain_float(received.first_received) or 0.0
        received.last_received = plain_float(received.last_received) or 0.0
        received.dropped = plain_int(received.dropped, 0, 2**63) or 0
        received.events, received.missing = {}, {}
        received.expected_events, received.stop_received, received.exit_status = None, False, None
        run = TrackedRun(received)
        self.runs[received.uid] = run
        return run

    def replay(self, received: Received, documents: Iterable[tuple[str, dict[str, Any]]]) -> TrackedRun:
        """`resume` a run and route its logged `documents` again (the first, its own start, is known).

        Raises what `route` raises for a document the rules reject (the run
        stays open: the caller closes it), or anything a damaged log causes.
        """
        run = self.resume(received)
        for n, (name, doc) in enumerate(documents):
            if n == 0 and name == "start" and doc.get("uid") == run.uid:
                continue
            if name == "start":
                raise ValidationError("repeated-start", f"record {n + 1} of run {run.uid}")
            self.route(name, doc)
        return run

    def close(self, run: TrackedRun) -> None:
        """Forget an open run; its late documents are then rejected as ``after-stop``."""
        uid = run.uid
        if self.runs.get(uid) is not run:
            return
        del self.runs[uid]
        self.closed_runs[uid] = None
        _trim(self.closed_runs, CLOSED_RUN_MEMORY)
        for owned, owners in ((run.streams, self.run_of_descriptor), (run.resources, self.run_of_resource)):
            for key in owned:
                if owners.get(key) is run:
                    del owners[key]
                self.closed_owner[key] = uid
        _trim(self.closed_owner, CLOSED_UID_MEMORY)

    def discard(self, run: TrackedRun) -> None:
        """Undo the opening of a run that could not be created (no trace of it kept)."""
        if self.runs.get(run.uid) is run and not run.streams and not run.resources:
            del self.runs[run.uid]

    def idlest(self, but: str = "") -> TrackedRun | None:
        """The open run (other than `but`) that received nothing for the longest time."""
        runs = (run for run in self.runs.values() if run.uid != but)
        return min(runs, key=lambda r: r.received.last_received, default=None)

    # ---------------------------------------------- one method per document
    def start(self, doc: Any) -> None:
        uid = doc["uid"]
        if not (is_safe_uid(uid) if self.safe_uids else isinstance(uid, str)):
            raise ValidationError(
                "unsafe-uid", repr(uid)[:80] if isinstance(uid, str) else type(uid).__name__
            )
        if uid in self.runs or uid in self.closed_runs:
            raise ValidationError("repeated-start", uid)
        run = TrackedRun(received_from_start(doc))
        self.runs[run.uid] = run
        self._run = run

    def descriptor(self, doc: Any) -> None:
        run = self._declaring_run("descriptor", doc)
        uid = doc["uid"]
        self._check_claim("descriptor", uid, run, self.run_of_descriptor)
        if uid not in run.streams and len(run.streams) >= MAX_DESCRIPTORS_PER_RUN:
            raise ValidationError("too-many-descriptors", f"run {run.uid} has {MAX_DESCRIPTORS_PER_RUN}")
        if uid not in run.streams and len(self.run_of_descriptor) >= MAX_DESCRIPTORS_OPEN:
            raise ValidationError("too-many-descriptors", f"open runs hold {MAX_DESCRIPTORS_OPEN}")
        run.streams[uid] = plain_str(doc.get("name", "primary")) or "primary"
        run.last_seq.setdefault(uid, 0)
        self.run_of_descriptor[uid] = run
        self._run = run

    def resource(self, doc: Any) -> None:
        run = self._declaring_run("resource", doc)
        self._declare_resource(run, doc["uid"])

    def stream_resource(self, doc: Any) -> None:
        run = self._declaring_run("stream_resource", doc)
        self._declare_resource(run, doc["uid"])

    def event(self, doc: Any) -> Any:
        run = self._described_run("event", doc)
        self._count(run, doc["descriptor"], [seq_num(doc["seq_num"])])
        return None

    def event_page(self, doc: Any) -> Any:
        run = self._described_run("event_page", doc)
        self._count(run, doc["descriptor"], [seq_num(s) for s in doc["seq_num"]])
        return None

    def stream_datum(self, doc: Any) -> None:
        self._described_run("stream_datum", doc)

    def datum(self, doc: Any) -> Any:
        self._resourced_run(doc)
        return None

    def datum_page(self, doc: Any) -> None:
        self._resourced_run(doc)

    def stop(self, doc: Any) -> None:
        run = self._declaring_run("stop", doc)
        received = run.received
        received.stop_received = True
        received.exit_status = plain_str(doc.get("exit_status"))
        received.expected_events = plain_counts(doc.get("num_events"))

    # ---------------------------------------------------------------- rules
    def _declaring_run(self, name: str, doc: Any) -> TrackedRun:
        """The open run named by ``run_start`` (a legacy resource without it: the newest one)."""
        uid = doc.get("run_start")
        if uid is None and self.runs:
            uid = next(reversed(self.runs))
        run = self.runs.get(uid) if isinstance(uid, str) else None
        if run is None:
            reason = (
                "after-stop"
                if isinstance(uid, str) and uid in self.closed_runs
                else f"{name}-for-unknown-run"
            )
            raise ValidationError(reason, f"run {str(uid)[:80]}" if isinstance(uid, str) else "")
        self._run = run
        return run

    def _described_run(self, name: str, doc: Any) -> TrackedRun:
        descriptor = doc["descriptor"]
        run = self.run_of_descriptor.get(descriptor)
        if run is None:
            if descriptor in self.closed_owner:
                raise ValidationError("after-stop", f"run {self.closed_owner[descriptor]}")
            raise ValidationError(f"{name}-before-descriptor", f"descriptor {str(descriptor)[:80]}")
        self._run = run
        return run

    def _resourced_run(self, doc: Any) -> TrackedRun:
        resource = doc["resource"]
        run = self.run_of_resource.get(resource)
        if run is None:
            if resource in self.closed_owner:
                raise ValidationError("after-stop", f"run {self.closed_owner[resource]}")
            raise ValidationError("datum-before-resource", f"resource {str(resource)[:80]}")
        self._run = run
        return run

    def _check_claim(self, kind: str, uid: Any, run: TrackedRun, owners: dict[str, TrackedRun]) -> None:
        """First claim wins: `uid` may be declared again only by the run that declared it first."""
        owner = owners.get(uid)
        owner_uid = owner.uid if owner is not None else self.closed_owner.get(uid)
        if owner_uid is not None and owner is not run:
            raise ValidationError(f"{kind}-claimed", f"{kind} {str(uid)[:80]} belongs to run {owner_uid}")

    def _declare_resource(self, run: TrackedRun, uid: Any) -> None:
        self._check_claim("resource", uid, run, self.run_of_resource)
        if self.run_of_resource.get(uid) is run:
            return
        if len(run.resources) >= MAX_RESOURCES_PER_RUN:
            raise ValidationError("too-many-resources", f"run {run.uid} has {MAX_RESOURCES_PER_RUN}")
        if len(self.run_of_resource) >= MAX_RESOURCES_OPEN:
            raise ValidationError("too-many-resources", f"open runs hold {MAX_RESOURCES_OPEN}")
        run.resources.append(uid)
        self.run_of_resource[uid] = run

    def _count(self, run: TrackedRun, descriptor: str, seq_nums: list[int]) -> None:
        """Count events and seq_num holes (the gap rule of the module docstring)."""
        stream = run.streams[descriptor]
        received = run.received
        received.events[stream] = received.events.get(stream, 0) + len(seq_nums)
        last = run.last_seq[descriptor]
        for seq in seq_nums:
            if seq > last + 1:
                missing = seq - last - 1
                received.missing[stream] = received.missing.get(stream, 0) + missing
                if self.on_gap is not None:
                    self.on_gap(run, stream, last + 1, seq - 1)
            elif seq <= last and self.on_repeat is not None:
                self.on_repeat(run, stream, seq)
            last = max(last, seq)
        run.last_seq[descriptor] = last


def _trim(memory: dict[str, Any], limit: int) -> None:
    """Forget the oldest entries of an insertion-ordered dict beyond `limit`."""
    while len(memory) > limit:
        del memory[next(iter(memory))]
