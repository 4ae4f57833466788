"""The few Tiled calls the uploader makes besides TiledWriter's own.

Connecting (API key from the config, never logged), asking whether a run
exists, deleting a partial run before it is rewritten, and reading back a
table's ``seq_num`` column: to verify an upload row by row, and to find out
whether an append whose response was lost landed. The column is read in one
request (``GET /api/v1/table/full/{path}?column=seq_num``, Arrow), not by
walking the run, stream and table nodes first.
"""

from __future__ import annotations

import io
from typing import Any

import pyarrow.ipc
from tiled.client import from_uri
from tiled.client.utils import handle_error

from .config import Config

ARROW = "application/vnd.apache.arrow.file"

#: Where TiledWriter puts a stream's rows: ``internal``, or ``internal_0``,
#: ``internal_1``, ... when a table has more than MAX_TABLE_COLUMNS columns
#: (each part holds every row and its own ``seq_num`` column).
INTERNAL_TABLES = ("internal", "internal_0")


def connect(config: Config) -> Any:
    """A Tiled client for writing, as TiledWriter wants it."""
    client = from_uri(
        config.tiled.uri,
        api_key=config.api_key(),
        remember_me=False,
        timeout=config.tiled.timeout_seconds,
        include_data_sources=True,
    )
    return client


def run_exists(client: Any, uid: str) -> bool:
    return uid in client


def delete_run(client: Any, uid: str) -> None:
    client.delete_contents(uid, recursive=True, external_only=False)


def _table_url(node: Any, *path: str) -> str:
    """The ``/table/full/`` URL of `path` under `node` (any Tiled client node)."""
    base = str(node.item["links"]["self"]).replace("/api/v1/metadata/", "/api/v1/table/full/", 1)
    return "/".join([base.rstrip("/"), *path])


def _get_seq_nums(node: Any, url: str) -> list[int] | None:
    """The ``seq_num`` column at `url` in one GET, or None if there is no such table (404)."""
    response = node.context.http_client.get(url, params={"column": "seq_num"}, headers={"Accept": ARROW})
    if response.status_code == 404:
        return None
    handle_error(response)
    column = pyarrow.ipc.open_file(io.BytesIO(response.content)).read_all()["seq_num"]
    return [int(x) for x in column.to_pylist()]


def read_seq_nums(client: Any, uid: str, stream: str) -> list[int] | None:
    """The `seq_num` column of a stream's rows in Tiled, or None if there is no table."""
    for table in INTERNAL_TABLES:
        seq = _get_seq_nums(client, _table_url(client, uid, stream, table))
        if seq is not None:
            return seq
    return None


def read_table_seq_nums(table: Any) -> list[int]:
    """The `seq_num` column of one table, given its client (a TiledWriter `DataFrameClient`)."""
    seq = _get_seq_nums(table, _table_url(table))
    if seq is None:
        raise KeyError(f"table {table.uri} is not in Tiled")
    return seq
