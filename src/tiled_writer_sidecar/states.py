"""The names both processes and the monitor share: Tiled's state, the health status, rejection reasons.

The receiver and the uploader (two OS processes) and the monitor exchange
these through files and HTTP: the uploader writes `TiledState` into
``uploader.json``, the receiver reads it for ``/metrics``, ``/healthz``,
systemd's STATUS line and ``status``; ``/healthz`` says a `HealthStatus`
that the monitor reads; the receiver (and the monitor's own tracker) name a
rejected message by a `Rejection`. Each is a StrEnum whose values are the
strings on disk and on the wire, so existing spools, metric labels and the
alert rules in conf/prometheus read the same bytes as before.
"""

from __future__ import annotations

from enum import StrEnum


class TiledState(StrEnum):
    """Tiled as the uploader sees it (``uploader.json``'s ``tiled``; one ``tiled_state`` series each)."""

    CONNECTING = "connecting"  # the uploader has not reached Tiled yet
    UP = "up"
    DOWN = "down"  # no answer, or 5xx
    UNAUTHORIZED = "unauthorized"  # the API key is refused or missing
    NOT_TILED = "not_tiled"  # the URI answers, but not as Tiled
    UNKNOWN = "unknown"  # no uploader.json yet (or a value this version does not know): never written

    @property
    def misconfigured(self) -> bool:
        """A setting is wrong ([tiled] uri or the API key): retrying does not help, a person must act."""
        return self in (TiledState.UNAUTHORIZED, TiledState.NOT_TILED)

    @classmethod
    def of(cls, value: object) -> TiledState:
        """`value` as read from ``uploader.json``: a known state, else `UNKNOWN`."""
        known = cls._value2member_map_.get(value) if isinstance(value, str) else None
        return known if isinstance(known, cls) else cls.UNKNOWN


#: The states the uploader records (`TiledState.UNKNOWN` is the readers' own).
TILED_STATES: tuple[TiledState, ...] = tuple(s for s in TiledState if s is not TiledState.UNKNOWN)


class HealthStatus(StrEnum):
    """``/healthz``'s ``status``: HTTP 200 unless unhealthy (`health.health_snapshot` decides)."""

    OK = "ok"
    DEGRADED = "degraded"  # it runs but cannot do its job (``warnings``): no proxy, a wrong Tiled setting
    UNHEALTHY = "unhealthy"  # it cannot receive or spool (``reasons``)


class RejectionCategory(StrEnum):
    """What a rejection says about the message (`Rejection.category`)."""

    DECODE = "decode"  # the bytes are not a document (`wire`)
    FOREIGN = "foreign"  # another publisher's message: ignored, never counted
    SCHEMA = "schema"  # not a valid event-model document (`validation`)
    RUN = "run"  # breaks its run's structure (`tracker`)
    ORPHAN = "orphan"  # its run's start (or descriptor, resource) was never seen (`tracker`)
    LIMIT = "limit"  # a bound of the receiver was reached (queue, orphans, descriptors, resources)


class Rejection(StrEnum):
    """Why a message was rejected: the metric label, the quarantine's reason. Besides these, the receiver
    names an exception of its own ``internal-error:<Type>`` (`ingest.internal_error`)."""

    # the decoder (`wire.decode_message`)
    FRAME_COUNT = "frame-count"  # not exactly one frame
    OVERSIZED = "oversized"  # the frame is longer than max_bytes
    ENVELOPE = "envelope"  # not `prefix name payload`
    PREFIX_MISMATCH = "prefix-mismatch"  # another publisher's prefix (callers ignore these)
    UNKNOWN_DOCUMENT = "unknown-document"  # name is not an event-model document name
    TRUNCATED = "truncated"  # the payload ends too early (also: empty payload)
    GARBAGE = "garbage"  # not a well-formed payload of the chosen format
    PICKLE_FORBIDDEN_GLOBAL = "pickle-forbidden-global"  # pickle asked for a global outside the allow-list
    MSGPACK_OBJECT_ARRAY = "msgpack-object-array"  # msgpack_numpy object array (it would need unpickling)
    TOO_COMPLEX = "too-complex"  # too deep, too much sharing, memo index out of range
    NOT_A_DOCUMENT = "not-a-document"  # top level is not a dict with str keys
    UNSUPPORTED_TYPE = "unsupported-type"  # a value or key a document cannot hold
    # the validator (`validation`)
    SCHEMA = "schema"
    # the tracker and ingest: the run's structure
    UNSAFE_UID = "unsafe-uid"
    REPEATED_START = "repeated-start"
    BAD_SEQ_NUM = "bad-seq-num"
    DUPLICATE_SEQ_NUM = "duplicate-seq-num"
    DUPLICATE_DESCRIPTOR = "duplicate-descriptor"
    AFTER_STOP = "after-stop"
    ORPHANS_FULL = "orphans-full"
    TOO_MANY_DESCRIPTORS = "too-many-descriptors"
    TOO_MANY_RESOURCES = "too-many-resources"
    DATUM_BEFORE_RESOURCE = "datum-before-resource"
    EVENT_BEFORE_DESCRIPTOR = "event-before-descriptor"
    EVENT_PAGE_BEFORE_DESCRIPTOR = "event_page-before-descriptor"
    STREAM_DATUM_BEFORE_DESCRIPTOR = "stream_datum-before-descriptor"
    DESCRIPTOR_FOR_UNKNOWN_RUN = "descriptor-for-unknown-run"
    STOP_FOR_UNKNOWN_RUN = "stop-for-unknown-run"
    RESOURCE_FOR_UNKNOWN_RUN = "resource-for-unknown-run"
    STREAM_RESOURCE_FOR_UNKNOWN_RUN = "stream_resource-for-unknown-run"
    # the receiver
    QUEUE_FULL = "queue-full"  # the receive queue had no room for the message

    @property
    def category(self) -> RejectionCategory:
        return _CATEGORIES.get(self, RejectionCategory.RUN)

    @classmethod
    def for_unknown_run(cls, name: str) -> Rejection:
        """A ``name`` document (descriptor, resource, stream_resource, stop) of a run never started."""
        return cls(f"{name}-for-unknown-run")

    @classmethod
    def before_descriptor(cls, name: str) -> Rejection:
        """A ``name`` document (event, event_page, stream_datum) of a descriptor never seen."""
        return cls(f"{name}-before-descriptor")


_DECODER = (
    Rejection.FRAME_COUNT,
    Rejection.OVERSIZED,
    Rejection.ENVELOPE,
    Rejection.UNKNOWN_DOCUMENT,
    Rejection.TRUNCATED,
    Rejection.GARBAGE,
    Rejection.PICKLE_FORBIDDEN_GLOBAL,
    Rejection.MSGPACK_OBJECT_ARRAY,
    Rejection.TOO_COMPLEX,
    Rejection.NOT_A_DOCUMENT,
    Rejection.UNSUPPORTED_TYPE,
)
_ORPHANS = (
    Rejection.DATUM_BEFORE_RESOURCE,
    Rejection.EVENT_BEFORE_DESCRIPTOR,
    Rejection.EVENT_PAGE_BEFORE_DESCRIPTOR,
    Rejection.STREAM_DATUM_BEFORE_DESCRIPTOR,
    Rejection.DESCRIPTOR_FOR_UNKNOWN_RUN,
    Rejection.STOP_FOR_UNKNOWN_RUN,
    Rejection.RESOURCE_FOR_UNKNOWN_RUN,
    Rejection.STREAM_RESOURCE_FOR_UNKNOWN_RUN,
)
_LIMITS = (
    Rejection.ORPHANS_FULL,
    Rejection.TOO_MANY_DESCRIPTORS,
    Rejection.TOO_MANY_RESOURCES,
    Rejection.QUEUE_FULL,
)
#: Each reason's category; the others are RUN.
_CATEGORIES: dict[Rejection, RejectionCategory] = {
    **dict.fromkeys(_DECODER, RejectionCategory.DECODE),
    Rejection.PREFIX_MISMATCH: RejectionCategory.FOREIGN,
    Rejection.SCHEMA: RejectionCategory.SCHEMA,
    **dict.fromkeys(_ORPHANS, RejectionCategory.ORPHAN),
    **dict.fromkeys(_LIMITS, RejectionCategory.LIMIT),
}


def rejection_category(reason: str) -> RejectionCategory | None:
    """The category of a counted reason (a `Rejection`'s value); None for one outside the enum
    (``internal-error:<Type>``, the monitor's own ``decode-error``)."""
    try:
        return Rejection(reason).category
    except ValueError:
        return None


def counted(reason: str) -> bool:
    """Whether a rejection is counted and kept: all but another publisher's messages (ignored)."""
    return rejection_category(reason) != RejectionCategory.FOREIGN
