"""One run's TiledWriter pipeline, with a flush the uploader can call.

`TiledRun` builds, per run, the `RunNormalizer` -> `_RunWriter` pair that
`TiledWriter._factory` builds (the sidecar already routes documents by run),
so what lands in Tiled is what an in-process `TiledWriter` writes, except:

- `TiledRun.flush` writes the rows buffered below ``batch_size``, as
  `_RunWriter.stop` does; `ready_to_flush` says when (a run caught up).
- A column whose type widens across batches (int then float) makes
  `SidecarRunWriter` rewrite that table with the promoted types and every
  row (`column_types`); a change that is no widening raises
  `TypeChangeNotWidening` (the run is quarantined); a batch whose rows mix
  types is written as runs of rows that convert.
- `SidecarRunWriter` retries a failed append in place, landing it once: it
  reads the table's ``seq_num`` column (a split part without it: its row
  count) back; the rows are there -> done; they
  are not and Tiled finished the request (500/503/429, or it never left this
  host) or the connection closed without an answer (a Tiled stopping or
  killed) -> append again; anything else (a timeout, a 502/504, the table
  changed some other way) -> `AppendAmbiguous`, and the uploader rewrites the
  run. Waiting between attempts is the uploader's (`RetryPolicy`).
- `FastRunNormalizer` validates with the sidecar's compiled validators and
  does not deep-copy events.
- Runs uploaded together share a `TablesLock` (`serial`, one lane of it)
  held around every request that appends to or reads a table's rows: Tiled
  on SQLite answers two such requests at once with 500 "database is locked"
  (its tables store does not wait). The live lane (a run being acquired)
  goes first: backlog runs wait while a live run waits for the lock, so a
  live append waits for at most one backlog request, never collides. Creating
  or deleting a table (it writes Tiled's tables store too) holds the lock only while a
  live run is around (`LIVE_RECENT_S`): a collision would refuse a live
  append, whose rows Tiled streams to subscribers anyway, so its retry
  would deliver them twice. Without a live run creates are not serialized
  (held, the lock capped a drain of small runs at one create + append round
  trip per run). `acknowledged_rows` tells the uploader when a read-back
  cannot tell more than Tiled's answers did.
- A table create Tiled answered 500/503/429 (SQLite's "database is locked":
  Tiled rolls the node back when its storage fails) or that never reached
  it is sent again in place (`RetryPolicy`), not failing the whole run.
- ``close_stream`` requests (TiledWriter's end of a run: one per table,
  stream and run) are sent always, as in-process TiledWriter does; with
  ``[tiled] close_streams = "auto"`` only when they can matter: a Tiled with
  a streaming cache or webhooks (`tiled_calls.close_stream_matters`).
- Each stream table is created with the data-source parameter
  ``order_by_args = [{"column": "seq_num", "direction": "asc"}]``
  (`SeqNumOrderedNode`), so Tiled reads it back in seq_num order; a table
  split off above 1024 columns without a ``seq_num`` column is not ordered.

The private names used are pinned by the lock file and covered by the parity
tests. Why each difference: docs/design.md, "Upload: one table of outcomes".
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from typing import Any, Protocol

import httpx
import pyarrow
from bluesky_tiled_plugins.utils import split_table
from bluesky_tiled_plugins.writing.tiled_writer import (
    MAX_ARRAY_SIZE,
    MAX_TABLE_COLUMNS,
    RunNormalizer,
    _RunWriter,
)
from event_model import unpack_event_page
from tiled.client.base import BaseClient
from tiled.structures.core import StructureFamily
from tiled.structures.data_source import DataSource
from tiled.structures.table import TableStructure

from tiled_writer_sidecar.documents.validation import validate_document
from tiled_writer_sidecar.errors import IncompatibleDependency
from tiled_writer_sidecar.upload.column_types import (
    TypeChangeNotWidening,
    conform,
    promote_schema,
    stored_schema,
)
from tiled_writer_sidecar.upload.policy import AppendAmbiguous, retryable
from tiled_writer_sidecar.upload.tiled_calls import (
    INTERNAL_TABLE,
    close_stream_matters,
    ids_not_reused,
    read_table,
    read_table_column,
)

log = logging.getLogger(__name__)


#: A live lane that took the table lock this recently means a run is being acquired (a scan slower than
#: one append per this long loses the create serialization between its appends: module docstring).
LIVE_RECENT_S = 10.0
#: A backlog lane that took the table lock this recently means backlog runs are draining.
BACKLOG_RECENT_S = 1.0


class TablesLock:
    """One table request at a time across runs, the live lane first (module docstring).

    `lane` gives a run its side: a context manager held around each request.
    `recently` says whether a lane took the lock in the last seconds: a live run
    is around (creates hold the lock too), or a backlog drains (a live run paces
    its appends, `run_upload.LIVE_PACE_S`).
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._held = False
        self._live_waiting = 0
        self._last_taken = {True: -math.inf, False: -math.inf}  # by lane (live?): time.monotonic()

    def lane(self, *, live: bool) -> TablesLane:
        return TablesLane(self, live)

    def locked(self) -> bool:
        return self._held

    def acquire(self, live: bool) -> None:
        with self._changed:
            self._live_waiting += live
            try:
                while self._held or (not live and self._live_waiting):
                    self._changed.wait()
            finally:
                self._live_waiting -= live
            self._held = True
            self._last_taken[live] = time.monotonic()

    def recently(self, *, live: bool, seconds: float) -> bool:
        """Whether the `live` (or backlog) lane took the lock in the last `seconds`."""
        return time.monotonic() - self._last_taken[live] < seconds

    def release(self) -> None:
        with self._changed:
            self._held = False
            self._changed.notify_all()


class TablesLane:
    """One lane of a `TablesLock`: ``with lane:`` holds the lock, live or backlog."""

    def __init__(self, lock: TablesLock, live: bool) -> None:
        self.lock = lock
        self.live = live

    def locked(self) -> bool:
        return self.lock.locked()

    def for_create(self) -> contextlib.AbstractContextManager[Any]:
        """What creating or deleting a table holds: this lane while a live run is around, else nothing."""
        if self.live or self.lock.recently(live=True, seconds=LIVE_RECENT_S):
            return self
        return contextlib.nullcontext()

    def __enter__(self) -> None:
        self.lock.acquire(self.live)

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


#: What a writer holds around a table request: a lane of the shared `TablesLock`, a plain lock, or None.
Serial = contextlib.AbstractContextManager[Any] | None


def schema_change(serial: Serial) -> contextlib.AbstractContextManager[Any]:
    """Held around creating or deleting a table: a `TablesLane`'s choice (`for_create`); with a plain
    lock or None, nothing."""
    return serial.for_create() if isinstance(serial, TablesLane) else contextlib.nullcontext()


class RetryPolicy(Protocol):
    """How the writer waits between attempts of a failed request (the uploader's backoff)."""

    def wait(self, err: Exception) -> None:
        """Sleep before the next attempt after `err`; raise to give up."""

    def recovered(self) -> None:
        """The request succeeded after failures."""


#: TiledWriter's private hooks this module relies on: method -> the parameters it must take, or
#: attribute -> None (see the module docstring; the versions are bounded in pyproject.toml).
PRIVATE_HOOKS: dict[str, tuple[str, ...] | None] = {
    "_write_internal_data": ("data_cache", "desc_node"),
    "_write_external_data": ("doc",),
    "_append_with_retry": ("df_client", "table", "desc_name"),
    "_close_stream_tree": (),
    "_desc_nodes": None,
    "_internal_data_cache": None,
    "_external_data_cache": None,
    "root_node": None,
}


def check_tiledwriter_api() -> None:
    """Raise `IncompatibleDependency` naming the first hook the installed bluesky-tiled-plugins lacks.

    Called when an uploader starts, so an upgrade that renames a private name fails at once with one
    line, instead of falling back to TiledWriter's blind retry (possible duplicates) or raising mid-run.
    """
    import inspect
    from importlib.metadata import version

    writer = _RunWriter(None)  # the constructor only sets attributes
    for name, parameters in PRIVATE_HOOKS.items():
        hook = getattr(writer, name, _MISSING)
        ok = hook is not _MISSING
        if ok and parameters is not None:
            ok = callable(hook) and list(inspect.signature(hook).parameters)[: len(parameters)] == list(
                parameters
            )
        if not ok:
            raise IncompatibleDependency(
                f"bluesky-tiled-plugins {version('bluesky-tiled-plugins')} has no usable TiledWriter "
                f"hook {name}; tiled-writer-sidecar supports bluesky-tiled-plugins >=2.0.12,<2.1"
            )


_MISSING = object()


def dropped_unanswered(err: BaseException) -> bool:
    """Whether the connection closed before Tiled answered (reset, or closed with no response).

    What a client sees when Tiled stops (a keep-alive connection it closes
    as the request arrives) or is killed. A Tiled that stops finishes the
    requests it is serving first, and a killed one applies nothing more, so
    rows not in the table once it answers again never will be. The one
    exception, a proxy between that keeps the request and forwards it
    later, is caught at the end: the stream is read back (``unsure``), sees
    the rows twice, and the run is rewritten.
    """
    return isinstance(err, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError))


def finished_unapplied(err: BaseException) -> bool:
    """Whether Tiled is done with the failed request, so rows not there now never will be.

    True when Tiled itself answered with an error (500, 503, 429) or the
    request never reached it (connection refused or timed out). Not after a
    read/write timeout or a proxy's 502/504: Tiled may still be applying it.
    A connection closed unanswered is `dropped_unanswered`, which only an
    append also takes as final (`SidecarRunWriter._landed`).
    """
    if isinstance(err, httpx.HTTPStatusError):
        return err.response.status_code in (500, 503, 429)
    return isinstance(err, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))


class _OwnedDocument(dict[str, Any]):
    """A document nobody else holds: `RunNormalizer`'s defensive deep copy returns it as is.

    `RunNormalizer.event` starts with ``copy.deepcopy(doc)`` so that its edits
    (renaming reserved data keys, popping ``filled``) never reach its caller's
    document, then emits a shallow copy (``copy.copy``) with the data keys it
    selects. Here the edits are harmless, so the deep copy is the identity and
    the shallow copy a plain `dict`: the same documents are emitted.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> _OwnedDocument:
        return self

    def __copy__(self) -> dict[str, Any]:
        return dict(self)


class FastRunNormalizer(RunNormalizer):  # type: ignore[misc]
    """RunNormalizer with compiled validators and no deep copy of each event (see the module docstring)."""

    def emit(self, name: Any, doc: Any) -> None:
        validate_document(str(getattr(name, "value", name)), doc)
        self.dispatcher.process(name, doc)

    def event(self, doc: dict[str, Any]) -> None:
        super().event(doc if isinstance(doc, _OwnedDocument) else _OwnedDocument(doc))

    def event_page(self, doc: Any) -> None:
        for event in unpack_event_page(doc):
            super().event(_OwnedDocument(event))


#: Tiled's SQL adapter reads a table ``ORDER BY`` these columns (then ``_partition_id``).
SEQ_NUM_ORDER: tuple[dict[str, str], ...] = ({"column": "seq_num", "direction": "asc"},)

#: What Tiled's client calls an appendable SQL table's data source.
SQL_TABLE_MIMETYPE = "application/x-tiled-sql-table"


def table_parameters(schema: Any) -> dict[str, Any]:
    """Data-source parameters of a new stream table: read back in ``seq_num`` order if it has that column."""
    if "seq_num" not in schema.names:
        return {}  # a split table (> 1024 columns) without seq_num: see docs/upstream.md
    return {"order_by_args": [dict(arg) for arg in SEQ_NUM_ORDER]}


class SeqNumOrderedNode:
    """A stream node whose appendable tables Tiled reads back in ``seq_num`` order.

    Everything but `create_appendable_table` is the wrapped node's. That method
    sends what Tiled's `Container.create_appendable_table` sends, plus the
    `table_parameters` (the client's own method accepts no other parameter),
    and notes each table's metadata in `created` (by ``stream/key``), to
    create the table again if its column types widen.
    """

    def __init__(
        self,
        node: Any,
        created: dict[str, dict[str, Any]] | None = None,
        retry: RetryPolicy | None = None,
        serial: Serial = None,
    ) -> None:
        self._node = node
        self._created = created if created is not None else {}
        self._retry = retry
        self._serial = serial

    def __getattr__(self, name: str) -> Any:
        return getattr(self._node, name)

    def create_appendable_table(
        self,
        schema: Any,
        npartitions: int = 1,
        *,
        key: str | None = None,
        metadata: dict[str, Any] | None = None,
        specs: list[Any] | None = None,
        access_tags: list[str] | None = None,
        table_name: str | None = None,
    ) -> Any:
        parameters = table_parameters(schema)
        if table_name is not None:
            parameters["table_name"] = table_name
        source = DataSource(
            structure=TableStructure.from_schema(schema, npartitions),
            structure_family=StructureFamily.table,
            mimetype=SQL_TABLE_MIMETYPE,
            parameters=parameters,
        )
        failed = False
        while True:
            try:
                with schema_change(self._serial):
                    table = self._node.new(
                        StructureFamily.table,
                        [source],
                        key=key,
                        metadata=metadata or {},
                        specs=specs or [],
                        access_tags=access_tags,
                    )
                break
            except (httpx.TransportError, httpx.HTTPStatusError) as err:
                conflict = isinstance(err, httpx.HTTPStatusError) and err.response.status_code == 409
                if failed and conflict:  # an earlier attempt landed after all: Tiled's table is unknown
                    raise AppendAmbiguous(
                        f"creating table {key!r} failed, then found it created: {err}"
                    ) from err
                if self._retry is None or not finished_unapplied(err):
                    raise
                failed = True
                self._retry.wait(err)
        if failed and self._retry is not None:
            self._retry.recovered()
        self._created[f"{self._node.item['id']}/{table.item['id']}"] = metadata or {}
        return table


class _WideTableDataKeys(dict[str, Any]):
    """`_RunWriter.data_keys` whose `items` lists only the columns of the split table part about to be created.

    `_RunWriter._write_internal_data` creates each part of a table split above
    1024 columns with ``{k: v for k, v in self.data_keys.items() if k in
    table.column_names}``: Arrow builds the list of the part's names for every
    data key, O(keys x columns) per part (10,000 keys: minutes). While
    `SidecarRunWriter` writes a batch wider than that, `items` yields only the
    data keys of the first part not created yet, computed with TiledWriter's
    own `split_table` from the batch's columns: the same metadata, in the same
    order. Otherwise it is a plain dict.
    """

    part_columns: Any = None  # () -> the columns of the part about to be created, or None

    def items(self) -> Any:
        columns = self.part_columns() if self.part_columns is not None else None
        if columns is None:
            return super().items()
        return [(k, v) for k, v in super().items() if k in columns]


#: What ``pyarrow.Table.from_pylist`` raises on a batch whose column mixes types it cannot unify.
_MIXED_BATCH_ERRORS = (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError, OverflowError)


class SidecarRunWriter(_RunWriter):  # type: ignore[misc]
    """`_RunWriter` whose failed appends are retried in place, exactly once, whose tables
    Tiled reads back in ``seq_num`` order, and whose column types widen (see the module docstring)."""

    def __init__(
        self,
        client: BaseClient,
        batch_size: int,
        retry: RetryPolicy,
        serial: Serial = None,
        *,
        close_streams: str = "always",
    ) -> None:
        super().__init__(client, batch_size=batch_size, max_array_size=MAX_ARRAY_SIZE)
        self.retry = retry
        self.close_streams = close_streams  # `[tiled] close_streams`: "always", or "auto" (module docstring)
        self.serial = serial  # held around each append to or read of a table (module docstring)
        self.table_rows: dict[str, int] = {}  # rows each internal table holds, by its URI
        self.table_schemas: dict[str, pyarrow.Schema] = {}  # stream/key -> the types its rows so far infer
        self.table_metadata: dict[str, dict[str, Any]] = {}  # stream/key -> the metadata it was created with
        self.widened: list[str] = []  # one line per table rewritten with wider types
        self.data_keys = _WideTableDataKeys()
        self.acknowledged: dict[str, int] = {}  # stream -> rows Tiled answered 2xx to, each append once
        # streams whose rows only a read-back can tell (see `acknowledged_rows`)
        self.unsure: set[str] = set()

    def acknowledged_rows(self, stream: str) -> int | None:
        """Rows of `stream` in Tiled, known without reading them back; None if only a read-back can tell.

        Known when every append to the stream's one table was answered 2xx at
        its first attempt (Tiled's client resends an append only when it never
        reached the server, so each landed exactly once, in the order sent)
        and the table was never rewritten with wider types. A retried append,
        a widened table or a table split above 1024 columns: None.
        """
        return None if stream in self.unsure else self.acknowledged.get(stream, 0)

    def _close_stream_tree(self) -> None:
        """TiledWriter's ``close_stream`` of every node of the run, unless Tiled does nothing with it."""
        if (
            self.close_streams == "auto"
            and self.root_node is not None
            and not close_stream_matters(self.client)
        ):
            return
        super()._close_stream_tree()

    def _write_internal_data(self, data_cache: list[dict[str, Any]], desc_node: Any) -> None:
        node = SeqNumOrderedNode(desc_node, self.table_metadata, self.retry, self.serial)
        desc_name = desc_node.item["id"]
        self.data_keys.part_columns = lambda: self._next_part_columns(data_cache, desc_name)
        try:
            super()._write_internal_data(data_cache, desc_node=node)
        except _MIXED_BATCH_ERRORS:
            # from_pylist (the table step, after every array column was written and taken out of the
            # rows) refused rows whose types mix: write them as runs that convert, each widening in turn.
            desc_name = desc_node.item["id"]
            if self._int_ragged_array_keys[desc_name]:
                raise  # a second pass would write the ragged arrays' rows again
            for chunk in _convertible_runs(data_cache):
                self.data_keys.part_columns = lambda rows=chunk: self._next_part_columns(rows, desc_name)
                super()._write_internal_data(chunk, desc_node=node)
        finally:
            self.data_keys.part_columns = None

    def _tables(self) -> contextlib.AbstractContextManager[Any]:
        """Held around a request that appends to or reads a table: `serial`, if given."""
        return self.serial if self.serial is not None else contextlib.nullcontext()

    def _next_part_columns(self, rows: list[dict[str, Any]], desc_name: str) -> set[str] | None:
        """The columns of the first part of `rows`' table not created yet, if it is split; else None."""
        names = list(rows[0]) if rows else []  # from_pylist's columns: the first row's keys
        if len(names) <= MAX_TABLE_COLUMNS:
            return None
        empty = pyarrow.schema([(name, pyarrow.null()) for name in names]).empty_table()
        for i, part in enumerate(split_table(empty, MAX_TABLE_COLUMNS)):
            if f"{desc_name}_{i}" not in self._internal_tables:
                return set(part.column_names)
        return None

    def _append_with_retry(self, df_client: Any, table: Any, desc_name: str) -> None:
        name = f"{desc_name}/{df_client.item['id']}"
        known = self.table_schemas.get(name)
        if known is None:  # TiledWriter just created the table from this batch
            self.table_schemas[name] = table.schema
            self._append(df_client, table, desc_name)
            return
        promoted = promote_schema(known, table.schema)
        stored = stored_schema(promoted)
        if stored.equals(stored_schema(known)):
            self.table_schemas[name] = promoted
            self._append(df_client, conform(table, stored), desc_name)
        else:
            self._widen(df_client, table, desc_name, known, promoted)

    def _widen(self, df_client: Any, table: Any, desc_name: str, known: Any, promoted: Any) -> None:
        """Create the table again with `promoted`'s types, holding its rows so far and `table`'s.

        Read back, closed for live subscribers (they get ``stream_closed``, then the
        new table announced with every row), deleted, created with the same key,
        metadata and parameters and an id of its own (`ids_not_reused`), then one
        append. A failure half way leaves the table unknown: `AppendAmbiguous`,
        and the run is rewritten.
        """
        key = df_client.item["id"]
        name = f"{desc_name}/{key}"
        self.unsure.add(desc_name)
        stored = stored_schema(promoted)
        with self._tables():
            before = conform(read_table(df_client), stored)  # exact, or TypeChangeNotWidening
        rows = pyarrow.concat_tables([before, conform(table, stored)])
        desc_node = self._desc_nodes[desc_name]
        try:
            with ids_not_reused(desc_node, key):  # else the new table inherits the closed stream
                df_client.close_stream()
                with schema_change(self.serial):
                    desc_node.delete_contents(key, external_only=False)
                new = SeqNumOrderedNode(
                    desc_node, self.table_metadata, self.retry, self.serial
                ).create_appendable_table(
                    schema=stored,
                    key=key,
                    metadata=self.table_metadata.get(name, {}),
                    access_tags=self.access_tags,
                )
        except (httpx.TransportError, httpx.HTTPStatusError) as err:
            raise AppendAmbiguous(
                f"stream {desc_name!r}: rewriting {key} with wider types failed: {err}"
            ) from err
        self._internal_tables[desc_name + key[len("internal") :]] = new
        self.table_schemas[name] = promoted
        self.table_rows[new.uri] = 0
        changed = [
            f"{f.name} {f.type} -> {stored.field(f.name).type}"
            for f in stored_schema(known)
            if not f.type.equals(stored.field(f.name).type)
        ]
        self.widened.append(
            f"stream {desc_name!r} {key}: {', '.join(changed)} ({before.num_rows} rows rewritten)"
        )
        log.info(
            "run %s: %s", self.root_node.item["id"] if self.root_node is not None else "?", self.widened[-1]
        )
        self._append(new, rows, desc_name)

    def _append(self, df_client: Any, table: Any, desc_name: str) -> None:
        """Append `table` once, retrying in place (see the module docstring)."""
        before = self.table_rows.get(df_client.uri, 0)
        failed = False
        while True:
            try:
                with self._tables():
                    df_client.append_partition(0, table)
                break
            except (httpx.TransportError, httpx.HTTPStatusError) as err:
                if not retryable(err):
                    raise
                failed = True
                self.unsure.add(desc_name)
                self.retry.wait(err)
                if self._landed(df_client, table, before, err, desc_name):
                    break
        self.table_rows[df_client.uri] = before + table.num_rows
        if df_client.item["id"] != INTERNAL_TABLE:
            self.unsure.add(desc_name)  # a part of a split table: every part holds every row
        self.acknowledged[desc_name] = self.acknowledged.get(desc_name, 0) + table.num_rows
        if failed:
            self.retry.recovered()

    def _landed(self, df_client: Any, table: Any, before: int, err: Exception, desc_name: str) -> bool:
        """Whether the failed append of `table` is in Tiled; raise `AppendAmbiguous` if unknowable.

        A split table part without ``seq_num`` is checked by its row count alone.
        """
        column = "seq_num" if "seq_num" in table.column_names else table.column_names[0]
        while True:
            try:
                with self._tables():
                    held = read_table_column(df_client, column)
                break
            except (httpx.TransportError, httpx.HTTPStatusError) as check_err:
                if not retryable(check_err):
                    raise
                self.retry.wait(check_err)
            except KeyError as gone:  # the table itself is gone: nothing to resume
                raise AppendAmbiguous(f"stream {desc_name!r}: {gone}") from err
        appended = table[column].to_pylist()
        if len(held) == before + len(appended) and (column != "seq_num" or set(appended) <= set(held)):
            return True
        if len(held) == before and (finished_unapplied(err) or dropped_unanswered(err)):
            return False
        raise AppendAmbiguous(
            f"stream {desc_name!r}: appending {len(appended)} rows failed ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}) and the table holds {len(held)} rows,"
            f" {before} before the append"
        )


def _convertible_runs(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """`rows` cut into the longest consecutive runs that ``from_pylist`` converts (binary search per cut).

    A single row that does not convert (an integer beyond 64 bits) is `TypeChangeNotWidening`.
    """

    def converts(part: list[dict[str, Any]]) -> bool:
        try:
            pyarrow.Table.from_pylist(part)
        except _MIXED_BATCH_ERRORS:
            return False
        return True

    runs = []
    start = 0
    while start < len(rows):
        if not converts(rows[start : start + 1]):
            raise TypeChangeNotWidening(f"the row with seq_num {rows[start].get('seq_num')} cannot be stored")
        low, high = start + 1, len(rows)
        while low < high:
            middle = (low + high + 1) // 2
            if converts(rows[start:middle]):
                low = middle
            else:
                high = middle - 1
        runs.append(rows[start:low])
        start = low
    return runs


class TiledRun:
    """Feeds one run's documents into Tiled through TiledWriter's machinery."""

    def __init__(
        self,
        client: BaseClient,
        batch_rows: int,
        retry: RetryPolicy,
        serial: Serial = None,
        *,
        close_streams: str = "always",
    ) -> None:
        self.writer = SidecarRunWriter(client, batch_rows, retry, serial, close_streams=close_streams)
        self.normalizer = FastRunNormalizer()
        self.normalizer.subscribe(self.writer)
        self.streams: dict[str, str] = {}
        self.events: dict[str, int] = {}
        self.stopped = False
        self.oldest_unflushed: float | None = None  # event time of the oldest buffered row
        self.closed = False

    def feed(self, name: str, doc: dict[str, Any]) -> None:
        """Feed one document; it must be fresh (the normalizer edits events in place)."""
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
            self.closed = True  # TiledWriter's stop closed every stream it wrote
            self.oldest_unflushed = None

    def acknowledged_rows(self, stream: str) -> int | None:
        """Rows of `stream` Tiled holds, known without a read-back, or None (`SidecarRunWriter`'s)."""
        return self.writer.acknowledged_rows(stream)

    def ready_to_flush(self, *, caught_up: bool) -> bool:
        """Whether to write the buffered rows now: there are some and the run's log is read to its end.

        A run being acquired then sends each pass's rows as soon as the previous
        append has returned (the uploader's pass is synchronous, so rows that
        arrive while an append is in flight are coalesced into the next one),
        with no timer on the way: its first row creates the stream's table at
        once (live subscribers attach to it) and later rows follow within a
        pass. A run read from a backlog is not caught up: its rows go in full
        batches (`batch_rows`, or the uploader's `batch_seconds`), and a small
        run read whole in one pass is written by its stop, in as few requests
        as in-process TiledWriter makes.
        """
        return caught_up and not self.stopped and self.buffered_rows() > 0

    def buffered_rows(self) -> int:
        """Rows and stream datums TiledWriter holds but has not written yet."""
        if self.stopped:
            return 0  # stop wrote everything (it leaves its caches filled, but done)
        rows = sum(len(cache) for cache in self.writer._internal_data_cache.values())
        return rows + len(self.writer._external_data_cache)

    def buffered_age(self) -> float | None:
        """Seconds since the event time of the oldest row held but not written (None if none)."""
        return None if self.oldest_unflushed is None else time.time() - self.oldest_unflushed

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
        self.close_streams()

    def close_streams(self) -> None:
        """Tell Tiled's subscribers that every node this run wrote is finished (``close_stream``).

        Leaves first, the run last. Done once: TiledWriter's stop does it
        too. Each node's stream gets an end-of-stream record, and
        subscribers get ``stream_closed``.
        """
        if self.closed or self.writer.root_node is None:
            return
        self.writer._close_stream_tree()
        self.closed = True

    @staticmethod
    def close_run_in_tiled(client: BaseClient, uid: str) -> int:
        """Close the stream of every node of run `uid` in Tiled, leaves first; return how many.

        For a run about to be deleted and rewritten by another writer
        instance (this process's state for it is lost): Tiled's delete tells
        subscribers nothing, so without this their subscriptions to the old
        nodes stay open, and bluesky-tiled-plugins' `subscribe_to_streams`
        never attaches to the rewritten nodes (it keys subscriptions by path).
        """
        from tiled_writer_sidecar.upload.tiled_calls import check_uid

        container: Any = client
        if check_uid(uid) not in container:
            return 0
        run = container[uid]
        nodes: list[Any] = []
        for _, stream in TiledRun._children(run):
            nodes.extend(child for _, child in TiledRun._children(stream))
            nodes.append(stream)
        nodes.append(run)
        for node in nodes:
            node.close_stream()
        return len(nodes)

    @staticmethod
    def _children(node: Any) -> list[tuple[str, Any]]:
        """The (key, client) children of a container node (a composite's own parts, not its columns)."""
        base = getattr(node, "base", node)
        if getattr(base, "structure_family", None) != "container":
            return []
        return list(base.items())
