"""The few Tiled calls the uploader makes besides TiledWriter's own.

Connecting (API key from the config, never logged), asking whether a run
exists, deleting a partial run before it is rewritten, and reading back a
table's ``seq_num`` column: to verify an upload row by row, and to find out
whether an append whose response was lost landed. The column is read in one
request (``GET /api/v1/table/full/{path}?column=seq_num``, Arrow), not by
walking the run, stream and table nodes first. A stream table split above
1024 columns (``internal_0``, ``internal_1``, ...) has ``seq_num`` in one part
only (the columns are split in sorted order): one listing of the stream
finds that part. `read_table` reads a whole table back (Arrow), for a table
rewritten with wider column types.

Names are untrusted (they come from documents read back from the spool):
`check_uid` and `check_key` refuse, before any request, a uid, stream name
or data key that could address another node (a separator, a dot segment,
``?``, ``#``, ``%`` or a control character), and every path segment this
module puts into a URL is percent-quoted.
"""

from __future__ import annotations

import io
import re
from typing import Any
from urllib.parse import quote

import pyarrow.ipc
from tiled.client import from_uri
from tiled.client.context import USER_AGENT as TILED_USER_AGENT
from tiled.client.utils import handle_error

from . import USER_AGENT
from .config import Config
from .errors import UnsafeName
from .spool.directory import check_uid as check_uid  # the one rule, re-exported for its callers here
from .text import ascii_text

ARROW = "application/vnd.apache.arrow.file"

#: Where TiledWriter puts a stream's rows: ``internal``, or ``internal_0``,
#: ``internal_1``, ... when a table has more than 1024 columns (each part
#: holds every row; only the part whose sorted columns include it has ``seq_num``).
INTERNAL_TABLE = "internal"
_SPLIT_PART = re.compile(r"internal_[0-9]+")

#: Characters that would end or escape a URL path segment, wherever a key is put into a URL.
_UNSAFE_IN_KEY = re.compile(r"[/\\?#%\x00-\x1f\x7f-\x9f]")
MAX_KEY_LENGTH = 255  # Tiled's own limit on a node's key


def check_key(key: object, what: str) -> str:
    """`key` if it names one node under its parent (a stream, a data key); else raise `UnsafeName`."""
    if not (
        isinstance(key, str)
        and 0 < len(key) <= MAX_KEY_LENGTH
        and key not in (".", "..")
        and key == key.strip()
        and not _UNSAFE_IN_KEY.search(key)
    ):
        raise UnsafeName(f"{what} {ascii_text(ascii(key), 80)} could address another Tiled node")
    return key


def url_path(*segments: str) -> str:
    """`segments` joined by ``/``, each percent-quoted (``/`` included): one segment each."""
    return "/".join(quote(segment, safe="") for segment in segments)


def connect(config: Config) -> Any:
    """A Tiled client for writing, as TiledWriter wants it."""
    client = from_uri(
        config.tiled.uri,
        api_key=config.api_key(),
        remember_me=False,
        timeout=config.tiled.timeout_seconds,
        include_data_sources=True,
        headers={"user-agent": f"{USER_AGENT} {TILED_USER_AGENT}"},  # ours first, then tiled's own
    )
    return client


def run_exists(client: Any, uid: str) -> bool:
    return check_uid(uid) in client


def delete_run(client: Any, uid: str) -> None:
    client.delete_contents(check_uid(uid), recursive=True, external_only=False)


def _table_url(node: Any, *path: str) -> str:
    """The ``/table/full/`` URL of `path` under `node` (any Tiled client node), each segment quoted."""
    base = str(node.item["links"]["self"]).replace("/api/v1/metadata/", "/api/v1/table/full/", 1)
    return "/".join([base.rstrip("/"), url_path(*path)]) if path else base.rstrip("/")


def _get_arrow(node: Any, url: str, columns: list[str] | None = None) -> pyarrow.Table | None:
    """The table at `url` (only `columns`, if given) in one GET, or None if there is no such table (404)."""
    params = {"column": columns} if columns else None
    response = node.context.http_client.get(url, params=params, headers={"Accept": ARROW})
    if response.status_code == 404:
        return None
    handle_error(response)
    return pyarrow.ipc.open_file(io.BytesIO(response.content)).read_all()


def _get_seq_nums(node: Any, url: str) -> list[int] | None:
    """The ``seq_num`` column at `url` in one GET, or None if there is no such table (404)."""
    table = _get_arrow(node, url, ["seq_num"])
    return None if table is None else [int(x) for x in table["seq_num"].to_pylist()]


def _seq_num_part(client: Any, *path: str) -> str | None:
    """The key of the split table part (``internal_N``) under the stream at `path` that has ``seq_num``."""
    base = str(client.item["links"]["self"]).replace("/api/v1/metadata/", "/api/v1/search/", 1)
    url: str | None = "/".join([base.rstrip("/"), url_path(*path)])
    params: dict[str, Any] = {"page[limit]": 300}
    while url:
        response = client.context.http_client.get(url, params=params)
        if response.status_code == 404:
            return None
        body = handle_error(response).json()
        for item in body.get("data") or []:
            key = item.get("id")
            structure = (item.get("attributes") or {}).get("structure") or {}
            if (
                isinstance(key, str)
                and _SPLIT_PART.fullmatch(key)
                and "seq_num" in (structure.get("columns") or [])
            ):
                return key
        url, params = (body.get("links") or {}).get("next"), {}
    return None


def read_seq_nums(client: Any, uid: str, stream: str) -> list[int] | None:
    """The `seq_num` column of a stream's rows in Tiled, in Tiled's order, or None if there is no table."""
    path = (check_uid(uid), check_key(stream, "stream name"))
    seq = _get_seq_nums(client, _table_url(client, *path, INTERNAL_TABLE))
    if seq is not None:
        return seq
    part = _seq_num_part(client, *path)  # no "internal": a split table, or no table at all
    return None if part is None else _get_seq_nums(client, _table_url(client, *path, part))


def read_table_column(table: Any, column: str) -> list[Any]:
    """One column of one table, given its client (a TiledWriter `DataFrameClient`); KeyError if gone."""
    data = _get_arrow(table, _table_url(table), [column])
    if data is None:
        raise KeyError(f"table {table.uri} is not in Tiled")
    return list(data[column].to_pylist())


def read_table_seq_nums(table: Any) -> list[int]:
    """The `seq_num` column of one table, given its client (a TiledWriter `DataFrameClient`)."""
    return [int(x) for x in read_table_column(table, "seq_num")]


def read_table(table: Any) -> pyarrow.Table:
    """Every row of one table, in Tiled's order, given its client; KeyError if it is gone."""
    data = _get_arrow(table, _table_url(table))
    if data is None:
        raise KeyError(f"table {table.uri} is not in Tiled")
    return data
