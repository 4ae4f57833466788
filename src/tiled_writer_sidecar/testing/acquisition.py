"""A real RunEngine publishing to the proxy, and what Tiled must then hold.

`Acquisition` owns a `RunEngine` (on its own event loop, closed again by
`close()`) with two subscribers: a `DocumentRecorder` that keeps a deep
copy of every (name, doc) emitted, and bluesky's standard
`bluesky.callbacks.zmq.Publisher` (pickle, the default) connected to the
proxy's `in` address, set up as the project recommends: deepened with
`tiled_writer_sidecar.publisher.deepen` (a send queue of
`DEFAULT_QUEUE_MESSAGES` instead of 0MQ's 1,000; ``queue_messages=None``
keeps the stock Publisher). No Publisher with `in_address=None`: an
in-process baseline where the caller subscribes `TiledWriter` to `RE` itself.
`run(plan)` returns the run uids and records the plan's wall time.

Slow joiners: a Publisher's first messages are dropped until the proxy's
subscription reached it, and the proxy drops messages for a subscriber
whose subscription it has not seen yet. `wait_subscribers()` publishes
probe frames (`proxy.PROBE_PREFIX`, never a document) through this very
Publisher until a private SUB on the proxy's `out` sees one, and until the
caller's `ready()` predicate holds (e.g. "the sidecar counted a message"),
because only the caller knows how to ask its subscriber.

`expected_rows()` turns the recorded documents into the rows TiledWriter
puts in a stream's `internal` table (same rules as its RunNormalizer):
`seq_num`, `time`, every internal data key, and `ts_<key>` for each;
external (unfilled) keys are left out; data keys named `time`/`seq_num`
become `time_`/`seq_num_`. Values are plain Python (lists, not arrays).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import secrets
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Self

import numpy
import zmq
from bluesky import RunEngine
from bluesky._vendor.super_state_machine.errors import TransitionError
from bluesky.callbacks.zmq import Publisher
from bluesky.run_engine import RunEngineResult
from event_model import unpack_event_page

from tiled_writer_sidecar.publisher import DEFAULT_QUEUE_MESSAGES, deepen
from tiled_writer_sidecar.testing.ports import wait_until
from tiled_writer_sidecar.testing.proxy import PROBE_PREFIX, ZmqProxy, probe_message

Document = tuple[str, dict[str, Any]]
Plan = Generator[Any, Any, Any]

#: Data keys TiledWriter renames by appending "_" (see its RunNormalizer).
RESERVED_DATA_KEYS = ("time", "seq_num")


class DocumentRecorder:
    """A RunEngine callback that keeps a deep copy of every (name, doc)."""

    def __init__(self) -> None:
        self._documents: list[Document] = []
        self._lock = threading.Lock()

    def __call__(self, name: str, doc: Mapping[str, Any]) -> None:
        with self._lock:
            self._documents.append((name, copy.deepcopy(dict(doc))))

    @property
    def documents(self) -> list[Document]:
        """A snapshot (new list) of everything recorded so far, in order."""
        with self._lock:
            return list(self._documents)

    def clear(self) -> None:
        with self._lock:
            self._documents.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._documents)


class _ProbingPublisher(Publisher):
    """The standard Publisher, plus sending a raw frame on its own socket."""

    def send_raw(self, message: bytes) -> None:
        self._socket.send(message)


class Acquisition:
    """A RunEngine whose documents go to a 0MQ proxy and to a recorder."""

    def __init__(
        self,
        in_address: str | None,
        *,
        out_address: str | None = None,
        md: Mapping[str, Any] | None = None,
        queue_messages: int | None = DEFAULT_QUEUE_MESSAGES,
    ) -> None:
        self.in_address = in_address
        self.out_address = out_address
        self._loop = asyncio.new_event_loop()
        self.RE = RunEngine(dict(md or {}), loop=self._loop)
        self.recorder = DocumentRecorder()
        self.subscribe(self.recorder)
        self.publisher: _ProbingPublisher | None = None
        if in_address is not None:
            self.publisher = _ProbingPublisher(in_address)
            if queue_messages is not None:
                deepen(self.publisher, queue_messages=queue_messages)
            self.subscribe(self.publisher)
        #: Wall time of each `run()` in seconds, in order.
        self.durations: list[float] = []
        self._closed = False

    @classmethod
    def for_proxy(cls, proxy: ZmqProxy, **kwargs: Any) -> Self:
        return cls(proxy.in_address, out_address=proxy.out_address, **kwargs)

    @property
    def documents(self) -> list[Document]:
        """Every (name, doc) the RunEngine emitted, deep-copied, in order."""
        return self.recorder.documents

    def subscribe(self, callback: Callable[[str, Any], object]) -> int:
        """`RE.subscribe(callback)`; returns the token for `unsubscribe`."""
        token: int = self.RE.subscribe(callback)  # type: ignore[no-untyped-call]
        return token

    def unsubscribe(self, token: int) -> None:
        self.RE.unsubscribe(token)  # type: ignore[no-untyped-call]

    @property
    def last_duration(self) -> float:
        return self.durations[-1]

    def run(self, plan: Plan) -> list[str]:
        """Run `plan`; return its run uids; append its wall time to `durations`."""
        started = time.perf_counter()
        try:
            result = self.RE(plan)
        finally:
            self.durations.append(time.perf_counter() - started)
        if isinstance(result, RunEngineResult):
            return list(result.run_start_uids)
        return [str(uid) for uid in result]

    def wait_subscribers(
        self,
        ready: Callable[[], object] | None = None,
        *,
        timeout: float = 30.0,
        interval: float = 0.05,
    ) -> int:
        """Publish probes until they come through the proxy and `ready()` holds.

        Needs `out_address`; call it between plans, never while one runs (the
        Publisher's socket is not thread-safe). Every connected subscriber
        sees the probes (frames starting with `PROBE_PREFIX`, see
        `proxy.is_probe`), one per `interval` until done. Returns how many
        probes were sent.
        """
        publisher = self.publisher
        if publisher is None or self.out_address is None:
            raise ValueError("wait_subscribers needs the proxy's in and out addresses")
        nonce = secrets.token_hex(8).encode()
        message = probe_message(nonce)
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sent = 0
        seen = False
        try:
            sub = context.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, PROBE_PREFIX)
            sub.connect(self.out_address)

            def done() -> bool:
                nonlocal sent, seen
                publisher.send_raw(message)
                sent += 1
                while not seen and sub.poll(timeout=int(interval * 1000)):
                    seen = sub.recv() == message
                return seen and (ready is None or bool(ready()))

            wait_until(
                done,
                timeout,
                interval=interval,
                what="a probe through the proxy" + ("" if ready is None else " and ready()"),
            )
        finally:
            context.destroy(linger=0)
        return sent

    def close(self) -> None:
        """Halt a run in progress, stop the RunEngine's loop, close the Publisher."""
        if self._closed:
            return
        self._closed = True
        if self.RE.state not in ("idle", "panicked"):
            with contextlib.suppress(TransitionError):
                self.RE.halt()  # type: ignore[no-untyped-call]
        self._loop.call_soon_threadsafe(self._loop.stop)
        self.RE._th.join(timeout=10)
        if not self.RE._th.is_alive():
            self._loop.close()
        if self.publisher is not None:
            self.publisher.close()  # type: ignore[no-untyped-call]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- what Tiled must contain -----------------------------------------------


def as_python(value: Any) -> Any:
    """numpy scalars/arrays and tuples as plain Python, for `==` comparisons."""
    if isinstance(value, numpy.ndarray):
        return value.tolist()
    if isinstance(value, numpy.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [as_python(item) for item in value]
    return value


def run_uids(docs: Iterable[Document]) -> list[str]:
    """The uids of the start documents, in order."""
    return [doc["uid"] for name, doc in docs if name == "start"]


def _events(docs: Iterable[Document], descriptors: set[str]) -> Iterator[dict[str, Any]]:
    for name, doc in docs:
        if name == "event" and doc["descriptor"] in descriptors:
            yield doc
        elif name == "event_page" and doc["descriptor"] in descriptors:
            yield from (dict(event) for event in unpack_event_page(doc))  # type: ignore[arg-type]


def expected_rows(
    docs: Iterable[Document],
    stream: str = "primary",
    *,
    run_uid: str | None = None,
) -> list[dict[str, Any]]:
    """The rows of `stream`'s internal table, in emission order.

    `run_uid` may be omitted when `docs` hold exactly one run.
    """
    docs = list(docs)
    if run_uid is None:
        uids = run_uids(docs)
        if len(uids) != 1:
            raise ValueError(f"pass run_uid: the documents hold {len(uids)} runs")
        run_uid = uids[0]
    descriptors = {
        doc["uid"]: doc
        for name, doc in docs
        if name == "descriptor" and doc["run_start"] == run_uid and doc.get("name") == stream
    }
    data_keys: dict[str, Any] = {}
    for descriptor in descriptors.values():
        data_keys.update(descriptor.get("data_keys", {}))
    internal = {key for key, spec in data_keys.items() if "external" not in spec}

    rows = []
    for event in _events(docs, set(descriptors)):
        filled = event.get("filled", {})
        # RunNormalizer: internal keys unless filled=False, external keys only
        # if filled=True.
        keep = [key for key in event["data"] if filled.get(key, key in internal)]
        row: dict[str, Any] = {"seq_num": event["seq_num"], "time": event["time"]}
        for key in keep:
            row[_column(key)] = as_python(event["data"][key])
        for key in keep:
            row[f"ts_{_column(key)}"] = as_python(event["timestamps"][key])
        rows.append(row)
    return rows


def _column(key: str) -> str:
    return f"{key}_" if key in RESERVED_DATA_KEYS else key
