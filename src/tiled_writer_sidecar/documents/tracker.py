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
- Claims belong to open runs: a descriptor or (stream_)resource uid belongs
  to the open run that declared it first; another open run declaring it is
  rejected (``descriptor-claimed`` / ``resource-claimed``). Once its run has
  closed the uid is free for the next run; until then a late document
  naming it is ``after-stop``. A run repeating its own declaration is accepted.
- Orphans (with `may_orphan`): a descriptor, resource or stop naming a
  ``run_start`` never seen goes to an orphan run keyed by that uid; an event,
  event_page or stream_datum naming an unknown descriptor to one keyed by the
  descriptor uid (``TrackedRun.orphan`` says which); `may_orphan` bounds them.
  That descriptor, once accepted, takes its orphan's claim over and releases
  it (the caller adopts what it holds); a start releases nothing.
- A caller that keeps more per run subclasses `TrackedRun` (``run_type``);
  it may check a start (`new_run`) before it opens the run (`open`).
- Gaps and late copies, per descriptor (one rule, docs/design.md "Gaps"):
  a seq_num above the highest seen + 1 adds the hole to ``missing[stream]``;
  one that falls in a counted hole is a late event: kept, it fills the hole
  and counts in ``out_of_order``; any other seq_num at or below the highest
  (a copy) is ``duplicate-seq-num`` with `reject_duplicates` (the receiver),
  else a received event (the monitor); so is a descriptor received twice in
  its run (``duplicate-descriptor``). A stop's ``num_events`` is kept as
  ``expected_events``; `Received.gaps` adds a shortfall beyond the holes
  (rows covered by stream_datums count as received: ``datum_rows``). A
  seq_num must be an integer in 1..2**53 (``bad-seq-num``).
- Only plain bounded values reach `Received` (`coerce`: the same limits as its file).
- Memory is bounded: descriptors and resources per run and across open
  runs, and the closed runs remembered (to say ``after-stop``).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from event_model import DocumentRouter

from tiled_writer_sidecar.coerce import (
    MAX_NAME,
    as_counts,
    as_float,
    as_int,
    as_text,
)
from tiled_writer_sidecar.errors import ValidationError
from tiled_writer_sidecar.spool.directory import is_safe_uid
from tiled_writer_sidecar.spool.state_files import Received
from tiled_writer_sidecar.states import Rejection

MAX_SEQ_NUM = 2**53
MAX_DESCRIPTORS_PER_RUN = 10_000
MAX_RESOURCES_PER_RUN = 100_000
# Across all open runs (a few hundred bytes each), so max_open_runs hostile runs stay within ~100 MiB.
MAX_DESCRIPTORS_OPEN = 100_000
MAX_RESOURCES_OPEN = 500_000
CLOSED_RUN_MEMORY = 1000  # closed runs remembered, to reject their late documents as after-stop
CLOSED_UID_MEMORY = 100_000  # descriptor / resource uids of closed runs remembered
MAX_HOLES = 1000  # seq_num holes remembered per descriptor; an older hole's late copy is a duplicate
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
RepeatHandler = Callable[["TrackedRun", str, int], None]  # run, stream, a duplicate seq_num
OrphanGate = Callable[[str, str], bool]  # kind ("run_start" / "descriptor"), uid: may an orphan open?
ORPHAN_STREAM = "(descriptor unknown)"  # stream name of the events of a descriptor-keyed orphan


def seq_num(value: object) -> int:
    """A seq_num as a plain int in 1..2**53, or ``ValidationError(Rejection.BAD_SEQ_NUM)``."""
    number = as_int(value, 1, MAX_SEQ_NUM)
    if number is None:
        what = "out of range" if isinstance(value, int) else f"a {type(value).__name__}"
        raise ValidationError(Rejection.BAD_SEQ_NUM, f"seq_num must be an integer in 1..2**53, not {what}")
    return number


def received_from_start(doc: Mapping[str, Any]) -> Received:
    """A run's `Received` from its start document, plain bounded values only."""
    return Received(
        uid=str.__str__(doc["uid"]),
        scan_id=as_int(doc.get("scan_id")),
        plan_name=as_text(doc.get("plan_name"), MAX_NAME),
        start_time=as_float(doc.get("time")),
    )


@dataclass(eq=False, slots=True)
class TrackedRun:
    """One open run: its counters (`received`) and what it declared."""

    received: Received
    streams: dict[str, str] = field(default_factory=dict)  # descriptor uid -> stream name
    last_seq: dict[str, int] = field(default_factory=dict)  # descriptor uid -> highest seq_num
    resources: list[str] = field(default_factory=list)
    holes: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # descriptor -> (first, last)
    orphan: str | None = None  # None, or what keys this run whose start is missing: run_start / descriptor
    uid: str = field(init=False)
    key: str = field(init=False)  # uid, or "<orphan kind>:<uid>" (unique across runs and orphans)

    def __post_init__(self) -> None:
        self.uid = self.received.uid
        self.key = self.uid if self.orphan is None else f"{self.orphan}:{self.uid}"


R = TypeVar("R", bound=TrackedRun)


class RunTracker(DocumentRouter, Generic[R]):
    """Routes documents to open runs and counts their gaps; see the module docstring."""

    def __init__(
        self,
        on_gap: GapHandler | None = None,
        *,
        on_repeat: RepeatHandler | None = None,
        safe_uids: bool = True,
        reject_duplicates: bool = False,
        may_orphan: OrphanGate | None = None,
        run_type: type[R] = TrackedRun,  # type: ignore[assignment]  # R is TrackedRun unless given
    ) -> None:
        """`on_gap` / `on_repeat` hear of each hole / duplicate seq_num as it is counted.

        `safe_uids=False` (the monitor: it shows runs, never stores them)
        accepts any string as a run uid, not only a safe directory name.
        `reject_duplicates` rejects a copy of a received seq_num or descriptor; `may_orphan`
        (None: no orphans) says whether a new orphan run may be opened; `run_type` is
        what each run (and orphan) is made as.
        """
        super().__init__()
        self.runs: dict[str, R] = {}  # open runs, oldest first
        self.run_of_descriptor: dict[str, R] = {}
        self.run_of_resource: dict[str, R] = {}
        self.closed_runs: dict[str, None] = {}
        self.closed_owner: dict[str, str] = {}  # descriptor / resource uid -> its closed run
        self.orphans: dict[str, R] = {}  # by TrackedRun.key: runs whose start is missing
        self.on_gap = on_gap
        self.on_repeat = on_repeat
        self.safe_uids = safe_uids
        self.reject_duplicates = reject_duplicates
        self.may_orphan = may_orphan
        self.run_type = run_type
        self._run: R | None = None
        self._routes: dict[str, Callable[[Any], object]] = {name: getattr(self, name) for name in ROUTED}

    # ---------------------------------------------------------------- public
    def route(self, name: str, doc: dict[str, Any]) -> R:
        """The open run `doc` belongs to (counted), or ValidationError with nothing changed."""
        if name == "event":  # most of the traffic: the next seq_num of a known descriptor
            descriptor = doc["descriptor"]
            run = self.run_of_descriptor.get(descriptor)
            if run is not None:
                seq = doc["seq_num"]
                last = run.last_seq[descriptor]
                if type(seq) is int and seq == last + 1:
                    run.last_seq[descriptor] = seq
                    run.received.note_events(run.streams[descriptor], 1)
                    return run
        method = self._routes.get(name)
        if method is None:
            raise ValidationError(Rejection.UNKNOWN_DOCUMENT, name[:40])
        self._run = None
        method(doc)
        run = self._run
        assert run is not None
        return run

    def new_run(self, doc: Mapping[str, Any]) -> R:
        """The run a start opens, not open yet (`open` it), or ValidationError: the checks of `start`."""
        uid = doc["uid"]
        if not (is_safe_uid(uid) if self.safe_uids else isinstance(uid, str)):
            raise ValidationError(
                Rejection.UNSAFE_UID, repr(uid)[:80] if isinstance(uid, str) else type(uid).__name__
            )
        if uid in self.runs or uid in self.closed_runs:
            raise ValidationError(
                Rejection.REPEATED_START, uid
            )  # an orphan keyed by it stays: the caller adopts it
        return self.run_type(received_from_start(doc))

    def open(self, run: R) -> R:
        """Open a run from `new_run`: documents are routed to it from now on."""
        self.runs[run.uid] = run
        return run

    def resume(self, received: Received) -> R:
        """Open a run known from the spool (crash recovery); its log is then replayed through `route`.

        What ``received.json`` says is untrusted: its identity is made plain
        again, and the counters the log determines (events, missing,
        expected_events, stop) start from zero.
        """
        received.resume()
        return self.open(self.run_type(received))

    def replay(self, received: Received, documents: Iterable[tuple[str, dict[str, Any]]]) -> R:
        """`resume` a run and route its logged `documents` again (the first, its own start, is known).

        Raises what `route` raises for a document the rules reject (the run
        stays open: the caller closes it), or anything a damaged log causes.
        A document of another run opens no orphan here.
        """
        run = self.resume(received)
        gate, self.may_orphan = self.may_orphan, None
        try:
            for n, (name, doc) in enumerate(documents):
                if n == 0 and name == "start" and doc.get("uid") == run.uid:
                    continue
                if name == "start":
                    raise ValidationError(Rejection.REPEATED_START, f"record {n + 1} of run {run.uid}")
                self.route(name, doc)
        finally:
            self.may_orphan = gate
        return run

    def replay_orphan(self, received: Received, documents: Iterable[tuple[str, dict[str, Any]]]) -> R:
        """Open an orphan known from the spool (crash recovery) and route its logged documents again."""
        kind = received.orphan if received.orphan in ("run_start", "descriptor") else "run_start"
        received.forget_routed()
        gate, self.may_orphan = self.may_orphan, lambda k, u: (k, u) == (kind, received.uid)
        try:
            run = self._orphan(kind, received.uid)
            if run is None:
                raise ValidationError(Rejection.UNSAFE_UID, received.uid[:80])
            run.received = received
            self.may_orphan = None
            for name, doc in documents:
                if self.route(name, doc) is not run:
                    raise ValidationError("orphan-log", f"a document of another run in orphan {run.key}")
        finally:
            self.may_orphan = gate
        return run

    def close(self, run: R) -> None:
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
                    self.closed_owner[key] = uid  # only to say after-stop: the uid is free to claim
        _trim(self.closed_owner, CLOSED_UID_MEMORY)

    def release_orphan(self, run: R) -> None:
        """Forget an orphan run and free its claims (its start or descriptor came: it is adopted, or
        given up)."""
        if self.orphans.get(run.key) is not run:
            return
        del self.orphans[run.key]
        for owned, owners in ((run.streams, self.run_of_descriptor), (run.resources, self.run_of_resource)):
            for key in owned:
                if owners.get(key) is run:
                    del owners[key]

    def orphan(self, kind: str, uid: str) -> R | None:
        """The orphan run keyed by `kind` (run_start / descriptor) and `uid`, if there is one."""
        return self.orphans.get(f"{kind}:{uid}")

    def closed_run_of(self, name: str, doc: Mapping[str, Any]) -> str | None:
        """The uid of the closed run a document names (a run_start, descriptor or resource), or None."""
        if name in ("event", "event_page", "stream_datum"):
            return self.closed_owner.get(doc.get("descriptor"))  # type: ignore[arg-type]
        if name in ("datum", "datum_page"):
            return self.closed_owner.get(doc.get("resource"))  # type: ignore[arg-type]
        uid = doc.get("run_start")
        return uid if isinstance(uid, str) and uid in self.closed_runs else None

    def idlest(self, but: str = "", *, start_only: bool = False) -> R | None:
        """The open run (other than `but`; with `start_only` one that declared nothing) idle longest."""
        runs = (
            run
            for run in self.runs.values()
            if run.uid != but and not (start_only and (run.streams or run.resources))
        )
        return min(runs, key=lambda r: r.received.last_received, default=None)

    # ---------------------------------------------- one method per document
    def start(self, doc: Any) -> None:
        self._run = self.open(self.new_run(doc))

    def descriptor(self, doc: Any) -> None:
        run = self._declaring_run("descriptor", doc)
        uid = doc["uid"]
        # Its events came first, into an orphan keyed by it (none while replaying: the gate is off then).
        waiting = self.orphans.get(f"descriptor:{uid}") if self.may_orphan is not None else None
        self._check_claim("descriptor", uid, run, self.run_of_descriptor, but=waiting)
        if self.reject_duplicates and uid in run.streams:  # a copy (e.g. a proxy's replay): spooled once
            raise ValidationError(
                Rejection.DUPLICATE_DESCRIPTOR, f"descriptor {str(uid)[:80]} of run {run.uid} again"
            )
        if uid not in run.streams and len(run.streams) >= MAX_DESCRIPTORS_PER_RUN:
            raise ValidationError(
                Rejection.TOO_MANY_DESCRIPTORS, f"run {run.uid} has {MAX_DESCRIPTORS_PER_RUN}"
            )
        held = len(self.run_of_descriptor) - (waiting is not None)  # the orphan's claim is this one's
        if uid not in run.streams and held >= MAX_DESCRIPTORS_OPEN:
            raise ValidationError(Rejection.TOO_MANY_DESCRIPTORS, f"open runs hold {MAX_DESCRIPTORS_OPEN}")
        if waiting is not None:
            self.release_orphan(waiting)  # accepted: the caller adopts what it holds
        run.streams[uid] = as_text(doc.get("name", "primary"), MAX_NAME) or "primary"
        run.last_seq.setdefault(uid, 0)
        self.run_of_descriptor[uid] = run
        self.closed_owner.pop(uid, None)  # claimed anew: no longer a closed run's
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
        run = self._described_run("stream_datum", doc)
        seq_nums = doc.get("seq_nums")
        last = as_int(seq_nums.get("stop"), 1, MAX_SEQ_NUM + 1) if isinstance(seq_nums, Mapping) else None
        if last is not None:  # rows covered by external data: what stop.num_events counts for such a stream
            run.received.note_datum_rows(run.streams[doc["descriptor"]], last - 1)

    def datum(self, doc: Any) -> Any:
        self._resourced_run(doc)
        return None

    def datum_page(self, doc: Any) -> None:
        self._resourced_run(doc)

    def stop(self, doc: Any) -> None:
        run = self._declaring_run("stop", doc)
        run.received.note_stop(
            as_text(doc.get("exit_status"), MAX_NAME), as_counts(doc.get("num_events"), MAX_SEQ_NUM)
        )

    # ---------------------------------------------------------------- rules
    def _declaring_run(self, name: str, doc: Any) -> R:
        """The open run named by ``run_start`` (a legacy resource without it: the newest one), or its orphan."""
        uid = doc.get("run_start")
        if uid is None and self.runs:
            uid = next(reversed(self.runs))
        run = self.runs.get(uid) if isinstance(uid, str) else None
        if run is None:
            if not (isinstance(uid, str) and uid in self.closed_runs):
                run = self._orphan("run_start", uid)
            if run is None and isinstance(uid, str) and uid in self.closed_runs:  # (the gate may say so)
                declared = doc.get("uid")
                if name != "stop" and isinstance(declared, str):  # so its events are after-stop too
                    self.closed_owner.setdefault(declared, uid)
                    _trim(self.closed_owner, CLOSED_UID_MEMORY)
                raise ValidationError(Rejection.AFTER_STOP, f"run {uid[:80]}")
            if run is None:
                raise ValidationError(Rejection.for_unknown_run(name), f"run {str(uid)[:80]}" if uid else "")
        self._run = run
        return run

    def _described_run(self, name: str, doc: Any) -> R:
        descriptor = doc["descriptor"]
        run = self.run_of_descriptor.get(descriptor)
        if run is None:
            if descriptor in self.closed_owner:
                raise ValidationError(Rejection.AFTER_STOP, f"run {self.closed_owner[descriptor]}")
            run = self._orphan("descriptor", descriptor)
            if run is None:
                raise ValidationError(Rejection.before_descriptor(name), f"descriptor {str(descriptor)[:80]}")
        self._run = run
        return run

    def _orphan(self, kind: str, uid: Any) -> R | None:
        """The orphan run keyed by `kind` and `uid`, opened if `may_orphan` allows; None if not."""
        if not is_safe_uid(uid):
            return None
        run = self.orphans.get(f"{kind}:{uid}")
        if run is not None or self.may_orphan is None or not self.may_orphan(kind, uid):
            return run
        run = self.run_type(Received(uid=uid, start_missing=True, orphan=kind), orphan=kind)
        if kind == "descriptor":
            run.streams[uid] = ORPHAN_STREAM
            run.last_seq[uid] = 0
            self.run_of_descriptor[uid] = run
        self.orphans[run.key] = run
        return run

    def _resourced_run(self, doc: Any) -> R:
        resource = doc["resource"]
        run = self.run_of_resource.get(resource)
        if run is None:
            if resource in self.closed_owner:
                raise ValidationError(Rejection.AFTER_STOP, f"run {self.closed_owner[resource]}")
            raise ValidationError(Rejection.DATUM_BEFORE_RESOURCE, f"resource {str(resource)[:80]}")
        self._run = run
        return run

    def _check_claim(self, kind: str, uid: Any, run: R, owners: dict[str, R], but: R | None = None) -> None:
        """First claim wins: `uid` may be declared again only by the run that declared it first (or
        taken from `but`)."""
        owner = owners.get(uid)
        if owner is not None and owner is not run and owner is not but:
            raise ValidationError(f"{kind}-claimed", f"{kind} {str(uid)[:80]} belongs to run {owner.uid}")

    def _declare_resource(self, run: R, uid: Any) -> None:
        self._check_claim("resource", uid, run, self.run_of_resource)
        if self.run_of_resource.get(uid) is run:
            return
        if len(run.resources) >= MAX_RESOURCES_PER_RUN:
            raise ValidationError(Rejection.TOO_MANY_RESOURCES, f"run {run.uid} has {MAX_RESOURCES_PER_RUN}")
        if len(self.run_of_resource) >= MAX_RESOURCES_OPEN:
            raise ValidationError(Rejection.TOO_MANY_RESOURCES, f"open runs hold {MAX_RESOURCES_OPEN}")
        run.resources.append(uid)
        self.run_of_resource[uid] = run
        self.closed_owner.pop(uid, None)  # claimed anew: no longer a closed run's

    def _count(self, run: R, descriptor: str, seq_nums: list[int]) -> None:
        """Count events, seq_num holes and late events (the rule of the module docstring)."""
        stream = run.streams[descriptor]
        last = run.last_seq[descriptor]
        holes = run.holes.setdefault(descriptor, [])
        if self.reject_duplicates:  # decided before anything changes
            seen: set[int] = set()
            for seq in seq_nums:
                if seq in seen or (seq <= last and _hole_at(holes, seq) is None):
                    if self.on_repeat is not None:
                        self.on_repeat(run, stream, seq)
                    raise ValidationError(
                        Rejection.DUPLICATE_SEQ_NUM, f"seq_num {seq} of stream {stream!r} again"
                    )
                seen.add(seq)
        received = run.received
        counted = 0
        for seq in seq_nums:
            if seq > last + 1:
                received.note_hole(stream, seq - last - 1)
                holes.append((last + 1, seq - 1))
                if len(holes) > MAX_HOLES:
                    del holes[0]
                if self.on_gap is not None:
                    self.on_gap(run, stream, last + 1, seq - 1)
            elif seq <= last:
                index = _hole_at(holes, seq)
                if index is not None:  # late, but new: fills its hole
                    _fill(holes, index, seq)
                    received.note_late(stream)
                elif self.on_repeat is not None:
                    self.on_repeat(run, stream, seq)
            counted += 1
            last = max(last, seq)
        received.note_events(stream, counted)
        run.last_seq[descriptor] = last


def _hole_at(holes: list[tuple[int, int]], seq: int) -> int | None:
    """The index of the hole (sorted, disjoint ``(first, last)``) that holds `seq`, or None."""
    index = bisect.bisect_right(holes, (seq, MAX_SEQ_NUM + 1)) - 1
    return index if index >= 0 and holes[index][0] <= seq <= holes[index][1] else None


def _fill(holes: list[tuple[int, int]], index: int, seq: int) -> None:
    """Take `seq` out of the hole at `index` (split in two if it was inside)."""
    first, last = holes[index]
    pieces = [(a, b) for a, b in ((first, seq - 1), (seq + 1, last)) if a <= b]
    holes[index : index + 1] = pieces
    if len(holes) > MAX_HOLES:
        del holes[0]


def _trim(memory: dict[str, Any], limit: int) -> None:
    """Forget the oldest entries of an insertion-ordered dict beyond `limit`."""
    while len(memory) > limit:
        del memory[next(iter(memory))]
