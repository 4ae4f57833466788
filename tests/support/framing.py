"""Messages exactly as bluesky's `Publisher` sends them: ``b" ".join([prefix, name, payload])``.

The prefix is empty (what `Publisher` sends without one); `frame` pickles the
document as `Publisher` does by default, `raw_frame` takes a payload already
encoded (a hostile pickle, msgpack or JSON). `SERIALIZERS` are the encodings
a `Publisher` can be given (``serializer=``) that the sidecar decodes.
"""

from __future__ import annotations

import functools
import json
import pickle
import uuid
from collections.abc import Callable
from typing import Any

import msgpack_numpy
import numpy as np


def new_uid() -> str:
    return str(uuid.uuid4())


def raw_frame(name: str, payload: bytes) -> bytes:
    """One message with an already encoded `payload`."""
    return b" ".join([b"", name.encode(), payload])


def frame(name: str, doc: Any) -> bytes:
    """One message exactly as bluesky's `Publisher` frames it (empty prefix, pickle)."""
    return raw_frame(name, pickle.dumps(doc))


def jsonable(value: Any) -> Any:
    """`value` with numpy arrays and scalars as lists and numbers, tuples as lists."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def json_serializer(doc: Any) -> bytes:
    """A JSON `Publisher` serializer: the document, numpy values as plain lists and numbers."""
    return json.dumps(jsonable(doc)).encode()


#: name -> a `Publisher` serializer the sidecar decodes.
SERIALIZERS: dict[str, Callable[[Any], bytes]] = {
    "pickle": pickle.dumps,  # what Publisher uses by default
    "pickle2": functools.partial(pickle.dumps, protocol=2),
    "pickle5": functools.partial(pickle.dumps, protocol=5),
    "msgpack_numpy": msgpack_numpy.packb,
    "json": json_serializer,
}
