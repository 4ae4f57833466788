"""0MQ frames from bluesky's ``Publisher`` -> ``(name, document)``, safely.

Design:

- Envelope: one frame, ``prefix name payload`` split like RemoteDispatcher
  (``split(b" ", 2)``); as there, an empty configured prefix accepts any.
- Nothing the sender chooses runs. pickle: a regex opcode scan first refuses
  memo indices the payload cannot need (CPython's C unpickler allocates
  ``16 * index`` bytes for LONG_BINPUT: 9 bytes could cost 64 GiB), then an
  Unpickler whose ``find_class`` knows only numpy array/scalar/dtype
  rebuilding (``numpy.core`` and ``numpy._core``, wrapped to build only from
  bytes in the pickle), OrderedDict (as dict), complex and protocol-2 bytes.
  msgpack: msgpack_numpy's ``nd`` maps are rebuilt here, never unpickled
  (object arrays are refused). JSON: ``json.loads``.
- ``auto`` reads the first byte: 0x80 is pickle's PROTO and also msgpack's
  empty map, which can only be the whole payload, so a lone ``0x80`` is ``{}``
  and anything longer is pickle; ``(``/``}`` pickle protocol 0/1;
  0x81-0x8f/0xde/0xdf msgpack; ``{`` (after JSON whitespace) JSON; else garbage.
- One iterative walk checks the result: str keys; only values the spool
  codec stores; depth <= 100; expanded size <= 4 x payload + 1 MiB (shared
  references in a pickle can make a kilobyte expand to terabytes).
- Pickle skeletons (`_Skeletons`): a stream's events are pickled alike, so a
  pickle of plain data (dicts, lists, tuples, ASCII str, bytes, int, float,
  bool, None) that passed the opcode scan and the walk has its *skeleton*
  remembered: its length and the bytes that decide tokenization, object
  types and sharing (opcodes, string lengths, memo indices). A payload with
  the same skeleton unpickles to a tree of the same shape and types with
  strings no longer, so the scan and the walk would pass it: both are
  skipped, and it is loaded by plain ``pickle.loads`` (no skeleton opcode
  imports or calls anything, so there is nothing for ``find_class`` to
  refuse). Anything else (other opcodes, a new skeleton) takes the full path.
- Failures are ``DecodeError(reason, detail)``: ``REASONS`` lists the stable
  reasons; details are ASCII and at most ~200 characters.
"""

from __future__ import annotations

import json
import math
import operator
import pickle
import pickletools
import re
from collections.abc import Callable
from typing import Any, Final

import msgpack  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt

from .errors import DecodeError

__all__ = ["DOCUMENT_NAMES", "REASONS", "SERIALIZERS", "decode_message"]

SERIALIZERS: Final = ("auto", "pickle", "msgpack", "json")

#: event-model's document names (the deprecated ``bulk_*`` are refused).
DOCUMENT_NAMES: Final = frozenset(
    {
        "start",
        "descriptor",
        "event",
        "event_page",
        "stop",
        "resource",
        "datum",
        "datum_page",
        "stream_resource",
        "stream_datum",
    }
)
_NAMES_BY_BYTES: Final = {name.encode(): name for name in DOCUMENT_NAMES}

#: Every ``DecodeError.reason`` this module raises.
REASONS: Final = (
    "frame-count",  # not exactly one frame
    "oversized",  # the frame is longer than max_bytes
    "envelope",  # not `prefix name payload`
    "prefix-mismatch",  # another publisher's prefix (callers ignore these)
    "unknown-document",  # name is not an event-model document name
    "truncated",  # the payload ends too early (also: empty payload)
    "garbage",  # not a well-formed payload of the chosen format
    "pickle-forbidden-global",  # pickle asked for a global outside the allow-list
    "msgpack-object-array",  # msgpack_numpy object array (it would need unpickling)
    "too-complex",  # too deep, too much sharing, memo index out of range
    "not-a-document",  # top level is not a dict with str keys
    "unsupported-type",  # a value or key a document cannot hold
)

_MAX_DEPTH: Final = 100
_EXPANSION: Final = 4
_SLACK: Final = 2**20
_DETAIL_CHARS: Final = 200


def _short(text: object) -> str:
    """`text` as printable ASCII, at most 200 characters."""
    shown = ascii(text) if not isinstance(text, str) else ascii(text)[1:-1]
    return shown if len(shown) <= _DETAIL_CHARS else shown[: _DETAIL_CHARS - 3] + "..."


# --------------------------------------------------------------------- pickle


def _pickle_opcode_table() -> tuple[re.Pattern[bytes], dict[int, tuple[int, bool]], bytes]:
    """From pickletools' opcode list: a regex for runs of harmless opcodes, and the rest.

    The regex matches any run of opcodes that cannot make the unpickler
    allocate by index: everything except STOP, opcodes whose argument is a
    length of 256 or more (4 or 8 bytes wide), PUT/LONG_BINPUT with an index
    of 2**20 or more and unknown bytes; `_scan_pickle` handles those.
    Returns (regex, {opcode: (length width, signed)}, opcodes with a fixed or
    text argument).
    """
    no_arg: list[int] = []
    lines: list[int] = []
    pairs: list[int] = []
    fixed: dict[int, list[int]] = {}
    lengths: dict[int, tuple[int, bool]] = {}
    for op in pickletools.opcodes:
        code = ord(op.code)
        width = None if op.arg is None else op.arg.n
        name = "" if op.arg is None else op.arg.name
        if code in (ord("."), ord("p"), ord("r")):  # STOP, PUT, LONG_BINPUT: by hand
            continue
        if width is None:
            no_arg.append(code)
        elif width > 0:
            fixed.setdefault(width, []).append(code)
        elif width == pickletools.UP_TO_NEWLINE:
            (pairs if name == "stringnl_noescape_pair" else lines).append(code)
        elif width == pickletools.TAKEN_FROM_ARGUMENT1:
            lengths[code] = (1, False)
        elif width == pickletools.TAKEN_FROM_ARGUMENT4:
            lengths[code] = (4, True)
        elif width == pickletools.TAKEN_FROM_ARGUMENT4U:
            lengths[code] = (4, False)
        elif width == pickletools.TAKEN_FROM_ARGUMENT8U:
            lengths[code] = (8, False)
        else:  # pragma: no cover - a new kind of pickle argument
            raise RuntimeError(f"unknown pickle argument kind for {op.name}")

    def charset(codes: list[int]) -> bytes:
        return b"[" + b"".join(re.escape(bytes([c])) for c in codes) + b"]"

    def counted(width: int) -> bytes:  # a little-endian length below 256, then that many bytes
        pad = b"\x00" * (width - 1)
        return b"(?:" + b"|".join(re.escape(bytes([n]) + pad) + b".{%d}" % n for n in range(256)) + b")"

    short = [c for c, (w, _) in lengths.items() if w == 1]
    four = [c for c, (w, _) in lengths.items() if w == 4]
    tokens = [
        charset(no_arg),
        charset(short) + counted(1),
        charset(four) + rb"(?=.\x00\x00\x00)" + counted(4),  # protocol 2/3 strings: BINUNICODE, ...
        *(charset(codes) + b".{%d}" % width for width, codes in fixed.items()),
        rb"r..[\x00-\x0f]\x00",  # LONG_BINPUT below 2**20
        rb"p[0-9]{1,6}\n",  # PUT below 10**6
        charset(lines) + rb"[^\n]*\n",
        charset(pairs) + rb"[^\n]*\n[^\n]*\n",
    ]
    regex = re.compile(b"(?:" + b"|".join(tokens) + b")*+", re.DOTALL)
    long_lengths = {c: v for c, v in lengths.items() if v[0] > 1}
    with_argument = bytes(sorted({*short, *lines, *pairs, *(c for cs in fixed.values() for c in cs)}))
    return regex, long_lengths, with_argument


_PICKLE_RUN, _PICKLE_LENGTHS, _PICKLE_ARGUMENT_OPS = _pickle_opcode_table()


def _scan_pickle(data: bytes) -> None:
    """Refuse pickles whose PUT/LONG_BINPUT index exceeds what `data` could need.

    The scan tokenizes like the C unpickler up to STOP; what it cannot
    tokenize (unknown opcode, missing bytes) is refused here, conservatively.
    Memo indices below 2**20 cost the unpickler at most 16 MiB and pass.
    """
    end = len(data)
    limit = end // 2 + 256  # every memoized object costs at least two bytes
    match = _PICKLE_RUN.match
    i = 0
    while True:
        i = match(data, i).end()  # type: ignore[union-attr]  # `*+` always matches
        if i >= end:
            raise DecodeError("truncated", "pickle without STOP")
        op = data[i]
        if op == 0x2E:  # STOP
            return
        length = _PICKLE_LENGTHS.get(op)
        if length is not None:
            width, signed = length
            size = int.from_bytes(data[i + 1 : i + 1 + width], "little", signed=signed)
            i += 1 + width + size
            if size < 0 or i > end:
                raise DecodeError("truncated", f"pickle opcode {op:#04x} runs past the end")
        elif op == 0x72:  # LONG_BINPUT
            if i + 5 > end:
                raise DecodeError("truncated", "pickle LONG_BINPUT cut off")
            index = int.from_bytes(data[i + 1 : i + 5], "little")
            if index > limit:
                raise DecodeError("too-complex", f"pickle memo index {index} for {end} bytes")
            i += 5
        elif op == 0x70:  # PUT
            newline = data.find(b"\n", i)
            if newline < 0:
                raise DecodeError("truncated", "pickle PUT without newline")
            try:
                index = int(data[i + 1 : newline])
            except ValueError:
                raise DecodeError("garbage", "pickle PUT with a bad index") from None
            if not 0 <= index <= limit:
                raise DecodeError("too-complex", f"pickle memo index {index} for {end} bytes")
            i = newline + 1
        elif op in _PICKLE_ARGUMENT_OPS:
            raise DecodeError("truncated", f"pickle opcode {op:#04x} cut off")
        else:
            raise DecodeError("garbage", f"unknown pickle opcode {op:#04x}")


class _NdarrayToken:
    """Stands in for ``numpy.ndarray`` in a pickle: usable only as _reconstruct's subtype."""


_NDARRAY_TOKEN: Final = _NdarrayToken()


def _numpy_attr(modules: tuple[str, ...], name: str) -> Any:
    for module in modules:
        try:
            return getattr(__import__(module, fromlist=[name]), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {name} in {modules}")  # pragma: no cover


_np_reconstruct: Final = _numpy_attr(("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct")
_np_scalar: Final = _numpy_attr(("numpy._core.multiarray", "numpy.core.multiarray"), "scalar")


def _reconstruct(subtype: object, shape: object, dtype: object) -> npt.NDArray[Any]:
    """numpy's ``_reconstruct``, for plain ndarrays only and always empty (BUILD fills it)."""
    if subtype is not _NDARRAY_TOKEN:
        raise DecodeError("pickle-forbidden-global", "numpy _reconstruct of something else than ndarray")
    return _np_reconstruct(np.ndarray, (0,), dtype)  # type: ignore[no-any-return]


def _scalar(dtype: object, data: object = None) -> Any:
    """numpy's ``scalar``, for dtypes without Python objects (numpy never pickles those)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise DecodeError("garbage", "numpy scalar without a plain dtype")
    return _np_scalar(dtype, data) if data is not None else _np_scalar(dtype)


def _frombuffer(
    buf: object, dtype: object, shape: object, order: object, axis_order: object = None
) -> npt.NDArray[Any]:
    """numpy's protocol-5 ``_frombuffer``: a view of bytes the pickle carried."""
    if not isinstance(buf, (bytes, bytearray)) or not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise DecodeError("garbage", "numpy _frombuffer with bad arguments")
    array = np.frombuffer(buf, dtype=dtype)
    if order == "K" and axis_order is not None:
        return array.reshape(shape, order="C").transpose(axis_order)  # type: ignore[call-overload,no-any-return]
    return array.reshape(shape, order=order)  # type: ignore[call-overload,no-any-return]


def _codecs_encode(text: object, encoding: object = "utf-8", errors: object = "strict") -> bytes:
    """Protocol 2 pickles bytes as ``_codecs.encode(str, "latin1")``; nothing else."""
    if type(text) is not str or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise DecodeError("pickle-forbidden-global", "_codecs.encode other than latin-1 text")
    return text.encode("latin-1")


def _empty_bytes(*args: object) -> bytes:
    """Protocols 0-2 pickle ``b""`` as ``bytes()``; ``bytes(10**12)`` would allocate a terabyte."""
    if args:
        raise DecodeError("pickle-forbidden-global", "bytes() with arguments")
    return b""


_NUMPY_MODULES: Final = ("numpy.core", "numpy._core")
_PICKLE_GLOBALS: Final[dict[tuple[str, str], Any]] = {
    ("numpy", "ndarray"): _NDARRAY_TOKEN,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): dict,
    ("builtins", "complex"): complex,
    ("__builtin__", "complex"): complex,  # protocols 0-2 use Python 2 names
    ("__builtin__", "bytes"): _empty_bytes,
    ("_codecs", "encode"): _codecs_encode,
    **{(f"{base}.multiarray", "_reconstruct"): _reconstruct for base in _NUMPY_MODULES},
    **{(f"{base}.multiarray", "scalar"): _scalar for base in _NUMPY_MODULES},
    **{(f"{base}.numeric", "_frombuffer"): _frombuffer for base in _NUMPY_MODULES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise DecodeError("pickle-forbidden-global", _short(f"{module}.{name}")) from None


def _loads_pickle(payload: bytes) -> Any:
    _scan_pickle(payload)
    return _unpickle(payload)


class _Sequential:
    """The payload as a file the C unpickler reads in sequence, whatever FRAME opcodes say.

    Given a file without ``peek`` (``io.BytesIO``), the C unpickler reads a
    FRAME's declared length into its buffer and, when an argument runs past
    it, drops the buffered bytes it had not used and reads on from the file:
    a wrong FRAME length makes it execute bytes `_scan_pickle` took for string
    contents (26 bytes could then allocate 64 GiB of memo). With ``peek``
    returning everything left (a view, no copy), it consumes the file exactly
    in order, as ``pickle.loads`` and the scan do.
    """

    def __init__(self, payload: bytes) -> None:
        self._payload = payload
        self._view = memoryview(payload)
        self._pos = 0

    def peek(self, size: int = 0) -> memoryview:
        return self._view[self._pos :]

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size < 0 else min(len(self._view), self._pos + size)
        data = self._view[self._pos : end].tobytes()
        self._pos = end
        return data

    def readinto(self, buffer: memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readline(self, size: int = -1) -> bytes:
        newline = self._payload.find(b"\n", self._pos)
        return self.read(-1 if newline < 0 else newline + 1 - self._pos)


def _restricted_loads(payload: bytes) -> Any:
    return _RestrictedUnpickler(_Sequential(payload), fix_imports=False).load()


def _unpickle(payload: bytes, loads: Callable[[bytes], Any] = _restricted_loads) -> Any:
    """Unpickle a payload already scanned; `loads` may be plain ``pickle.loads`` for a known skeleton."""
    try:
        return loads(payload)
    except DecodeError:
        raise
    except (EOFError, pickle.UnpicklingError) as exc:
        reason = "truncated" if isinstance(exc, EOFError) or "truncated" in str(exc) else "garbage"
        raise DecodeError(reason, _short(f"pickle: {exc}")) from None
    except Exception as exc:  # noqa: BLE001  # any failure of hostile bytes is a rejection
        raise DecodeError("garbage", _short(f"pickle: {type(exc).__name__}: {exc}")) from None


# -------------------------------------------------------------------- msgpack

_TYPESTR: Final = re.compile(r"[<>|=][biufcmMSUV][0-9]{1,9}(?:\[[0-9]{0,9}[A-Za-z]{1,7}\])?\Z")
_ARRAY_KEYS: Final = (
    frozenset({"nd", "type", "kind", "shape", "data"}),
    frozenset({"nd", "type", "shape", "data"}),
)
_SCALAR_KEYS: Final = frozenset({"nd", "type", "data"})
_COMPLEX_KEYS: Final = frozenset({"complex", "data"})


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii")
    if isinstance(value, str):
        return value
    raise ValueError("expected text")


def _msgpack_dtype(descr: object, depth: int = 0) -> np.dtype[Any]:
    """A dtype from msgpack_numpy's ``type`` (typestr, or a structured descr list)."""
    if depth > 8:
        raise ValueError("dtype nested too deep")
    if isinstance(descr, (str, bytes)):
        typestr = _text(descr)
        if not _TYPESTR.match(typestr):
            raise ValueError(f"bad typestr {typestr!r}")
        return np.dtype(typestr)
    if not isinstance(descr, list) or not descr:
        raise ValueError("bad dtype description")
    fields: list[Any] = []
    for field in descr:
        if not isinstance(field, list) or not 2 <= len(field) <= 3:
            raise ValueError("bad structured dtype field")
        sub = _msgpack_dtype(field[1], depth + 1)
        if len(field) == 3:
            fields.append((_text(field[0]), sub, _shape(field[2])))
        else:
            fields.append((_text(field[0]), sub))
    return np.dtype(fields)


def _shape(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 32:
        raise ValueError("bad shape")
    if not all(type(n) is int and n >= 0 for n in value):
        raise ValueError("bad shape")
    return tuple(value)


def _msgpack_numpy(obj: dict[Any, Any], nd: object) -> Any:
    """Rebuild a msgpack_numpy array/scalar map, or return `obj` if it is not one."""
    try:
        fields = {_text(key): value for key, value in obj.items()}
    except (ValueError, UnicodeDecodeError):
        return obj
    keys = fields.keys()
    if nd is True and keys in _ARRAY_KEYS:
        kind = fields.get("kind", b"")
        if kind in (b"O", "O"):
            raise DecodeError("msgpack-object-array", "msgpack_numpy object arrays are pickles")
        try:
            if kind not in (b"", "", b"V", "V"):
                raise ValueError(f"unknown kind {kind!r}")
            dtype = _msgpack_dtype(fields["type"])
            shape = _shape(fields["shape"])
            data = fields["data"]
            if not isinstance(data, bytes) or dtype.hasobject:
                raise ValueError("bad array data")
            if math.prod(shape) * dtype.itemsize != len(data):
                raise ValueError("array data does not match shape and dtype")
            return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
        except (ValueError, TypeError) as exc:
            raise DecodeError("garbage", _short(f"msgpack_numpy array: {exc}")) from None
    if nd is False and keys == _SCALAR_KEYS:
        try:
            dtype = _msgpack_dtype(fields["type"])
            data = fields["data"]
            if not isinstance(data, bytes) or dtype.hasobject or len(data) != dtype.itemsize:
                raise ValueError("bad scalar data")
            return np.frombuffer(data, dtype=dtype)[0]
        except (ValueError, TypeError) as exc:
            raise DecodeError("garbage", _short(f"msgpack_numpy scalar: {exc}")) from None
    return obj


def _msgpack_hook(obj: dict[Any, Any]) -> Any:
    if len(obj) > 5:
        return obj
    nd = obj.get(b"nd", obj.get("nd"))
    if nd is not None:
        return _msgpack_numpy(obj, nd)
    if obj.get(b"complex", obj.get("complex")) is True:
        fields = {(k.decode("ascii", "replace") if isinstance(k, bytes) else k): v for k, v in obj.items()}
        data = fields.get("data")
        if fields.keys() == _COMPLEX_KEYS and isinstance(data, (str, bytes)):
            try:
                return complex(_text(data))
            except ValueError as exc:
                raise DecodeError("garbage", _short(f"msgpack_numpy complex: {exc}")) from None
    return obj


def _refuse_ext(code: int, data: bytes) -> Any:
    raise DecodeError("unsupported-type", f"msgpack extension type {code}")


def _loads_msgpack(payload: bytes) -> Any:
    # unpackb derives max_str/bin/array/map/ext_len from len(payload), so no
    # header can make it allocate more than the payload could fill.
    try:
        return msgpack.unpackb(
            payload, raw=False, strict_map_key=True, object_hook=_msgpack_hook, ext_hook=_refuse_ext
        )
    except DecodeError:
        raise
    except msgpack.StackError:
        raise DecodeError("too-complex", "msgpack nested too deep") from None
    except (msgpack.ExtraData, msgpack.FormatError) as exc:
        raise DecodeError("garbage", _short(f"msgpack: {type(exc).__name__}")) from None
    except ValueError as exc:
        text = str(exc)
        reason = "truncated" if "incomplete" in text or "exceeds max" in text else "garbage"
        raise DecodeError(reason, _short(f"msgpack: {text}")) from None
    except Exception as exc:  # noqa: BLE001  # unhashable keys, bad UTF-8, ...
        raise DecodeError("garbage", _short(f"msgpack: {type(exc).__name__}: {exc}")) from None


# ----------------------------------------------------------------------- json


def _loads_json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except json.JSONDecodeError as exc:
        cut = exc.pos >= len(exc.doc.rstrip()) or exc.msg.startswith("Unterminated string")
        raise DecodeError("truncated" if cut else "garbage", _short(f"json: {exc}")) from None
    except RecursionError:
        raise DecodeError("too-complex", "json nested too deep") from None
    except Exception as exc:  # noqa: BLE001  # bad UTF-8, too many digits, ...
        raise DecodeError("garbage", _short(f"json: {type(exc).__name__}: {exc}")) from None


# ----------------------------------------------------------------------- auto

_JSON_SPACE: Final = b" \t\r\n"


def _detect(payload: bytes) -> Callable[[bytes], Any]:
    first = payload[0]
    if first == 0x80:
        return _loads_msgpack if len(payload) == 1 else _loads_pickle
    if 0x81 <= first <= 0x8F or first in (0xDE, 0xDF):
        return _loads_msgpack
    if first == 0x7B or (first in _JSON_SPACE and payload.lstrip(_JSON_SPACE)[:1] == b"{"):
        return _loads_json
    if first in (0x28, 0x7D):  # MARK / EMPTY_DICT: pickle protocol 0 / 1
        return _loads_pickle
    raise DecodeError("garbage", f"payload starts with {payload[:8]!r}, no known format")


_LOADERS: Final[dict[str, Callable[[bytes], Any]]] = {
    "pickle": _loads_pickle,
    "msgpack": _loads_msgpack,
    "json": _loads_json,
}


# ----------------------------------------------------------------------- walk

#: Values that hold no others and at most 32 bytes (numpy's numeric scalars included).
_LEAVES: Final = frozenset(
    {int, float, bool, type(None), complex, np.bool_, np.datetime64, np.timedelta64}
    | {t for t in np.sctypeDict.values() if issubclass(t, np.number)}
)
_TEXTS: Final = frozenset({str, bytes, np.str_, np.bytes_})


def _check_tree(doc: dict[Any, Any], budget: int) -> None:
    """Refuse values, keys, depth and (shared-reference) size a document cannot have."""
    cost = 0
    stack: list[tuple[Any, int]] = [(doc, 0)]
    push = stack.append
    pop = stack.pop
    leaves = _LEAVES
    texts = _TEXTS
    while stack:
        obj, depth = pop()
        if depth > _MAX_DEPTH:
            raise DecodeError("too-complex", f"nested deeper than {_MAX_DEPTH}")
        kind = type(obj)
        if kind is dict:
            cost += len(obj)
            for key, value in obj.items():
                if type(key) is not str:
                    reason = "unsupported-type" if depth else "not-a-document"
                    raise DecodeError(reason, f"key of type {type(key).__name__}")
                cost += len(key)
                vkind = type(value)
                if vkind in texts:
                    cost += len(value)
                elif vkind not in leaves:
                    push((value, depth + 1))
        elif kind is list or kind is tuple:
            cost += len(obj)
            for value in obj:
                vkind = type(value)
                if vkind in texts:
                    cost += len(value)
                elif vkind not in leaves:
                    push((value, depth + 1))
        elif kind is np.ndarray:
            cost += obj.nbytes
            if obj.dtype.hasobject:
                if obj.dtype != object:
                    raise DecodeError("unsupported-type", "structured array holding Python objects")
                for value in obj.flat:
                    push((value, depth + 1))
        elif isinstance(obj, np.generic):
            cost += obj.nbytes
            if obj.dtype.hasobject:
                raise DecodeError("unsupported-type", "numpy scalar holding Python objects")
        elif kind in texts:
            cost += len(obj)
        elif kind not in leaves:
            raise DecodeError(
                "unsupported-type", _short(f"value of type {kind.__module__}.{kind.__qualname__}")
            )
        if cost > budget:
            raise DecodeError("too-complex", f"document expands beyond {budget} bytes")


# ------------------------------------------------------------ pickle skeletons


def _op(name: str) -> int:
    return ord(next(op.code for op in pickletools.opcodes if op.name == name))


#: Plain-data opcodes a skeleton may hold: opcode -> (argument width, bytes of the argument kept).
#: Width -n is an n-byte length and that many bytes (kept: the length). The
#: kept bytes are what decides tokenization, types and sharing; the others
#: (a float's or an int's value, a frame's length) only change leaf values.
_PLAIN_OPS: Final[dict[int, tuple[int, int]]] = {
    **{
        _op(name): (0, 0)
        for name in [
            "EMPTY_DICT",
            "EMPTY_LIST",
            "EMPTY_TUPLE",
            "MARK",
            "SETITEM",
            "SETITEMS",
            "APPEND",
            "APPENDS",
            "TUPLE",
            "TUPLE1",
            "TUPLE2",
            "TUPLE3",
            "NONE",
            "NEWTRUE",
            "NEWFALSE",
            "MEMOIZE",
        ]
    },
    **{_op(name): (width, 0) for name, width in (("BINFLOAT", 8), ("BININT1", 1), ("BININT2", 2))},
    **{_op(name): (width, 0) for name, width in (("BININT", 4), ("FRAME", 8))},
    **{_op(name): (1, 1) for name in ("PROTO", "BINGET", "BINPUT")},
    **{_op(name): (-1, 1) for name in ("SHORT_BINUNICODE", "SHORT_BINBYTES")},
    **{_op(name): (-4, 4) for name in ("BINUNICODE", "BINBYTES")},
}
_TEXT_OPS: Final = frozenset({_op("SHORT_BINUNICODE"), _op("BINUNICODE")})
_STOP: Final = _op("STOP")


def _skeleton_positions(payload: bytes) -> tuple[int, ...] | None:
    """Offsets of the skeleton's bytes, or None if `payload` is not a plain-data pickle.

    Also None if a str is not ASCII: a payload of the same skeleton may then
    hold strings of more characters (a larger walk cost) than this one.
    """
    positions: list[int] = []
    plain = _PLAIN_OPS
    i, end = 0, len(payload)
    while i < end:
        op = payload[i]
        positions.append(i)
        if op == _STOP:
            return tuple(positions) if i + 1 == end else None
        arg = plain.get(op)
        if arg is None:
            return None
        width, kept = arg
        if width < 0:
            length = int.from_bytes(payload[i + 1 : i + 1 - width], "little")
            start = i + 1 - width
            if op in _TEXT_OPS and not payload[start : start + length].isascii():
                return None
            width = length - width
        positions.extend(range(i + 1, i + 1 + kept))
        i += 1 + width
    return None


class _Skeletons:
    """Skeletons of pickles that passed the scan and the walk (see the module docstring).

    Bounded: at most `LIMIT` skeletons (then forgotten all at once) and
    `PER_LENGTH` of one length (the oldest goes), so a lookup compares at
    most `PER_LENGTH`; a new one is learnt when its length has none yet, else
    on every `LEARN_EVERY`-th miss, so payloads that never repeat cost little
    more than the full path.
    """

    LIMIT: Final = 64
    PER_LENGTH: Final = 4
    LEARN_EVERY: Final = 32

    def __init__(self) -> None:
        self._by_length: dict[int, list[tuple[Callable[[bytes], Any], tuple[int, ...]]]] = {}
        self._count = 0
        self._misses = 0

    def known(self, payload: bytes) -> bool:
        """True if `payload` has the skeleton of a pickle already accepted."""
        for get, expected in self._by_length.get(len(payload), ()):  # noqa: SIM110  # no genexpr: hot path
            if get(payload) == expected:
                return True
        return False

    def learn(self, payload: bytes) -> None:
        """Remember the skeleton of `payload`, an accepted pickle (scanned, unpickled, walked)."""
        self._misses += 1
        same_length = self._by_length.get(len(payload))
        if same_length and self._misses % self.LEARN_EVERY:
            return
        positions = _skeleton_positions(payload)
        if positions is None:
            return
        if self._count >= self.LIMIT:
            self._by_length.clear()
            self._count = 0
        get = operator.itemgetter(*positions)
        same_length = self._by_length.setdefault(len(payload), [])
        same_length.insert(0, (get, get(payload)))
        if len(same_length) > self.PER_LENGTH:
            same_length.pop()
        else:
            self._count += 1


_SKELETONS: Final = _Skeletons()


def _pickle_document(payload: bytes, budget: int) -> dict[Any, Any]:
    """A pickled document, checked: by the scan and the walk, or by a known skeleton.

    A known skeleton holds plain-data opcodes only, none that imports or calls
    anything, so the C unpickler needs no `find_class` guard for it.
    """
    if _SKELETONS.known(payload):
        return _top_dict(_unpickle(payload, pickle.loads))
    doc = _top_dict(_loads_pickle(payload))
    _check_tree(doc, budget)
    _SKELETONS.learn(payload)
    return doc


def _top_dict(doc: object) -> dict[Any, Any]:
    if type(doc) is not dict:
        raise DecodeError("not-a-document", f"top level is {type(doc).__name__}, not dict")
    return doc


# ---------------------------------------------------------------------- entry


def decode_message(
    frames: list[bytes],
    *,
    serializer: str = "auto",
    prefix: bytes = b"",
    max_bytes: int = 64 * 2**20,
) -> tuple[str, dict[str, Any]]:
    """Decode one ``Publisher`` message into ``(name, document)`` or raise ``DecodeError``.

    `serializer` is one of ``SERIALIZERS`` (a ValueError otherwise: that is a
    configuration bug, not a bad message).
    """
    if serializer != "auto" and serializer not in _LOADERS:
        raise ValueError(f"serializer must be one of {SERIALIZERS}, not {serializer!r}")
    if len(frames) != 1:
        raise DecodeError("frame-count", f"{len(frames)} frames, expected 1")
    message = frames[0]
    if type(message) is not bytes:
        if not isinstance(message, (bytes, bytearray, memoryview)):
            raise DecodeError("garbage", f"frame of type {type(message).__name__}")
        message = bytes(message)
    if len(message) > max_bytes:
        raise DecodeError("oversized", f"{len(message)} bytes > max_bytes {max_bytes}")
    parts = message.split(b" ", 2)
    if len(parts) != 3:
        raise DecodeError("envelope", "expected `prefix name payload` separated by spaces")
    their_prefix, raw_name, payload = parts
    if prefix and their_prefix != prefix:
        raise DecodeError("prefix-mismatch", _short(their_prefix))
    name = _NAMES_BY_BYTES.get(raw_name)
    if name is None:
        raise DecodeError("unknown-document", _short(raw_name))
    if not payload:
        raise DecodeError("truncated", "empty payload")
    loads = _detect(payload) if serializer == "auto" else _LOADERS[serializer]
    budget = _EXPANSION * len(payload) + _SLACK
    if loads is _loads_pickle:
        return name, _pickle_document(payload, budget)
    doc = _top_dict(loads(payload))
    _check_tree(doc, budget)
    return name, doc
