"""Pickles built the way numpy pickles itself, with states numpy would never write (issue 12).

Each ``Fake*`` class's ``__reduce__`` returns numpy's own callables
(``numpy.dtype`` + BUILD, ``numpy._core.multiarray.scalar``,
``_reconstruct``), so `pickle.dumps` writes exactly the opcodes a numpy
object would, but with any state: a dtype field beyond the item size
(class 1), a void scalar without data or an object array with a zero and a
huge dimension (class 4), BUILD on an allowed global (class 5).
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

#: The BUILD state of a plain little-endian dtype, as numpy writes it.
PLAIN_STATE = (3, "<", None, None, None, -1, -1, 0)
#: The BUILD state of numpy's object dtype (``O8``).
OBJECT_STATE = (3, "|", None, None, None, -1, -1, 63)


class FakeDtype:
    """Pickles exactly like a numpy dtype (``numpy.dtype`` + BUILD), with any state."""

    def __init__(self, typecode: str, state: tuple[Any, ...]) -> None:
        self.typecode = typecode
        self.state = state

    def __reduce__(self) -> tuple[Any, ...]:
        return (np.dtype, (self.typecode, False, True), self.state)


class FakeScalar:
    """Pickles like a numpy scalar: ``numpy._core.multiarray.scalar(dtype[, data])``."""

    def __init__(self, dtype: FakeDtype, *data: bytes) -> None:
        self.args = (dtype, *data)

    def __reduce__(self) -> tuple[Any, ...]:
        return (np._core.multiarray.scalar, self.args)


class FakeArray:
    """Pickles like an ndarray: ``_reconstruct(ndarray, (0,), b"b")`` + BUILD with any state."""

    def __init__(self, state: tuple[Any, ...]) -> None:
        self.state = state

    def __reduce__(self) -> tuple[Any, ...]:
        return (np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"), self.state)


def outside_field_dtype(offset: int) -> FakeDtype:
    """Class 1: a structured 8-byte dtype whose only field (float64) starts `offset` bytes in."""
    field = FakeDtype("f8", PLAIN_STATE)
    return FakeDtype("V8", (3, "|", None, ("x",), {"x": (field, offset)}, 8, 1, 16))


def void_scalar_without_data(size: int) -> FakeScalar:
    """Class 4: a scalar of a `size`-byte void dtype, and no data to fill it."""
    return FakeScalar(FakeDtype(f"V{size}", (3, "|", None, None, None, size, 1, 0)))


def object_array(shape: tuple[int, ...]) -> FakeArray:
    """Class 4: an object array of `shape` without items (a zero dimension beside huge ones)."""
    return FakeArray((1, shape, FakeDtype("O8", OBJECT_STATE), False, []))


def build_on_global_pickle(doc: dict[str, Any]) -> bytes:
    """Class 5: `doc` pickled (protocol 4), but first BUILD sets ``__defaults__`` of the decoder's
    scalar global: STACK_GLOBAL numpy._core.multiarray scalar; BUILD (None, {"__defaults__": (b"x",)}); POP."""
    pickled = pickle.dumps(doc, protocol=4)
    attack = b"\x8c\x16numpy._core.multiarray\x8c\x06scalar\x93" + b"N}\x8c\x0c__defaults__C\x01x\x85s\x86b0"
    return pickled[:2] + attack + pickled[2:]
