"""Messages exactly as bluesky's `Publisher` sends them: ``b" ".join([prefix, name, payload])``.

The prefix is empty (what `Publisher` sends without one); `frame` pickles the
document as `Publisher` does by default, `raw_frame` takes a payload already
encoded (a hostile pickle, msgpack or JSON). `SERIALIZERS` are the encodings
a `Publisher` can be given (``serializer=``) that the sidecar decodes;
`CapturingPublisher` is bluesky's own `Publisher` keeping what it would send.
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
from bluesky.callbacks.zmq import Publisher


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


class CapturingPublisher(Publisher):  # type: ignore[misc]
    """bluesky's own Publisher, its 0MQ send replaced by an append to `sent`."""

    def __init__(self, serializer: Callable[[Any], bytes] = pickle.dumps, prefix: bytes = b"") -> None:
        super().__init__("127.0.0.1:9", serializer=serializer, prefix=prefix)
        self.sent: list[bytes] = []
        self._socket.close()
        self._socket = self  # Publisher.__call__ does self._socket.send(message)

    def send(self, message: bytes) -> None:
        self.sent.append(message)

    def close(self) -> None:
        self._context.destroy()
