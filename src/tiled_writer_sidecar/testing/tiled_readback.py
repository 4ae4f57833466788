"""Read back what TiledWriter wrote, in plain pandas / Python form.

Layout written by bluesky-tiled-plugins' TiledWriter (`_RunWriter`):

    client[run_uid]                   container, spec BlueskyRun 3.0,
                                      metadata {"start", "stop"[, "notes"]}
    client[run_uid][stream]           container, specs BlueskyEventStream 3.0
                                      + composite; metadata = the descriptor
                                      without name/object_keys/run_start
    client[run_uid][stream]["internal"]  appendable table: seq_num, time,
                                      <data key>..., ts_<data key>...
                                      (split into internal_0, internal_1, ...
                                      above 1024 columns)
    client[run_uid][stream][key]      array: an internal array data key with
                                      more than 16 elements (zarr), or an
                                      external data key (StreamResource)

The bluesky-tiled-plugins client classes wrap runs and streams (a
composite stream hides `internal` behind its columns), so these helpers
step to the plain container underneath (`.base`) before indexing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pandas

from tiled_writer_sidecar.testing.acquisition import as_python

_SPLIT_TABLE = re.compile(r"internal_(\d+)")


def _base(node: Any) -> Any:
    """The plain tiled Container under a bluesky-tiled-plugins wrapper."""
    return getattr(node, "base", node)


def _table_keys(stream_node: Any) -> list[str]:
    keys = list(stream_node)
    if "internal" in keys:
        return ["internal"]
    split = [(m, key) for key in keys if (m := _SPLIT_TABLE.fullmatch(key))]
    return [key for _, key in sorted(split, key=lambda pair: int(pair[0].group(1)))]


def _internal_array_keys(stream_node: Any) -> list[str]:
    data_keys = stream_node.metadata.get("data_keys", {})
    return [
        key
        for key in stream_node
        if key in data_keys
        and "external" not in data_keys[key]
        and stream_node[key].structure_family == "array"
    ]


def read_stream(client: Any, run_uid: str, stream: str = "primary", *, arrays: bool = True) -> Any:
    """The rows of `stream` as one `pandas.DataFrame`.

    Columns are those of the internal table(s); with `arrays`, each internal
    data key written as its own array node is added as a column holding
    one row's array per cell. Raises KeyError if the run or stream is missing.
    """
    stream_node = _base(_base(client[run_uid])[stream])
    frames = [stream_node[key].read() for key in _table_keys(stream_node)]
    if not frames:
        frame = pandas.DataFrame()
    elif len(frames) == 1:
        frame = frames[0]
    else:
        frame = pandas.concat(frames, axis=1)
    if arrays:
        for key in _internal_array_keys(stream_node):
            values = list(stream_node[key].read())
            if frame.empty and not len(frame.columns):
                frame = pandas.DataFrame(index=range(len(values)))
            if len(values) != len(frame):
                raise ValueError(f"array {key!r} has {len(values)} rows, the table {len(frame)}")
            frame[key] = pandas.Series(values, index=frame.index, dtype=object)
    return frame


def frame_rows(frame: Any) -> list[dict[str, Any]]:
    """A DataFrame as a list of row dicts with plain Python values.

    Comparable with `acquisition.expected_rows(...)` using `==`.
    """
    records: list[dict[str, Any]] = frame.to_dict("records")
    return [{str(k): as_python(v) for k, v in row.items()} for row in records]


def _plain_metadata(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain_metadata(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_metadata(v) for v in value]
    return as_python(value)


def _spec_names(node: Any) -> list[str]:
    return [f"{spec.name}:{spec.version}" for spec in node.specs]


def tree_summary(client: Any, run_uid: str) -> dict[str, Any]:
    """A deterministic description of one run as TiledWriter left it.

    For parity tests (sidecar vs. in-process TiledWriter): the run's keys,
    specs, full metadata (`start`, `stop`, ...), and per stream its keys,
    specs, descriptor metadata, internal table columns and row count, and
    the shape and dtype of each array node.
    """
    run = _base(client[run_uid])
    metadata = _plain_metadata(run.metadata)
    streams: dict[str, Any] = {}
    for name in run:
        node = _base(run[name])
        tables = _table_keys(node)
        columns: list[str] = []
        for key in tables:
            columns.extend(str(column) for column in node[key].structure().columns)
        rows = len(node[tables[0]].read(columns=[columns[0]])) if tables else 0
        arrays = {}
        for key in node:
            child = node[key]
            if child.structure_family == "array":
                arrays[key] = {
                    "shape": list(child.shape),
                    "dtype": str(child.dtype),
                }
        streams[name] = {
            "keys": sorted(node),
            "specs": _spec_names(node),
            "metadata": _plain_metadata(node.metadata),
            "columns": columns,
            "rows": rows,
            "arrays": arrays,
        }
    return {
        "uid": run_uid,
        "keys": sorted(run),
        "specs": _spec_names(run),
        "metadata_keys": sorted(metadata),
        "start": metadata.get("start"),
        "stop": metadata.get("stop"),
        "metadata": metadata,
        "streams": streams,
    }


#: Keys of a tree summary that differ between two writes of the same run.
VOLATILE_KEYS = frozenset({"created_at", "updated_at", "time_created", "time_updated"})


def without_volatile(value: Any) -> Any:
    """`value` (a tree summary) without the keys two writes of one run never share."""
    if isinstance(value, dict):
        return {k: without_volatile(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [without_volatile(v) for v in value]
    return value


def differences(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Where two nested structures differ, as readable paths (empty if equal)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = []
        for key in sorted(set(ours) | set(theirs), key=str):
            if key not in ours or key not in theirs:
                out.append(f"{path}/{key}: only in {'ours' if key in ours else 'theirs'}")
            else:
                out += differences(ours[key], theirs[key], f"{path}/{key}")
        return out
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return [
            d
            for i, (x, y) in enumerate(zip(ours, theirs, strict=True))
            for d in differences(x, y, f"{path}[{i}]")
        ]
    return [] if ours == theirs else [f"{path}: ours {ours!r} != theirs {theirs!r}"]
