"""Tiled faked for the fast unit layer, over a real spool written by the real `RunSpooler`.

`FakeTiled` holds each run's tables as lists of ``seq_num`` and stands in for
`TiledRun` and the `tiled_calls` requests `run_upload` makes; `http_error` and
`transport` build errors the way httpx raises them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from event_model import compose_run

from tiled_writer_sidecar.config import Config, SpoolConfig, TiledConfig
from tiled_writer_sidecar.receive.counters import ReceiverStats
from tiled_writer_sidecar.receive.spooler import RunSpooler, SpooledRun
from tiled_writer_sidecar.spool.codec import pack_document
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.spool.state_files import Received, RunView, Uploaded
from tiled_writer_sidecar.upload import run_upload

Doc = tuple[str, dict[str, Any]]

URL = "http://127.0.0.1:8000/api/v1/table/partition/run/primary/internal"


def http_error(code: int, method: str = "PATCH", url: str = URL) -> httpx.HTTPStatusError:
    request = httpx.Request(method, url)
    return httpx.HTTPStatusError(f"{code}", request=request, response=httpx.Response(code, request=request))


def transport(cls: type[httpx.TransportError]) -> httpx.TransportError:
    return cls("boom", request=httpx.Request("GET", URL))


class FakeClient:
    """What the uploader holds as Tiled's client; only its context is ever closed."""

    class context:  # noqa: N801 - mimics tiled's attribute
        @staticmethod
        def close() -> None:
            return None


class FakeRunWriter:
    """`TiledRun`'s surface: rows buffered until `flush` (or `batch_rows`), then in `FakeTiled.runs`."""

    def __init__(self, tiled: FakeTiled, batch_rows: int) -> None:
        self.tiled = tiled
        self.batch_rows = batch_rows
        self.uid = ""
        self.streams: dict[str, str] = {}
        self.events: dict[str, int] = {}
        self.buffer: list[tuple[str, int]] = []
        self.stopped = False

    def feed(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            self.uid = doc["uid"]
            if self.uid in self.tiled.runs:  # Tiled's create: 409 if the key is taken
                raise http_error(409, "POST", "http://127.0.0.1:8000/api/v1/metadata/")
            self.tiled.runs[self.uid] = {}
            self.tiled.starts[self.uid] = doc
            self.tiled.created.append(self.uid)
        elif name == "descriptor":
            self.streams[doc["uid"]] = doc["name"]
            self.tiled.runs[self.uid].setdefault(doc["name"], [])
        elif name == "event":
            stream = self.streams[doc["descriptor"]]
            self.events[stream] = self.events.get(stream, 0) + 1
            self.buffer.append((stream, doc["seq_num"]))
            if len(self.buffer) >= self.batch_rows:
                self.flush()
        elif name == "stop":
            self.finish_without_stop()

    def buffered_rows(self) -> int:
        return len(self.buffer)

    def buffered_age(self) -> float | None:
        return None

    def acknowledged_rows(self, stream: str) -> int | None:
        return None  # unknown: `run_upload` reads every stream back (`FakeTiled.runs`)

    def ready_to_flush(self, *, caught_up: bool) -> bool:
        return caught_up and not self.stopped and bool(self.buffer)

    def flush(self) -> float | None:
        for stream, seq_num in self.buffer:
            self.tiled.runs[self.uid][stream].append(seq_num)
        self.buffer.clear()
        return None

    def finish_without_stop(self) -> None:
        self.flush()
        self.stopped = True


class FakeTiled:
    """Tiled as a dict (run uid -> stream -> seq_nums in order), installed where `run_upload` calls Tiled."""

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, list[int]]] = {}
        self.deleted: list[str] = []
        self.starts: dict[str, dict[str, Any]] = {}  # run uid -> the start it was created from
        self.created: list[str] = []  # run uids, in the order their starts were fed
        #: each placeholder held: its name, the runs deleted and the runs created meanwhile
        self.placeholders: list[tuple[str, list[str], list[str]]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeTiled:
        monkeypatch.setattr(run_upload, "TiledRun", self)
        monkeypatch.setattr(run_upload, "run_exists", lambda client, uid: uid in self.runs)
        monkeypatch.setattr(run_upload, "delete_run", self.delete_run)
        monkeypatch.setattr(run_upload, "ids_not_reused", self.ids_not_reused)
        monkeypatch.setattr(
            run_upload, "_holds_start", lambda client, doc: self.starts.get(doc["uid"]) == doc
        )
        monkeypatch.setattr(
            run_upload, "read_seq_nums", lambda client, uid, stream: self.runs.get(uid, {}).get(stream)
        )
        return self

    def __call__(
        self, client: Any, batch_rows: int, retry: Any, serial: Any = None, *, close_streams: str = "always"
    ) -> FakeRunWriter:
        return FakeRunWriter(self, batch_rows)

    def close_run_in_tiled(self, client: Any, uid: str) -> int:
        return 0

    @contextlib.contextmanager
    def ids_not_reused(self, parent: Any, name: str) -> Iterator[None]:
        """Record each placeholder held, and what was deleted and created while it was."""
        deleted, created = len(self.deleted), len(self.created)
        yield
        self.placeholders.append((name, self.deleted[deleted:], self.created[created:]))

    def delete_run(self, client: Any, uid: str) -> None:
        self.deleted.append(uid)
        del self.runs[uid]
        self.starts.pop(uid, None)


def config_for(spool: SpoolDir, **spool_options: Any) -> Config:
    return Config(
        spool=SpoolConfig(dir=str(spool.root), **spool_options),
        tiled=TiledConfig(batch_rows=100, batch_seconds=0.0, backoff_initial_seconds=0.01),
    )


def scan(events: int = 3, stream: str = "primary") -> tuple[str, list[Doc], dict[str, Any]]:
    """A run's uid, its documents up to the last event, and its stop document."""
    bundle = compose_run()
    desc = bundle.compose_descriptor(
        name=stream, data_keys={"x": {"source": "sim", "dtype": "number", "shape": []}}
    )
    docs: list[Doc] = [("start", dict(bundle.start_doc)), ("descriptor", dict(desc.descriptor_doc))]
    for i in range(events):
        event = desc.compose_event(data={"x": float(i)}, timestamps={"x": time.time()}, seq_num=i + 1)
        docs.append(("event", dict(event)))
    return bundle.start_doc["uid"], docs, dict(bundle.compose_stop())


class Spool:
    """A real spool written by the real RunSpooler."""

    def __init__(self, root: Path, **spool_options: Any) -> None:
        self.dir = SpoolDir(root)
        self.config = config_for(self.dir, **spool_options)
        self.spooler = RunSpooler(self.config.spool, self.dir, ReceiverStats())

    def open(self, docs: list[Doc], first_received: float | None = None) -> SpooledRun:
        received = Received(uid=docs[0][1]["uid"])
        if first_received is not None:
            received.first_received = first_received
        run = self.spooler.open(received)
        self.append(run, docs)
        return run

    def append(self, run: SpooledRun, docs: list[Doc]) -> None:
        for name, doc in docs:
            self.spooler.stage(run, name, pack_document(name, doc))
        self.spooler.save(run)

    def close(self, run: SpooledRun, stop: dict[str, Any]) -> None:
        self.append(run, [("stop", stop)])
        run.received.closed = run.received.stop_received = True
        self.spooler.close(run)

    def closed_run(self, events: int = 3, first_received: float | None = None) -> str:
        uid, docs, stop = scan(events)
        self.close(self.open(docs, first_received), stop)
        return uid

    def view(self, uid: str) -> RunView:
        directory = self.dir.run_dir(uid)
        received = Received.load(directory)
        assert received is not None
        return RunView(directory, received, Uploaded.load(directory))
