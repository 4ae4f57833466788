"""One run's TiledWriter pipeline, with a flush the uploader can call.

`TiledWriter` is a `RunRouter` that builds, per run, a `RunNormalizer`
feeding a `_RunWriter`; the sidecar already routes documents by run, so it
builds that same per-run pair itself (exactly what `TiledWriter._factory`
does, so what lands in Tiled is what an in-process `TiledWriter` writes).
It needs one thing TiledWriter has no public API for: flushing rows it has
buffered before ``batch_size`` is reached, so a slow scan shows up in Tiled
within ``batch_seconds``. `flush` does what `_RunWriter.stop` does for the
buffered rows. The private names used here are pinned by the lock file and
covered by the parity tests.

The normalizer validates every document it emits; `FastRunNormalizer` does
that with the sidecar's compiled validators instead of jsonschema (the same
event-model schemas, ~100x cheaper).
"""

from __future__ import annotations

import time
from typing import Any

from bluesky_tiled_plugins.writing.tiled_writer import (
    MAX_ARRAY_SIZE,
    RunNormalizer,
    _RunWriter,
)
from tiled.client.base import BaseClient

from .validation import validate_document


class FastRunNormalizer(RunNormalizer):  # type: ignore[misc]
    """RunNormalizer whose per-document schema check uses compiled validators."""

    def emit(self, name: Any, doc: Any) -> None:
        validate_document(str(getattr(name, "value", name)), doc)
        self.dispatcher.process(name, doc)


class TiledRun:
    """Feeds one run's documents into Tiled through TiledWriter's machinery."""

    def __init__(self, client: BaseClient, batch_rows: int) -> None:
        self.writer = _RunWriter(client, batch_size=batch_rows, max_array_size=MAX_ARRAY_SIZE)
        self.normalizer = FastRunNormalizer()
        self.normalizer.subscribe(self.writer)
        self.streams: dict[str, str] = {}
        self.events: dict[str, int] = {}
        self.stopped = False
        self.oldest_unflushed: float | None = None  # event time of the oldest buffered row

    def feed(self, name: str, doc: dict[str, Any]) -> None:
        if name == "descriptor":
            self.streams[doc["uid"]] = doc["name"]
        elif name in ("event", "event_page"):
            stream = self.streams.get(doc["descriptor"], "?")
            n = 1 if name == "event" else len(doc["seq_num"])
            self.events[stream] = self.events.get(stream, 0) + n
            if self.oldest_unflushed is None:
                t = doc["time"] if name == "event" else doc["time"][0]
                self.oldest_unflushed = float(t)
        self.normalizer(name, doc)
        if name == "stop":
            self.stopped = True
            self.oldest_unflushed = None

    def buffered_rows(self) -> int:
        """Rows and stream datums TiledWriter holds but has not written yet."""
        if self.stopped:
            return 0  # stop wrote everything (it leaves its caches filled, but done)
        rows = sum(len(cache) for cache in self.writer._internal_data_cache.values())
        return rows + len(self.writer._external_data_cache)

    def flush(self) -> float | None:
        """Write every buffered row now; return the age of the oldest one flushed."""
        if self.stopped:
            return None
        writer = self.writer
        for desc_name, cache in writer._internal_data_cache.items():
            if cache:
                writer._write_internal_data(cache, desc_node=writer._desc_nodes[desc_name])
                cache.clear()
        for sres_uid in list(writer._external_data_cache):
            writer._write_external_data(writer._external_data_cache.pop(sres_uid))
        oldest, self.oldest_unflushed = self.oldest_unflushed, None
        return None if oldest is None else time.time() - oldest

    def finish_without_stop(self) -> None:
        """The stop never came: write what is buffered and close the streams."""
        self.flush()
        if self.writer.root_node is not None:
            self.writer._close_stream_tree()
