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

`close_stream_matters` says whether a ``close_stream`` request (TiledWriter
sends one per table, stream and run when a run ends, a third of a small
run's requests) can do anything on this Tiled. In tiled 0.2 the server's
``close_stream`` tells only a streaming cache (live subscribers) and the
webhook dispatcher; neither is announced, so both are probed, on the node
the sidecar writes into, at most every `CLOSE_STREAM_RECHECK_S`:

- streaming: a WebSocket subscription to that node opens with a streaming
  cache; without one Tiled refuses it with a 500 (it has no handler to make);
- webhooks: ``GET /api/v1/webhooks/target/{path}`` is 404 "Not Found" when
  the webhooks API is not mounted (no dispatcher), or lists no webhook on
  the node nor on any ancestor (a webhook is delivered for their descendants).

Only a server of a version whose ``close_stream`` was read
(`CLOSE_STREAM_READ`), a 500 to the subscription and no webhook make it
"does nothing"; any other answer, or an error, keeps the requests.

`ids_not_reused` keeps the nodes created again after a delete (a rewrite,
a table widened) from taking the deleted nodes' ids: Tiled on SQLite gives a
new node the id of the last one deleted (its nodes table has no
AUTOINCREMENT) and its streaming cache keeps a node's records by that id, so
the new node would inherit the deleted one's stream, end of stream included:
a subscriber replaying it from the start gets the old rows, then "closed",
and nothing of the new node. A placeholder container created before the
delete holds the highest id until the first new node exists.

Names are untrusted (they come from documents read back from the spool):
`check_uid` and `check_key` refuse, before any request, a uid, stream name
or data key that could address another node (a separator, a dot segment,
``?``, ``#``, ``%`` or a control character), and every path segment this
module puts into a URL is percent-quoted.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pyarrow.ipc
from tiled.client import from_uri
from tiled.client.context import USER_AGENT as TILED_USER_AGENT
from tiled.client.utils import handle_error

from tiled_writer_sidecar import USER_AGENT
from tiled_writer_sidecar.config import Config
from tiled_writer_sidecar.errors import UnsafeName
from tiled_writer_sidecar.spool.directory import (
    check_uid as check_uid,  # the one rule, re-exported for its callers here
)
from tiled_writer_sidecar.text import ascii_text, one_line

log = logging.getLogger(__name__)

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


#: Key of `ids_not_reused`'s placeholder, before the name of what it stands for.
PLACEHOLDER_PREFIX = "tiled-writer-sidecar-placeholder-"


@contextlib.contextmanager
def ids_not_reused(parent: Any, name: str) -> Iterator[None]:
    """While open, a placeholder container in `parent` holds Tiled's highest node id (module docstring).

    Open it before deleting nodes and close it once the first node that
    replaces them is created. A placeholder left by an uploader killed while
    holding it is replaced. Best effort: if Tiled refuses the placeholder
    (4xx), the caller goes on without it; an outage raises.
    """
    key = PLACEHOLDER_PREFIX + name
    held = _hold_placeholder(parent, key)
    try:
        yield
    finally:
        if held:
            try:
                parent.delete_contents(key, recursive=True, external_only=False)
            except httpx.HTTPError as err:
                log.warning("placeholder %s could not be deleted: %s", key, one_line(err))


def _hold_placeholder(parent: Any, key: str) -> bool:
    """Create the placeholder `key` in `parent` (again, if an old one is there); False if Tiled refuses it."""
    for replacing in (False, True):
        try:
            if replacing:  # left by an uploader killed while holding it: its id is too low
                parent.delete_contents(key, recursive=True, external_only=False)
            parent.create_container(
                key, metadata={"tiled_writer_sidecar": "placeholder, deleted right after"}
            )
            return True
        except httpx.HTTPStatusError as err:
            if err.response.status_code == 409 and not replacing:
                continue
            if err.response.status_code >= 500:
                raise
            log.warning("placeholder %s refused, deleted nodes' ids may be reused: %s", key, one_line(err))
    return False


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


#: How long a finding about ``close_stream`` holds (a Tiled restarted with a streaming cache or a webhook
#: registered meanwhile is seen within this time).
CLOSE_STREAM_RECHECK_S = 60.0
#: Tiled server versions (``[low, high)``) whose ``close_stream`` informs only a streaming cache and webhooks.
CLOSE_STREAM_READ = ("0.2.20", "0.3")

_close_stream_findings: dict[str, tuple[float, bool]] = {}  # node URL -> (until, matters)
_close_stream_lock = threading.Lock()


def close_stream_matters(node: Any) -> bool:
    """Whether ``close_stream`` requests under `node` (the container runs are written into) can do anything.

    False only when certain they do nothing (module docstring); the finding is kept
    `CLOSE_STREAM_RECHECK_S` per node and logged when it changes.
    """
    url = str(node.item["links"]["self"])
    now = time.monotonic()
    with _close_stream_lock:
        until, matters = _close_stream_findings.get(url, (0.0, True))
        if now < until:
            return matters
        try:
            reason = _close_stream_reason(node, url)
        except Exception as err:  # noqa: BLE001 - any doubt keeps the requests
            reason = f"probe failed: {ascii_text(str(err), 120)}"
        was = _close_stream_findings.get(url)
        _close_stream_findings[url] = (now + CLOSE_STREAM_RECHECK_S, reason is not None)
    if was is None or was[1] != (reason is not None):
        if reason is None:
            log.info("tiled has no streaming cache and no webhook for %s: close_stream requests skipped", url)
        else:
            log.info("close_stream requests sent (%s)", reason)
    return reason is not None


def _close_stream_reason(node: Any, url: str) -> str | None:
    """Why ``close_stream`` may matter under `node`, or None if it certainly does nothing."""
    from packaging.version import Version

    version = str(getattr(node.context.server_info, "library_version", ""))
    low, high = CLOSE_STREAM_READ
    try:
        known = Version(low) <= Version(version) < Version(high)
    except ValueError:
        known = False
    if not known:
        return f"tiled server {ascii_text(version, 40)!r}, outside {low}..{high}"
    if _subscription_opens(node, url):
        return "tiled streams to subscribers"
    return _webhook_reason(node, url)


def _subscription_opens(node: Any, url: str) -> bool:
    """Whether Tiled accepts a WebSocket subscription to `node` (True unless refused with a 500)."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    ws = url.replace("/api/v1/metadata/", "/api/v1/stream/single/", 1)
    ws = "wss" + ws[len("https") :] if ws.startswith("https:") else "ws" + ws[len("http") :]
    api_key = getattr(node.context, "api_key", None)
    headers = {"Authorization": f"Apikey {api_key}"} if api_key else {}
    timeout = node.context.http_client.timeout.connect or 10.0
    try:
        with connect(ws, additional_headers=headers, open_timeout=timeout):
            return True
    except InvalidStatus as refused:
        return bool(refused.response.status_code != 500)


def _webhook_reason(node: Any, url: str) -> str | None:
    """Why a webhook may be delivered for a node under `node`, or None if none can be."""
    base, _, path = url.partition("/api/v1/metadata/")
    segments = [s for s in path.split("/") if s]
    for depth in range(len(segments), -1, -1):  # the node first: a 404 there means no webhooks API
        response = node.context.http_client.get(f"{base}/api/v1/webhooks/target/{'/'.join(segments[:depth])}")
        if response.status_code == 404 and depth == len(segments):
            detail = (
                response.json().get("detail")
                if response.headers.get("content-type", "").startswith("application/json")
                else None
            )
            if detail == "Not Found":
                return None  # the webhooks API is not mounted: Tiled has no dispatcher
        if response.status_code != 200:
            return f"webhooks {response.status_code}"
        if response.json():
            return f"webhooks on /{'/'.join(segments[:depth])}"
    return None
