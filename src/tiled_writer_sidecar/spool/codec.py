"""How one document is stored in a spool record: msgpack, numpy kept exact.

A payload is the msgpack array ``[1, name, doc]``; ``1`` is this format's
version (another is ``DecodeError("spool-version")``). Plain values are
msgpack's own: ``None``, ``bool``, ``float`` (binary64, exact: NaN payloads,
-0.0), ``str`` (lone surrogates too), ``bytes``, ``list``, ``dict`` (any
msgpack-able keys), ``int`` in [-2**63, 2**64); tuples and subclasses
(``OrderedDict``, ``IntEnum``) come back as the plain built-in type. The
rest are msgpack extension types:

  ====  ==============  ===============================================
  code  value           ext payload
  ====  ==============  ===============================================
  1     numpy.ndarray   u8 ndim | ndim x i64 LE shape | dtype | 0x00 | C-order bytes
  2     numpy scalar    dtype | 0x00 | the scalar's bytes
  3     int (big)       two's complement, little-endian, signed
  4     complex         real, imag as two float64 LE
  ====  ==============  ===============================================

``dtype`` is UTF-8: ``dtype.str`` (``<f8``, ``<M8[ns]``) or, structured,
``repr`` of numpy's ``.npy`` header descr, read back with
``ast.literal_eval`` (no code runs). Arrays and scalars come back with the
same dtype and shape, arrays writable and owning their memory; object arrays
are stored as nested lists. Packing anything else is ``TypeError`` (the wire
decoder lets through only what is listed here); unpacking anything that is
not this format is ``DecodeError("spool-corrupt")``, never another error.
"""

from __future__ import annotations

import ast
import math
import struct
import sys
import warnings
from typing import Any, Final

import msgpack  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt
from numpy.lib.format import descr_to_dtype, dtype_to_descr

from tiled_writer_sidecar.errors import DecodeError

__all__ = ["FORMAT_VERSION", "pack_document", "unpack_document"]

FORMAT_VERSION: Final = 1

_ARRAY: Final = 1
_SCALAR: Final = 2
_BIGINT: Final = 3
_COMPLEX: Final = 4
_COMPLEX_STRUCT: Final = struct.Struct("<dd")
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1

_dtype_names: dict[np.dtype[Any], bytes] = {}
_dtypes: dict[bytes, np.dtype[Any]] = {}
_CACHE_LIMIT: Final = 4096


# ----------------------------------------------------------------------- pack


def _dtype_name(dtype: np.dtype[Any]) -> bytes:
    name = _dtype_names.get(dtype)
    if name is None:
        if dtype.fields is None and dtype.subdtype is None:
            name = dtype.str.encode()
        else:
            with warnings.catch_warnings():  # "metadata is not saved": neither is it here
                warnings.simplefilter("ignore")
                name = repr(dtype_to_descr(dtype)).encode()
        if len(_dtype_names) < _CACHE_LIMIT:
            _dtype_names[dtype] = name
    return name


def _int(value: int) -> Any:
    if _INT_MIN <= value <= _INT_MAX:
        return value
    size = (value.bit_length() + 8) // 8
    return msgpack.ExtType(_BIGINT, value.to_bytes(size, "little", signed=True))


#: numpy's fixed-size number types -> their ext header (their dtype never varies).
_NUMBER_HEADERS: Final = {
    kind: np.dtype(kind).str.encode() + b"\0"
    for kind in set(np.sctypeDict.values())
    if issubclass(kind, (np.number, np.bool_)) and not issubclass(kind, (np.datetime64, np.timedelta64))
}


def _default(obj: Any) -> Any:
    """Called by msgpack (strict types) for everything it does not pack itself."""
    header = _NUMBER_HEADERS.get(type(obj))
    if header is not None:  # the fast path for event data: np.float64 & co
        return msgpack.ExtType(_SCALAR, header + obj.tobytes())
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            return obj.tolist()
        header = struct.pack(f"<B{obj.ndim}q", obj.ndim, *obj.shape)
        return msgpack.ExtType(_ARRAY, b"".join((header, _dtype_name(obj.dtype), b"\0", obj.tobytes())))
    if isinstance(obj, np.generic):
        if obj.dtype.hasobject:
            raise TypeError(f"cannot store a numpy scalar holding Python objects ({obj.dtype})")
        raw = obj.tobytes()[: obj.dtype.itemsize]  # np.str_("").tobytes() is 4 bytes for <U0
        return msgpack.ExtType(_SCALAR, _dtype_name(obj.dtype) + b"\0" + raw)
    if isinstance(obj, int):  # an int beyond 64 bits, or an int subclass (IntEnum)
        return _int(int(obj))
    if isinstance(obj, (list, tuple)):
        return list(obj)
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj)
    if isinstance(obj, complex):
        return msgpack.ExtType(_COMPLEX, _COMPLEX_STRUCT.pack(obj.real, obj.imag))
    raise TypeError(f"cannot store a value of type {type(obj).__module__}.{type(obj).__qualname__}")


def pack_document(name: str, doc: dict[str, Any]) -> bytes:
    """The spool payload for one document (``TypeError`` for values no document holds)."""
    try:
        return msgpack.packb(  # type: ignore[no-any-return]
            [FORMAT_VERSION, name, doc], default=_default, strict_types=True, use_bin_type=True
        )
    except UnicodeEncodeError:  # a lone surrogate (pickle and JSON can carry them)
        return msgpack.packb(  # type: ignore[no-any-return]
            [FORMAT_VERSION, name, doc],
            default=_default,
            strict_types=True,
            use_bin_type=True,
            unicode_errors="surrogatepass",
        )


# --------------------------------------------------------------------- unpack


def _dtype(name: bytes) -> np.dtype[Any]:
    dtype = _dtypes.get(name)
    if dtype is None:
        text = name.decode()
        dtype = descr_to_dtype(ast.literal_eval(text)) if text.startswith("[") else np.dtype(text)
        if dtype.hasobject:
            raise ValueError("dtype holds Python objects")
        if len(_dtypes) < _CACHE_LIMIT:
            _dtypes[name] = dtype
    return dtype


def _array(data: bytes, offset: int, dtype: np.dtype[Any], shape: tuple[int, ...]) -> npt.NDArray[Any]:
    count = math.prod(shape)
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError("array bytes do not match dtype and shape")
    if count == 0 or dtype.itemsize == 0:
        return np.zeros(shape, dtype=dtype)
    out = np.empty(shape, dtype=dtype)
    # Byte for byte: ndarray.copy() of a structured dtype skips its padding bytes.
    out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8, len(data) - offset, offset)
    return out


def _text_scalar(raw: bytes, dtype: np.dtype[Any]) -> np.generic:
    if dtype.kind == "S":
        return np.bytes_(raw)
    big = dtype.byteorder == ">" or (dtype.byteorder == "=" and sys.byteorder == "big")
    return np.str_(raw.decode("utf-32-be" if big else "utf-32-le", "surrogatepass"))


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _SCALAR:
        nul = data.index(b"\0")
        dtype = _dtypes.get(data[:nul]) or _dtype(data[:nul])
        if len(data) - nul - 1 != dtype.itemsize:
            raise ValueError("scalar bytes do not match its dtype")
        if dtype.kind in "SU":  # indexing an array would drop trailing NULs, and the itemsize
            return _text_scalar(data[nul + 1 :], dtype)
        if dtype.itemsize == 0:
            return np.zeros(1, dtype=dtype)[0]
        return np.frombuffer(data, dtype=dtype, count=1, offset=nul + 1)[0]
    if code == _ARRAY:
        ndim = data[0]
        start = 1 + 8 * ndim
        shape = struct.unpack_from(f"<{ndim}q", data, 1)
        nul = data.index(b"\0", start)
        return _array(data, nul + 1, _dtype(data[start:nul]), shape)
    if code == _BIGINT:
        return int.from_bytes(data, "little", signed=True)
    if code == _COMPLEX:
        return complex(*_COMPLEX_STRUCT.unpack(data))
    raise ValueError(f"unknown extension type {code}")


def unpack_document(payload: bytes) -> tuple[str, dict[str, Any]]:
    """``(name, doc)`` from `pack_document`'s payload, or ``DecodeError``."""
    try:
        record = msgpack.unpackb(
            payload, ext_hook=_ext_hook, raw=False, strict_map_key=False, unicode_errors="surrogatepass"
        )
    except Exception as exc:  # noqa: BLE001  # whatever the bytes are, the answer is one error
        raise DecodeError("spool-corrupt", f"{type(exc).__name__}: {str(exc)[:160]}") from None
    if type(record) is not list or len(record) != 3:
        raise DecodeError("spool-corrupt", "not a [version, name, document] record")
    version, name, doc = record
    if version != FORMAT_VERSION or type(version) is not int:
        raise DecodeError(
            "spool-version", f"record format {str(version)[:20]}, this build reads {FORMAT_VERSION}"
        )
    if type(name) is not str or type(doc) is not dict:
        raise DecodeError("spool-corrupt", "name is not a string or document is not a map")
    return name, doc
