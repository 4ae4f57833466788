"""The few Tiled calls the uploader makes besides TiledWriter's own.

Connecting (API key from the config, never logged), asking whether a run
exists, deleting a partial run before it is rewritten, and reading back a
stream's ``seq_num`` column to verify an upload row by row.
"""

from __future__ import annotations

from typing import Any

from tiled.client import from_uri

from .config import Config


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


def _plain(node: Any) -> Any:
    """The plain Tiled container under a bluesky-tiled-plugins client wrapper."""
    return getattr(node, "base", node)


def internal_table(client: Any, uid: str, stream: str) -> Any | None:
    """The stream's `internal` table (or the first part of a split one)."""
    try:
        stream_node = _plain(_plain(client[uid])[stream])
    except KeyError:
        return None
    for key in ("internal", "internal_0"):
        if key in stream_node:
            return stream_node[key]
    return None


def read_seq_nums(client: Any, uid: str, stream: str) -> list[int] | None:
    """The `seq_num` column of a stream's rows in Tiled, or None if there is no table."""
    table = internal_table(client, uid, stream)
    if table is None:
        return None
    frame = table.read(["seq_num"])
    return [int(x) for x in frame["seq_num"]]
