"""0MQ frames from bluesky's ``Publisher`` -> ``(name, document)``, safely.

Contract of `decode_message`:

- Envelope: one frame, ``prefix name payload`` split as RemoteDispatcher does
  (``split(b" ", 2)``); an empty configured prefix accepts any.
- ``auto`` picks the format by the first byte: a lone ``0x80`` is msgpack's
  ``{}``, a longer ``0x80`` payload or ``(``/``}`` is pickle; 0x81-0x8f/0xde/0xdf
  msgpack; ``{`` (after JSON whitespace) JSON; anything else garbage.
- Nothing the sender names runs: pickle goes through an opcode scan and an
  Unpickler that knows only numpy rebuilding (from checked descriptions),
  OrderedDict (as dict), complex and protocol-2 bytes, as sealed objects bound
  to this load; msgpack_numpy ``nd`` maps are rebuilt here (no object arrays);
  JSON is ``json.loads``. Known plain-data pickle skeletons (`_Skeletons`) skip
  the scan and the walk, which they would pass, and load by ``pickle.loads``.
- A pickle nesting anything deeper than 200 is refused by the scan, before
  the unpickler builds (and hashes) it (`_pickle_nesting`).
- The result has str keys, only values the spool codec stores, depth <= 100,
  and costs at most `budget_for` (``min(32 MiB + 24 x payload, 512 MiB)``)
  decoded: estimated before decoding, charged while unpickling, walked after.
- Failures are ``DecodeError(reason, detail)``: a reason from ``REASONS``, an
  ASCII detail of at most ~200 characters. Nothing else is raised for any
  frames (MemoryError and RecursionError are ``too-complex``, anything
  unexpected ``garbage``).

How and why (the memo limit, the estimates, skeletons): docs/design.md,
"Trust boundaries: the invariant".
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

from tiled_writer_sidecar.config import SERIALIZERS
from tiled_writer_sidecar.errors import DecodeError
from tiled_writer_sidecar.states import Rejection, RejectionCategory
from tiled_writer_sidecar.text import ascii_text

__all__ = ["DOCUMENT_NAMES", "REASONS", "SERIALIZERS", "budget_for", "decode_message", "loads_json_checked"]


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

#: Every ``DecodeError.reason`` this module raises (`states.Rejection`, in its order).
REASONS: Final = tuple(
    r for r in Rejection if r.category in (RejectionCategory.DECODE, RejectionCategory.FOREIGN)
)

_MAX_DEPTH: Final = 100
#: Decoded-memory budget of one message: _SLACK + _EXPANSION x payload, at most _MAX_DECODED.
_EXPANSION: Final = 24
_SLACK: Final = 32 * 2**20
_MAX_DECODED: Final = 512 * 2**20
#: Payloads longer than this get an estimate of what decoding them allocates, before it does;
#: shorter ones cannot allocate more than _SLACK (at most _CONTAINER_COST per byte).
_ESTIMATE_FROM: Final = 32 * 2**10
_CONTAINER_COST: Final = 72  # an empty dict (64) or list (56) and the slot that holds it
_BYTE_COST: Final = 24  # any other object per byte of its encoding (a 1-char str: 58 for 3)
_OBJECT_COST: Final = 100  # an object's header (str, bytes, numpy scalar/array, placeholder)
_DETAIL_CHARS: Final = 200


def _short(text: object) -> str:
    """`text` as printable ASCII, at most `_DETAIL_CHARS` characters (`text.ascii_text`)."""
    return ascii_text(text, _DETAIL_CHARS)


# --------------------------------------------------------------------- pickle


#: Opcodes that make an object able to hold others; an object nested n deep needs n of them.
_MAKER_OPS: Final = b"]})(\x85\x86\x87R\x81\x92"
_NOT_MAKER: Final = bytes(b for b in range(256) if b not in _MAKER_OPS)


def _pickle_opcode_table() -> tuple[re.Pattern[bytes], re.Pattern[bytes], dict[int, tuple[int, bool]], bytes]:
    """From pickletools' opcode list: a regex for runs of harmless opcodes, and the rest.

    The regex matches any run of opcodes that cannot make the unpickler
    allocate by index: everything except STOP, opcodes whose argument is a
    length of 256 or more (4 or 8 bytes wide), PUT/LONG_BINPUT with an index
    of 2**20 or more and unknown bytes; `_scan_pickle` handles those.
    Returns (regex, a regex for one stretch up to a container-making opcode,
    {opcode: (length width, signed)}, opcodes with a fixed or text argument).
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
        if code in (ord("."), ord("p"), ord("r"), 0x8F, 0x90, 0x91):  # STOP, PUT, LONG_BINPUT, sets
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
    # Up to the next opcode that makes a container (they take no argument), or the end of the run.
    tokens[0] = charset([c for c in no_arg if c not in _MAKER_OPS])
    opcodes = re.compile(
        b"(?:" + b"|".join(tokens) + b")*+(?:([" + re.escape(_MAKER_OPS) + b"])|\\Z)", re.DOTALL
    )
    long_lengths = {c: v for c, v in lengths.items() if v[0] > 1}
    with_argument = bytes(sorted({*short, *lines, *pairs, *(c for cs in fixed.values() for c in cs)}))
    return regex, opcodes, long_lengths, with_argument


_PICKLE_RUN, _PICKLE_OPCODES, _PICKLE_LENGTHS, _PICKLE_ARGUMENT_OPS = _pickle_opcode_table()


#: Opcodes that build a set (a document never holds one; set() costs 216 bytes for 1).
_SET_OPS: Final = frozenset(b"\x8f\x90\x91")
#: Opcodes that make a container (MARK: LIST, DICT, TUPLE, ...), each at most `_CONTAINER_COST`.
_CONTAINER_OPS: Final = b"]}(\x85\x86\x87"
_NOT_CONTAINER: Final = bytes(b for b in range(256) if b not in _CONTAINER_OPS)
_TEXT_LENGTH_OPS: Final = frozenset(b"XT\x8d")  # BINUNICODE, BINSTRING, BINUNICODE8: up to 4 bytes/char


def _scan_pickle(data: bytes, budget: int = 2**62) -> None:
    """Refuse pickles whose memo indices or decoded size exceed what `data` may cost.

    The scan tokenizes like the C unpickler up to STOP; what it cannot
    tokenize (unknown opcode, missing bytes) is refused here, conservatively.
    Memo indices below 2**20 cost the unpickler at most 16 MiB and pass.
    Payloads over `_ESTIMATE_FROM` bytes also get `_pickle_estimate` of what
    unpickling them allocates, before anything is allocated.
    """
    end = len(data)
    limit = end // 2 + 256  # every memoized object costs at least two bytes
    match = _PICKLE_RUN.match
    estimate = end > _ESTIMATE_FROM
    spans: list[tuple[int, int]] = []
    strings = 0
    i = 0
    while True:
        start = i
        i = match(data, i).end()  # type: ignore[union-attr]  # `*+` always matches
        spans.append((start, i))
        if i >= end:
            raise DecodeError(Rejection.TRUNCATED, "pickle without STOP")
        op = data[i]
        if op == 0x2E:  # STOP
            if estimate:
                _pickle_estimate(data, spans, strings, budget)
            if _deep_enough(data, spans):  # else nothing can nest deeper
                _pickle_nesting(data, i)
            return
        length = _PICKLE_LENGTHS.get(op)
        if length is not None:
            width, signed = length
            size = int.from_bytes(data[i + 1 : i + 1 + width], "little", signed=signed)
            i += 1 + width + size
            if size < 0 or i > end:
                raise DecodeError(Rejection.TRUNCATED, f"pickle opcode {op:#04x} runs past the end")
            strings += _OBJECT_COST + size * (4 if op in _TEXT_LENGTH_OPS else 1)
        elif op == 0x72:  # LONG_BINPUT
            if i + 5 > end:
                raise DecodeError(Rejection.TRUNCATED, "pickle LONG_BINPUT cut off")
            index = int.from_bytes(data[i + 1 : i + 5], "little")
            if index > limit:
                raise DecodeError(Rejection.TOO_COMPLEX, f"pickle memo index {index} for {end} bytes")
            i += 5
        elif op == 0x70:  # PUT
            newline = data.find(b"\n", i)
            if newline < 0:
                raise DecodeError(Rejection.TRUNCATED, "pickle PUT without newline")
            try:
                index = int(data[i + 1 : newline])
            except ValueError:
                raise DecodeError(Rejection.GARBAGE, "pickle PUT with a bad index") from None
            if not 0 <= index <= limit:
                raise DecodeError(Rejection.TOO_COMPLEX, f"pickle memo index {index} for {end} bytes")
            i = newline + 1
        elif op in _SET_OPS:
            raise DecodeError(Rejection.UNSUPPORTED_TYPE, "a set (pickle EMPTY_SET/FROZENSET)")
        elif op in _PICKLE_ARGUMENT_OPS:
            raise DecodeError(Rejection.TRUNCATED, f"pickle opcode {op:#04x} cut off")
        else:
            raise DecodeError(Rejection.GARBAGE, f"unknown pickle opcode {op:#04x}")


#: Nesting the scan lets through: the walk's `_MAX_DEPTH` for the document, plus what numpy's
#: pickles nest inside one value (reduce arguments, array and dtype states, `_MAX_DTYPE_DEPTH`
#: structured levels of 3). Hashing or comparing an object this deep is safe; 200,000 is not.
_MAX_HEIGHT: Final = 2 * 100


def _deep_enough(data: bytes, spans: list[tuple[int, int]]) -> bool:
    """Whether `data`'s runs (`spans`, from the scan) hold more than `_MAX_HEIGHT` container makers.

    An object nested n deep needs n objects that hold others, each made by one such opcode.
    """
    if len(data.translate(None, _NOT_MAKER)) <= _MAX_HEIGHT:  # every byte an opcode: an upper bound
        return False
    count = 0
    finditer = _PICKLE_OPCODES.finditer
    for start, stop in spans:
        for found in finditer(data, start, stop):
            if found.group(1) is None:  # the end of the run
                break
            count += 1
            if count > _MAX_HEIGHT:
                return True
    return False


def _nesting_tables() -> tuple[bytes, list[int]]:
    """Per opcode: what `_pickle_nesting` does (an action below) and how to skip its argument.

    Skip: n >= 0 fixed bytes; -1, -4, -8 a length of that many bytes, then as many bytes;
    -10 one line, -20 two lines.
    """
    lengths = {
        pickletools.TAKEN_FROM_ARGUMENT1: -1,
        pickletools.TAKEN_FROM_ARGUMENT4: -4,
        pickletools.TAKEN_FROM_ARGUMENT4U: -4,
        pickletools.TAKEN_FROM_ARGUMENT8U: -8,
        pickletools.UP_TO_NEWLINE: -10,
    }
    skip = [0] * 256
    for op in pickletools.opcodes:
        width = 0 if op.arg is None else op.arg.n
        skip[ord(op.code)] = width if width >= 0 else lengths[width]
        if op.arg is not None and op.arg.name == "stringnl_noescape_pair":
            skip[ord(op.code)] = -20
    actions = bytearray(256)  # 0: the stack does not change (PROTO, FRAME, READONLY_BUFFER)
    for ops, action in (
        (b"IJKML\x8a\x8bSTUBC\x8e\x96\x97NV\x8c\x8d\x88\x89XFGc\x82\x83\x84P", _PUSH_LEAF),
        (b"\x94", _MEMOIZE),
        (b"pqr", _PUT),
        (b"ghj", _GET),
        (b"]})", _PUSH_EMPTY),
        (b"(", _MARK),
        (b"tldio", _FROM_MARK),
        (b"\x85\x86\x87", _TUPLE_N),
        (b"R\x81", _FROM_TWO),
        (b"\x92", _FROM_THREE),
        (b"ab", _FILL_ONE),
        (b"s", _FILL_TWO),
        (b"eu", _FILL_MARK),
        (b"0", _POP),
        (b"1", _POP_MARK),
        (b"2", _DUP),
        (b"\x93Q", _NAME),
    ):
        for code in ops:
            actions[code] = action
    return bytes(actions), skip


(
    _PUSH_LEAF, _MEMOIZE, _PUT, _GET, _PUSH_EMPTY, _MARK, _FROM_MARK, _TUPLE_N, _FROM_TWO, _FROM_THREE,
    _FILL_ONE, _FILL_TWO, _FILL_MARK, _POP, _POP_MARK, _DUP, _NAME,
) = range(1, 18)  # fmt: skip
_NEST_ACTIONS, _NEST_SKIP = _nesting_tables()


def _too_deep() -> DecodeError:
    return DecodeError(Rejection.TOO_COMPLEX, f"pickle nests deeper than {_MAX_HEIGHT}")


def _pickle_nesting(data: bytes, stop: int) -> None:  # one tight loop
    """Refuse a pickle that would build anything nested deeper than `_MAX_HEIGHT`, before it is built.

    Simulates the unpickler's stack up to `stop` (the scan's STOP) on cells
    ``[height, placed]``: a height is an object's nesting (0: it holds
    nothing), `placed` whether it is inside another object yet. Every object
    the pickle makes, fills (APPEND(S), SETITEM(S), BUILD) or shares (memo,
    DUP) is followed, so no key is ever hashed, nor a value compared, deeper
    than `_MAX_HEIGHT`. An object changed after it was put into another (a
    cycle does that; a document has none) is refused: its holder's height
    would be stale.
    """
    leaf = [0, 1]
    stack: list[list[int]] = []
    marks: list[int] = []
    memo: dict[int, list[int]] = {}
    push = stack.append
    actions = _NEST_ACTIONS
    skips = _NEST_SKIP
    limit = _MAX_HEIGHT
    i = 0
    while i < stop:
        op = data[i]
        width = skips[op]
        if width >= 0:
            following = i + 1 + width
        elif width == -1:
            following = i + 2 + data[i + 1]
        elif width == -10:
            following = data.index(b"\n", i + 1) + 1
        elif width == -20:
            following = data.index(b"\n", data.index(b"\n", i + 1) + 1) + 1
        else:
            following = i + 1 - width + int.from_bytes(data[i + 1 : i + 1 - width], "little")
        action = actions[op]
        if action == _PUSH_LEAF:
            push(leaf)
        elif action == _MEMOIZE:
            if stack:
                memo[len(memo)] = stack[-1]
        elif action == _PUT:
            if stack:
                arg = data[i + 1 : following]
                memo[int(arg) if op == 0x70 else int.from_bytes(arg, "little")] = stack[-1]
        elif action == _GET:
            arg = data[i + 1 : following]
            push(memo.get(int(arg) if op == 0x67 else int.from_bytes(arg, "little"), leaf))
        elif action == _PUSH_EMPTY:
            push([1, 0])
        elif action == _MARK:
            marks.append(len(stack))
        elif action == _POP:
            if marks and marks[-1] == len(stack):
                marks.pop()
            elif stack:
                stack.pop()
        elif action == _DUP:
            if stack:
                push(stack[-1])
        elif action == _NAME:
            del stack[-(2 if op == 0x93 else 1) :]
            push(leaf)
        else:  # an object is made or filled from the top items
            if action in (_FROM_MARK, _FILL_MARK, _POP_MARK):
                first = marks.pop() if marks else 0
            else:
                first = len(stack) - (
                    op - 0x84 if action == _TUPLE_N else 2 if action in (_FROM_TWO, _FILL_TWO) else
                    3 if action == _FROM_THREE else 1
                )  # fmt: skip
                first = max(first, 0)
            height = 0
            for item in stack[first:]:
                item[1] = 1
                if item[0] > height:
                    height = item[0]
            del stack[first:]
            height += 1
            if height > limit:
                raise _too_deep()
            if action in (_FILL_ONE, _FILL_TWO, _FILL_MARK):
                if stack:
                    target = stack[-1]
                    if target is not leaf:
                        if target[1]:
                            raise DecodeError(
                                Rejection.TOO_COMPLEX, "pickle changes an object inside another (a cycle)"
                            )
                        if height > target[0]:
                            target[0] = height
            elif action != _POP_MARK:
                push([height, 0])
        i = following


def _pickle_estimate(data: bytes, spans: list[tuple[int, int]], strings: int, budget: int) -> None:
    """Refuse a pickle whose unpickling could allocate more than `budget` bytes.

    Outside long strings (`spans`), a byte costs at most `_CONTAINER_COST` if
    it is a container opcode (an empty list is 56 bytes for one), else at most
    `_BYTE_COST` (a one-character str: 58 bytes for 3, a stack or memo slot:
    16 bytes for 1). Long strings cost their length (text: 4 bytes/char).
    Bytes of short strings count as opcodes: an upper bound, never less.
    """
    structure = sum(stop - start for start, stop in spans)
    worst = _CONTAINER_COST * structure + strings
    if worst <= budget:
        return
    containers = sum(len(data[start:stop].translate(None, _NOT_CONTAINER)) for start, stop in spans)
    cost = _CONTAINER_COST * containers + _BYTE_COST * (structure - containers) + strings
    if cost > budget:
        raise DecodeError(
            Rejection.TOO_COMPLEX, f"pickle would allocate up to {cost} bytes > budget {budget}"
        )


# ------------------------------------------------------------ pickle: globals


class _Load:
    """One unpickling's own state: what it may still allocate, and its placeholders.

    Everything `find_class` hands out belongs to one `_Load` (made fresh per
    payload), so nothing a pickle touches outlives its message.
    """

    __slots__ = ("arrays", "budget", "cost", "globals")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.cost = 0
        self.arrays = 0  # _ArraySpec placeholders made (they are swapped for arrays after loading)
        self.globals: dict[tuple[str, str], Any] = {}

    def charge(self, nbytes: int) -> None:
        self.cost += nbytes
        if self.cost > self.budget:
            raise DecodeError(
                Rejection.TOO_COMPLEX, f"pickle builds more than its budget of {self.budget} bytes"
            )


class _Sealed:
    """Base of what a pickle can get hold of: no ``__dict__``, and BUILD is refused."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        raise DecodeError(Rejection.PICKLE_FORBIDDEN_GLOBAL, f"BUILD on {type(self).__name__.lstrip('_')}")

    def __reduce__(self) -> Any:  # pragma: no cover - only ever made while unpickling
        raise TypeError(f"{type(self).__name__} cannot be pickled")


class _Global(_Sealed):
    """An allowed global as ``find_class`` returns it: calls `func(load, *args)`."""

    __slots__ = ("func", "load")

    def __init__(self, func: Callable[..., Any], load: _Load) -> None:
        self.func = func
        self.load = load

    def __call__(self, *args: object) -> Any:
        self.load.charge(_OBJECT_COST)
        return self.func(self.load, *args)


class _NdarrayMarker(_Sealed):
    """Stands in for ``numpy.ndarray`` in a pickle: usable only as _reconstruct's subtype."""

    __slots__ = ()


_TYPECODE: Final = re.compile(r"[biufcmMSUVO][0-9]{0,10}\Z")
_DATETIME_UNITS: Final = frozenset(
    {b"Y", b"M", b"W", b"D", b"h", b"m", b"s", b"ms", b"us", b"ns", b"ps", b"fs", b"as"}
)
_MAX_FIELDS: Final = 4096
_MAX_DTYPE_DEPTH: Final = 8
_MAX_NDIM: Final = 32
_ALIGNED_STRUCT: Final = 0x80  # numpy's NPY_ALIGNED_STRUCT flag in a pickled dtype state
_DTYPE_CACHE_SIZE: Final = 256
_dtype_cache: dict[tuple[str, tuple[Any, ...]], np.dtype[Any]] = {}


class _DtypeSpec(_Sealed):
    """``numpy.dtype(typecode, align, copy)`` from a pickle: a description, not a dtype.

    BUILD hands it numpy's dtype state once; `_dtype_from_state` makes a real
    dtype from it only after checking every part against what numpy itself
    pickles (known typecodes and units, fields inside the item size).
    """

    __slots__ = ("dtype", "typecode")

    def __init__(self, typecode: str) -> None:
        self.typecode = typecode
        self.dtype: np.dtype[Any] | None = None

    def __setstate__(self, state: object) -> None:
        if self.dtype is not None:
            raise DecodeError(Rejection.GARBAGE, "numpy dtype state set twice")
        self.dtype = _dtype_from_state(self.typecode, state, 0)


def _new_dtype(load: _Load, typecode: object, align: object = False, copy: object = False) -> _DtypeSpec:
    if type(typecode) is not str or not _TYPECODE.match(typecode):
        raise DecodeError(Rejection.GARBAGE, _short(f"numpy dtype {typecode!r}"))
    return _DtypeSpec(typecode)


def _dtype_of(spec: object, depth: int = 0) -> np.dtype[Any]:
    """The real dtype a `_DtypeSpec` (already BUILD) stands for."""
    if type(spec) is not _DtypeSpec or spec.dtype is None:
        raise DecodeError(Rejection.GARBAGE, "numpy dtype expected")
    return spec.dtype


def _dtype_from_state(typecode: str, state: object, depth: int) -> np.dtype[Any]:
    """A dtype from numpy's pickled ``(typecode, state)``, or DecodeError. Cached when plain."""
    if type(state) is not tuple or len(state) not in (8, 9):
        raise DecodeError(Rejection.GARBAGE, "numpy dtype state is not numpy's")
    plain = _plain_state(state)
    cached = _dtype_cache.get((typecode, state)) if plain else None
    if cached is not None:
        return cached
    try:
        dtype = _build_dtype(typecode, state, depth)
    except DecodeError:
        raise
    except (ValueError, TypeError, OverflowError, KeyError, IndexError) as exc:
        raise DecodeError(Rejection.GARBAGE, _short(f"numpy dtype: {type(exc).__name__}")) from None
    if plain:
        if len(_dtype_cache) >= _DTYPE_CACHE_SIZE:
            _dtype_cache.clear()
        _dtype_cache[(typecode, state)] = dtype
    return dtype


_FLAT: Final = frozenset({int, str, bytes, type(None)})


def _plain_state(state: tuple[Any, ...]) -> bool:
    """Whether a dtype state is a plain one (no subarray, no fields), made of flat values only.

    Only such a state is hashed (as a cache key): its parts are checked here,
    by type, before anything of the sender's is hashed or compared.
    """
    flat = _FLAT
    if state[2] is not None or state[3] is not None or state[4] is not None:
        return False
    if any(type(part) not in flat for part in state[:8]):
        return False
    if len(state) == 8:
        return True
    metadata = state[8]  # datetime: (None or a dict, (unit, num, den, events))
    if type(metadata) is not tuple or len(metadata) != 2 or type(metadata[0]) is not type(None):
        return False
    unit = metadata[1]
    return type(unit) is tuple and len(unit) == 4 and all(type(part) in flat for part in unit)


def _build_dtype(typecode: str, state: tuple[Any, ...], depth: int) -> np.dtype[Any]:
    version, endian, subarray, names, fields, elsize, _alignment, flags = state[:8]
    if type(version) is not int or version not in (3, 4) or (len(state) == 9) != (version == 4):
        raise ValueError("dtype state version")
    if (
        type(endian) is not str
        or endian not in ("<", ">", "|", "=")
        or type(elsize) is not int
        or type(flags) is not int
    ):
        raise ValueError("dtype state fields")
    if depth > _MAX_DTYPE_DEPTH:
        raise DecodeError(Rejection.TOO_COMPLEX, "numpy dtype nested too deep")
    kind = typecode[0]
    size = int(typecode[1:] or 0)
    if subarray is not None:
        if kind != "V" or names is not None or type(subarray) is not tuple or len(subarray) != 2:
            raise ValueError("subarray dtype")
        base, shape = _dtype_of(subarray[0]), _shape_tuple(subarray[1])
        if base.hasobject:
            raise DecodeError(Rejection.UNSUPPORTED_TYPE, "numpy subarray of Python objects")
        if base.itemsize * math.prod(shape) != size:
            raise ValueError("subarray size")
        return np.dtype((base, shape))
    if names is not None:
        return _structured(kind, size, names, fields, flags)
    if fields is not None:
        raise ValueError("fields without names")
    if kind in "mM":
        return np.dtype(endian + kind + "8" + _datetime_unit(state))
    dtype: np.dtype[Any] = np.dtype(endian + typecode)
    if elsize not in (-1, dtype.itemsize) or (kind == "O" and endian != "|"):
        raise ValueError("item size")
    return dtype


def _datetime_unit(state: tuple[Any, ...]) -> str:
    if len(state) != 9 or type(state[8]) is not tuple or len(state[8]) != 2:
        raise ValueError("datetime metadata")
    unit = state[8][1]
    if type(unit) is not tuple or len(unit) != 4:
        raise ValueError("datetime unit")
    name, num = unit[0], unit[1]
    if type(name) is not bytes:
        raise ValueError("datetime unit")
    if name == b"generic":
        return ""
    if name not in _DATETIME_UNITS or type(num) is not int or not 0 < num < 2**31:
        raise ValueError("datetime unit")
    return f"[{num}{name.decode()}]"


def _structured(kind: str, size: int, names: object, fields: object, flags: int) -> np.dtype[Any]:
    """A structured dtype whose every field lies inside its `size` bytes (no Python objects)."""
    if kind != "V" or type(names) is not tuple or type(fields) is not dict:
        raise ValueError("structured dtype")
    if len(names) > _MAX_FIELDS or len(fields) > 2 * _MAX_FIELDS:
        raise DecodeError(Rejection.TOO_COMPLEX, "numpy dtype with too many fields")
    formats: list[np.dtype[Any]] = []
    offsets: list[int] = []
    titles: list[str | None] = []
    for name in names:
        entry = fields.get(name) if type(name) is str else None
        if type(entry) is not tuple or len(entry) not in (2, 3):
            raise ValueError("structured dtype field")
        sub, offset = _dtype_of(entry[0]), entry[1]
        title = entry[2] if len(entry) == 3 else None
        if sub.hasobject:
            raise DecodeError(Rejection.UNSUPPORTED_TYPE, "numpy structured dtype holding Python objects")
        if type(offset) is not int or offset < 0 or offset + sub.itemsize > size:
            raise DecodeError(Rejection.GARBAGE, "numpy dtype field outside its item size")
        if title is not None and (type(title) is not str or title in names):
            raise ValueError("structured dtype title")
        formats.append(sub)
        offsets.append(offset)
        titles.append(title)
    spec: dict[str, Any] = {"names": list(names), "formats": formats, "offsets": offsets, "itemsize": size}
    if any(title is not None for title in titles):
        spec["titles"] = titles
    dtype: np.dtype[Any] = np.dtype(spec, align=bool(flags & _ALIGNED_STRUCT))  # type: ignore[call-overload]
    if dtype.itemsize != size:
        raise ValueError("structured dtype size")
    return dtype


def _shape_tuple(value: object) -> tuple[int, ...]:
    if type(value) is not tuple or len(value) > _MAX_NDIM:
        raise DecodeError(Rejection.GARBAGE, "numpy shape is not a tuple of sizes")
    for n in value:
        if type(n) is not int or not 0 <= n < 2**62:
            raise DecodeError(Rejection.GARBAGE, "numpy shape is not a tuple of sizes")
    return value


def _array_cost(shape: tuple[int, ...], itemsize: int, objects: bool) -> int:
    """What an array of `shape` may cost: its bytes, and per element of its non-zero dims.

    ``tolist()`` (the spool codec's for object arrays) and row-wise readers
    make an object per element even where another dimension is 0.
    """
    size = math.prod(shape)
    elements = size if size else math.prod(max(n, 1) for n in shape)
    return _OBJECT_COST + size * itemsize + (_CONTAINER_COST if objects else 8) * elements


class _ArraySpec(_Sealed):
    """``_reconstruct(ndarray, ...)`` from a pickle: the array is made at BUILD, swapped in after."""

    __slots__ = ("array", "load")

    def __init__(self, load: _Load) -> None:
        self.load = load
        self.array: npt.NDArray[Any] | None = None

    def __setstate__(self, state: object) -> None:
        if self.array is not None:
            raise DecodeError(Rejection.GARBAGE, "numpy array state set twice")
        self.array = _array_from_state(self.load, state)


def _array_from_state(load: _Load, state: object) -> npt.NDArray[Any]:
    """numpy's ``ndarray.__setstate__``, from checked parts only (a copy that owns its memory)."""
    if type(state) is not tuple or len(state) not in (4, 5):
        raise DecodeError(Rejection.GARBAGE, "numpy array state is not numpy's")
    if len(state) == 5 and state[0] != 1:
        raise DecodeError(Rejection.GARBAGE, "numpy array state version")
    shape_, spec, fortran, raw = state[-4:]
    shape, dtype = _shape_tuple(shape_), _dtype_of(spec)
    if type(fortran) not in (bool, int):
        raise DecodeError(Rejection.GARBAGE, "numpy array order flag")
    order = "F" if fortran else "C"
    load.charge(_array_cost(shape, dtype.itemsize, dtype.hasobject))
    if dtype.hasobject:
        return _object_array(shape, dtype, order, raw)
    if type(raw) is not bytes or len(raw) != math.prod(shape) * dtype.itemsize:
        raise DecodeError(Rejection.GARBAGE, "numpy array bytes do not match its shape and dtype")
    if dtype.names is None and dtype.byteorder in ("=", "|") and dtype.itemsize:  # the usual case
        return np.frombuffer(raw, dtype).reshape(shape, order=order).copy(order=order)  # type: ignore[call-overload,no-any-return]
    out: npt.NDArray[Any] = np.empty(shape, dtype=dtype, order=order)  # type: ignore[call-overload]
    if raw:  # byte for byte: structured padding included
        out.reshape(-1, order="A").view(np.uint8)[:] = np.frombuffer(raw, np.uint8)
    if out.dtype.byteorder not in ("=", "|"):  # numpy's setstate: swapped to native order
        return out.astype(out.dtype.newbyteorder("="), order="K")
    return out


def _object_array(shape: tuple[int, ...], dtype: np.dtype[Any], order: str, raw: object) -> npt.NDArray[Any]:
    if dtype != np.dtype(object):
        raise DecodeError(Rejection.UNSUPPORTED_TYPE, "structured array holding Python objects")
    if type(raw) is not list or len(raw) != math.prod(shape):
        raise DecodeError(Rejection.GARBAGE, "numpy object array items do not match its shape")
    out: npt.NDArray[Any] = np.empty(shape, dtype=dtype, order=order)  # type: ignore[call-overload]
    flat = out.reshape(-1, order="A")
    for index, item in enumerate(raw):
        if type(item) is _ArraySpec:
            item = _built(item)
        flat[index] = item
    return out


def _built(spec: _ArraySpec) -> npt.NDArray[Any]:
    if spec.array is None:
        raise DecodeError(Rejection.GARBAGE, "numpy _reconstruct without its state")
    return spec.array


def _reconstruct(load: _Load, subtype: object, shape: object, typecode: object) -> _ArraySpec:
    """numpy's ``_reconstruct``, for plain ndarrays only: a placeholder that BUILD fills."""
    if type(subtype) is not _NdarrayMarker:
        raise DecodeError(
            Rejection.PICKLE_FORBIDDEN_GLOBAL, "numpy _reconstruct of something else than ndarray"
        )
    load.arrays += 1
    return _ArraySpec(load)


def _scalar(load: _Load, spec: object, data: object = None) -> Any:
    """numpy's ``scalar``, from its bytes (numpy always pickles them), no Python objects."""
    dtype = _dtype_of(spec)
    if dtype.hasobject:
        raise DecodeError(Rejection.UNSUPPORTED_TYPE, "numpy scalar holding Python objects")
    if type(data) is not bytes or len(data) != dtype.itemsize:
        raise DecodeError(Rejection.GARBAGE, "numpy scalar without exactly its bytes")
    load.charge(dtype.itemsize)
    return _np_scalar(dtype, data)


def _frombuffer(
    load: _Load, buf: object, spec: object, shape: object, order: object, axis_order: object = None
) -> npt.NDArray[Any]:
    """numpy's protocol-5 ``_frombuffer``: a view of bytes the pickle carried."""
    dtype, dims = _dtype_of(spec), _shape_tuple(shape)
    if not isinstance(buf, (bytes, bytearray)) or dtype.hasobject or type(order) is not str:
        raise DecodeError(Rejection.GARBAGE, "numpy _frombuffer with bad arguments")
    if order not in ("C", "F", "K"):
        raise DecodeError(Rejection.GARBAGE, "numpy _frombuffer with bad arguments")
    if len(buf) != math.prod(dims) * dtype.itemsize:
        raise DecodeError(Rejection.GARBAGE, "numpy _frombuffer bytes do not match shape and dtype")
    load.charge(_array_cost(dims, 0, False))
    array = np.frombuffer(buf, dtype=dtype)
    if order == "K" and axis_order is not None:
        axes = _shape_tuple(axis_order)
        if sorted(axes) != list(range(len(dims))):
            raise DecodeError(Rejection.GARBAGE, "numpy _frombuffer with a bad axis order")
        return array.reshape(dims, order="C").transpose(axes)
    return array.reshape(dims, order="C" if order == "K" else order)  # type: ignore[call-overload,no-any-return]


def _codecs_encode(load: _Load, text: object, encoding: object = "utf-8", errors: object = "strict") -> bytes:
    """Protocol 2 pickles bytes as ``_codecs.encode(str, "latin1")``; nothing else."""
    if type(text) is not str or type(encoding) is not str or type(errors) is not str:
        raise DecodeError(Rejection.PICKLE_FORBIDDEN_GLOBAL, "_codecs.encode other than latin-1 text")
    if encoding not in ("latin1", "latin-1") or errors != "strict":
        raise DecodeError(Rejection.PICKLE_FORBIDDEN_GLOBAL, "_codecs.encode other than latin-1 text")
    load.charge(len(text))
    return text.encode("latin-1")


def _empty_bytes(load: _Load, *args: object) -> bytes:
    """Protocols 0-2 pickle ``b""`` as ``bytes()``; ``bytes(10**12)`` would allocate a terabyte."""
    if args:
        raise DecodeError(Rejection.PICKLE_FORBIDDEN_GLOBAL, "bytes() with arguments")
    return b""


def _complex(load: _Load, *args: object) -> complex:
    if not 1 <= len(args) <= 2 or any(type(part) not in (float, int) for part in args):
        raise DecodeError(Rejection.PICKLE_FORBIDDEN_GLOBAL, "complex() of anything but numbers")
    real, imag = (*args, 0.0)[:2]
    return complex(float(real), float(imag))  # type: ignore[arg-type]


def _ordered_dict(load: _Load, *args: object) -> dict[Any, Any]:
    """``collections.OrderedDict`` as a plain dict; its items come by SETITEM(S)."""
    if args and (len(args) != 1 or type(args[0]) not in (tuple, list) or args[0]):
        raise DecodeError(Rejection.PICKLE_FORBIDDEN_GLOBAL, "OrderedDict() with arguments")
    return {}


def _numpy_attr(modules: tuple[str, ...], name: str) -> Any:
    for module in modules:
        try:
            return getattr(__import__(module, fromlist=[name]), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {name} in {modules}")  # pragma: no cover


_np_scalar: Final = _numpy_attr(("numpy._core.multiarray", "numpy.core.multiarray"), "scalar")
_NUMPY_MODULES: Final = ("numpy.core", "numpy._core")
_PICKLE_GLOBALS: Final[dict[tuple[str, str], Callable[..., Any]]] = {
    ("numpy", "dtype"): _new_dtype,
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "complex"): _complex,
    ("__builtin__", "complex"): _complex,  # protocols 0-2 use Python 2 names
    ("__builtin__", "bytes"): _empty_bytes,
    ("_codecs", "encode"): _codecs_encode,
    **{(f"{base}.multiarray", "_reconstruct"): _reconstruct for base in _NUMPY_MODULES},
    **{(f"{base}.multiarray", "scalar"): _scalar for base in _NUMPY_MODULES},
    **{(f"{base}.numeric", "_frombuffer"): _frombuffer for base in _NUMPY_MODULES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Knows only `_PICKLE_GLOBALS`, each handed out sealed and bound to this load."""

    def __init__(self, payload: bytes, load: _Load) -> None:
        super().__init__(_Sequential(payload), fix_imports=False)
        self.state = load

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        found = self.state.globals.get(key)
        if found is not None:
            return found
        if key == ("numpy", "ndarray"):
            found = _NdarrayMarker()
        else:
            try:
                found = _Global(_PICKLE_GLOBALS[key], self.state)
            except (KeyError, TypeError):
                raise DecodeError(Rejection.PICKLE_FORBIDDEN_GLOBAL, _short(f"{module}.{name}")) from None
        self.state.globals[key] = found
        return found


class _Sequential:
    """The payload as a file the C unpickler reads in sequence, whatever FRAME opcodes say.

    Given a file without ``peek`` (``io.BytesIO``), the C unpickler reads a
    FRAME's declared length into its buffer and, when an argument runs past
    it, drops the buffered bytes it had not used and reads on from the file:
    a wrong FRAME length makes it execute bytes `_scan_pickle` took for string
    contents (26 bytes could then allocate 64 GiB of memo). With ``peek``
    returning everything left (a view, no copy), it consumes the file exactly
    in order, as ``pickle.loads`` and the scan do. It then calls ``read`` only
    to skip what it consumed (the result is dropped) or when the payload is
    too short: ``read`` moves on and returns nothing (no copy of the payload),
    which the unpickler reports as truncated.
    """

    def __init__(self, payload: bytes) -> None:
        self._view = memoryview(payload)
        self._pos = 0

    def peek(self, size: int = 0) -> memoryview:
        return self._view[self._pos :]

    def read(self, size: int = -1) -> bytes:
        self._pos = len(self._view) if size < 0 else min(len(self._view), self._pos + size)
        return b""

    def readinto(self, buffer: memoryview) -> int:
        self.read(len(buffer))
        return 0

    def readline(self, size: int = -1) -> bytes:
        return self.read()


def _restricted_loads(payload: bytes, budget: int = 2**62) -> Any:
    """Unpickle with the restricted unpickler; `_ArraySpec` placeholders are left in (see `_check_tree`)."""
    return _RestrictedUnpickler(payload, _Load(budget)).load()


def _swap_arrays(obj: Any, done: dict[int, Any], depth: int) -> Any:
    """`obj` with every `_ArraySpec` replaced by its array (dicts and lists in place, tuples anew)."""
    kind = type(obj)
    if kind is _ArraySpec:
        return _built(obj)
    if kind not in (dict, list, tuple):
        return obj
    seen = done.get(id(obj))
    if seen is not None:
        return seen
    if depth > _MAX_DEPTH:
        raise DecodeError(Rejection.TOO_COMPLEX, f"nested deeper than {_MAX_DEPTH}")
    done[id(obj)] = obj
    if kind is dict:
        for key, value in obj.items():
            if type(value) in (_ArraySpec, dict, list, tuple):
                obj[key] = _swap_arrays(value, done, depth + 1)
    elif kind is list:
        for index, value in enumerate(obj):
            if type(value) in (_ArraySpec, dict, list, tuple):
                obj[index] = _swap_arrays(value, done, depth + 1)
    else:
        items = tuple(_swap_arrays(value, done, depth + 1) for value in obj)
        if any(a is not b for a, b in zip(items, obj, strict=True)):
            done[id(obj)] = items
            return items
    return obj


def _unpickle(payload: bytes, loads: Callable[[bytes], Any] = _restricted_loads) -> Any:
    """Unpickle a payload already scanned; `loads` may be plain ``pickle.loads`` for a known skeleton."""
    try:
        return loads(payload)
    except DecodeError:
        raise
    except (EOFError, pickle.UnpicklingError) as exc:
        reason = "truncated" if isinstance(exc, EOFError) or "truncated" in str(exc) else "garbage"
        raise DecodeError(reason, _short(f"pickle: {exc}")) from None
    except MemoryError:
        raise DecodeError(Rejection.TOO_COMPLEX, "pickle: out of memory") from None
    except RecursionError:
        raise DecodeError(Rejection.TOO_COMPLEX, "pickle: nested too deep") from None
    except Exception as exc:  # noqa: BLE001  # any failure of hostile bytes is a rejection
        raise DecodeError(Rejection.GARBAGE, _short(f"pickle: {type(exc).__name__}: {exc}")) from None


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
            raise DecodeError(Rejection.MSGPACK_OBJECT_ARRAY, "msgpack_numpy object arrays are pickles")
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
            raise DecodeError(Rejection.GARBAGE, _short(f"msgpack_numpy array: {exc}")) from None
    if nd is False and keys == _SCALAR_KEYS:
        try:
            dtype = _msgpack_dtype(fields["type"])
            data = fields["data"]
            if not isinstance(data, bytes) or dtype.hasobject or len(data) != dtype.itemsize:
                raise ValueError("bad scalar data")
            return np.frombuffer(data, dtype=dtype)[0]
        except (ValueError, TypeError) as exc:
            raise DecodeError(Rejection.GARBAGE, _short(f"msgpack_numpy scalar: {exc}")) from None
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
                raise DecodeError(Rejection.GARBAGE, _short(f"msgpack_numpy complex: {exc}")) from None
    return obj


def _refuse_ext(code: int, data: bytes) -> Any:
    raise DecodeError(Rejection.UNSUPPORTED_TYPE, f"msgpack extension type {code}")


#: msgpack first bytes -> (header width, kind): kinds "a" array, "m" map, "s" str, "b" bin/ext, "" scalar.
def _msgpack_heads() -> dict[int, tuple[int, int, str]]:
    """first byte -> (bytes before the payload, fixed payload length or -width of its length, kind)."""
    heads: dict[int, tuple[int, int, str]] = {}
    for byte in range(256):
        if byte <= 0x7F or byte >= 0xE0 or byte in (0xC0, 0xC2, 0xC3):
            heads[byte] = (1, 0, "")
        elif byte <= 0x8F:
            heads[byte] = (1, byte & 0x0F, "m")
        elif byte <= 0x9F:
            heads[byte] = (1, byte & 0x0F, "a")
        elif byte <= 0xBF:
            heads[byte] = (1, byte & 0x1F, "s")
    for byte, width, kind in (
        (0xC4, 1, "b"), (0xC5, 2, "b"), (0xC6, 4, "b"), (0xD9, 1, "s"), (0xDA, 2, "s"), (0xDB, 4, "s"),
        (0xDC, 2, "a"), (0xDD, 4, "a"), (0xDE, 2, "m"), (0xDF, 4, "m"),
    ):  # fmt: skip
        heads[byte] = (1 + width, -width, kind)
    for byte, size in ((0xCA, 4), (0xCB, 8), (0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
        heads[byte] = (1 + size, 0, "")
    for byte, size in ((0xD0, 1), (0xD1, 2), (0xD2, 4), (0xD3, 8)):
        heads[byte] = (1 + size, 0, "")
    for byte, size in ((0xD4, 1), (0xD5, 2), (0xD6, 4), (0xD7, 8), (0xD8, 16)):
        heads[byte] = (2 + size, 0, "")  # fixext: type byte and data
    for byte, width in ((0xC7, 1), (0xC8, 2), (0xC9, 4)):
        heads[byte] = (2 + width, -width, "b")  # ext: length, type byte, data
    return heads  # 0xC1 is never used: missing, like a truncated header


_MSGPACK_HEADS: Final = _msgpack_heads()
#: A run of one-byte msgpack values that open nothing (ints, nil, bools, empty maps/arrays).
_MSGPACK_ATOMS: Final = re.compile(rb"[\x00-\x7f\xe0-\xff\xc0\xc2\xc3\x80\x90\xa0]+")


def _msgpack_estimate(data: bytes, budget: int) -> None:
    """Walk the headers of one msgpack value (nothing built); refuse it if decoding could cost > `budget`.

    Charged like `_check_tree`: containers their Python size, strings 4 bytes a
    character, everything else `_BYTE_COST` per byte of its encoding. Stops at
    the end of `data` (msgpack itself reports the truncation).
    """
    heads = _MSGPACK_HEADS
    atoms = _MSGPACK_ATOMS.match
    end = len(data)
    cost = 0
    pending = 1
    i = 0
    while pending and i < end:
        run = atoms(data, i)
        if run is not None:
            n = min(run.end() - i, pending)
            empty = data.count(b"\x80", i, i + n) + data.count(b"\x90", i, i + n)
            cost += _BYTE_COST * n + _CONTAINER_COST * empty
            i += n
            pending -= n
        else:
            head = heads.get(data[i])
            if head is None:
                return  # not msgpack: unpackb says so
            skip, length, kind = head
            if length < 0:
                length = int.from_bytes(data[i + 1 : i + 1 - length], "big")
            pending -= 1
            i += skip
            if kind == "a":
                pending += length
                cost += _CONTAINER_COST + 8 * length
            elif kind == "m":
                pending += 2 * length
                cost += _CONTAINER_COST + 48 * length
            else:
                i += length if kind else 0
                cost += _OBJECT_COST + (4 * length if kind == "s" else length if kind else _BYTE_COST * skip)
        if cost > budget:
            raise DecodeError(
                Rejection.TOO_COMPLEX, f"msgpack would allocate more than its budget of {budget} bytes"
            )


def _loads_msgpack(payload: bytes, budget: int = 2**62) -> Any:
    # unpackb derives max_str/bin/array/map/ext_len from len(payload), so no
    # header can make it allocate more than the payload could fill; how many
    # objects it makes is what `_msgpack_estimate` bounds.
    if len(payload) > _ESTIMATE_FROM:
        _msgpack_estimate(payload, budget)
    try:
        return msgpack.unpackb(
            payload, raw=False, strict_map_key=True, object_hook=_msgpack_hook, ext_hook=_refuse_ext
        )
    except DecodeError:
        raise
    except msgpack.StackError:
        raise DecodeError(Rejection.TOO_COMPLEX, "msgpack nested too deep") from None
    except (msgpack.ExtraData, msgpack.FormatError) as exc:
        raise DecodeError(Rejection.GARBAGE, _short(f"msgpack: {type(exc).__name__}")) from None
    except MemoryError:
        raise DecodeError(Rejection.TOO_COMPLEX, "msgpack: out of memory") from None
    except ValueError as exc:
        text = str(exc)
        reason = "truncated" if "incomplete" in text or "exceeds max" in text else "garbage"
        raise DecodeError(reason, _short(f"msgpack: {text}")) from None
    except Exception as exc:  # noqa: BLE001  # unhashable keys, bad UTF-8, ...
        raise DecodeError(Rejection.GARBAGE, _short(f"msgpack: {type(exc).__name__}: {exc}")) from None


# ----------------------------------------------------------------------- json


def _json_estimate(payload: bytes, budget: int) -> None:
    """Refuse JSON that could cost more than `budget` once loaded (an upper bound, counted in C).

    Every ``[``/``{`` may open a container, every ``"`` half a string; the
    rest costs at most 12 bytes per byte (a number, a slot, 4 bytes a char).
    """
    cost = (
        12 * len(payload)
        + _CONTAINER_COST * (payload.count(b"[") + payload.count(b"{"))
        + 48 * payload.count(b'"')
    )
    if cost > budget:
        raise DecodeError(Rejection.TOO_COMPLEX, f"JSON could allocate {cost} bytes > budget {budget}")


def _loads_json(payload: bytes, budget: int = 2**62) -> Any:
    if len(payload) > _ESTIMATE_FROM:
        _json_estimate(payload, budget)
    try:
        return json.loads(payload)
    except json.JSONDecodeError as exc:
        cut = exc.pos >= len(exc.doc.rstrip()) or exc.msg.startswith("Unterminated string")
        raise DecodeError(Rejection.TRUNCATED if cut else "garbage", _short(f"json: {exc}")) from None
    except (RecursionError, MemoryError):
        raise DecodeError(Rejection.TOO_COMPLEX, "json nested too deep or too large") from None
    except Exception as exc:  # noqa: BLE001  # bad UTF-8, too many digits, ...
        raise DecodeError(Rejection.GARBAGE, _short(f"json: {type(exc).__name__}: {exc}")) from None


def _loads_pickle(payload: bytes, budget: int = 2**62) -> Any:
    _scan_pickle(payload, budget)
    return _unpickle(payload, lambda data: _restricted_loads(data, budget))


# ----------------------------------------------------------------------- auto

_JSON_SPACE: Final = b" \t\r\n"


_Loader = Callable[[bytes, int], Any]


def _detect(payload: bytes) -> _Loader:
    first = payload[0]
    if first == 0x80:
        return _loads_msgpack if len(payload) == 1 else _loads_pickle
    if 0x81 <= first <= 0x8F or first in (0xDE, 0xDF):
        return _loads_msgpack
    if first == 0x7B or (first in _JSON_SPACE and payload.lstrip(_JSON_SPACE)[:1] == b"{"):
        return _loads_json
    if first in (0x28, 0x7D):  # MARK / EMPTY_DICT: pickle protocol 0 / 1
        return _loads_pickle
    raise DecodeError(Rejection.GARBAGE, f"payload starts with {payload[:8]!r}, no known format")


_LOADERS: Final[dict[str, _Loader]] = {
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


def _check_tree(doc: dict[Any, Any], budget: int) -> bool:
    """Refuse values, keys, depth and (shared-reference) size a document cannot have.

    `_ArraySpec` placeholders (pickle) are swapped for their arrays in dicts
    and lists on the way; True if one sits in a tuple (see `_swap_arrays`).

    The size charged is memory, as often as a value is referenced: a dict or
    list its Python size (`_CONTAINER_COST` plus its slots and their leaves),
    a str/bytes its length plus a header, an array its bytes plus 8 per
    element of its non-zero dimensions (`_array_cost`).
    """
    cost = 0
    in_tuple = False
    stack: list[tuple[Any, int]] = [(doc, 0)]
    push = stack.append
    pop = stack.pop
    leaves = _LEAVES
    texts = _TEXTS
    while stack:
        obj, depth = pop()
        if depth > _MAX_DEPTH:
            raise DecodeError(Rejection.TOO_COMPLEX, f"nested deeper than {_MAX_DEPTH}")
        kind = type(obj)
        if kind is dict:
            cost += _CONTAINER_COST + 48 * len(obj)
            for key, value in obj.items():
                if type(key) is not str:
                    reason = "unsupported-type" if depth else "not-a-document"
                    raise DecodeError(reason, f"key of type {type(key).__name__}")
                cost += len(key)
                vkind = type(value)
                if vkind in texts:
                    cost += len(value) + 40
                elif vkind is _ArraySpec:
                    obj[key] = value = _built(value)  # an existing key: the dict keeps its size
                    push((value, depth + 1))
                elif vkind not in leaves:
                    push((value, depth + 1))
        elif kind is list or kind is tuple:
            cost += _CONTAINER_COST + 32 * len(obj)
            if kind is list and any(type(value) is _ArraySpec for value in obj):
                obj[:] = [_built(value) if type(value) is _ArraySpec else value for value in obj]
            for value in obj:
                vkind = type(value)
                if vkind in texts:
                    cost += len(value) + 40
                elif vkind not in leaves:
                    push((value, depth + 1))
        elif kind is np.ndarray:
            if obj.size and not obj.dtype.hasobject:
                cost += _OBJECT_COST + obj.nbytes + 8 * obj.size
            else:
                cost += _array_cost(obj.shape, obj.dtype.itemsize, obj.dtype.hasobject)
            if obj.dtype.hasobject:
                if obj.dtype != object:
                    raise DecodeError(Rejection.UNSUPPORTED_TYPE, "structured array holding Python objects")
                for value in obj.flat:
                    push((value, depth + 1))
        elif kind is _ArraySpec:  # in a tuple
            in_tuple = True
            push((_built(obj), depth))
        elif isinstance(obj, np.generic):
            cost += _OBJECT_COST + obj.nbytes
            if obj.dtype.hasobject:
                raise DecodeError(Rejection.UNSUPPORTED_TYPE, "numpy scalar holding Python objects")
        elif kind in texts:
            cost += len(obj)
        elif kind not in leaves:
            raise DecodeError(
                Rejection.UNSUPPORTED_TYPE, _short(f"value of type {kind.__module__}.{kind.__qualname__}")
            )
        if cost > budget:
            raise DecodeError(Rejection.TOO_COMPLEX, f"document expands beyond {budget} bytes")
    return in_tuple


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
    more than the full path. A length whose pickle was not plain data (real
    events hold numpy scalars) is tried again only every `LEARN_EVERY`-th miss.
    """

    LIMIT: Final = 64
    PER_LENGTH: Final = 4
    LEARN_EVERY: Final = 32

    def __init__(self) -> None:
        self._by_length: dict[int, list[tuple[Callable[[bytes], Any], tuple[int, ...]]]] = {}
        self._count = 0
        self._misses = 0
        self._tried: set[int] = set()  # lengths already tried: learnt, or not plain data

    def known(self, payload: bytes) -> bool:
        """True if `payload` has the skeleton of a pickle already accepted."""
        for get, expected in self._by_length.get(len(payload), ()):  # noqa: SIM110  # no genexpr: hot path
            if get(payload) == expected:
                return True
        return False

    def learn(self, payload: bytes) -> None:
        """Remember the skeleton of `payload`, an accepted pickle (scanned, unpickled, walked)."""
        self._misses += 1
        if len(payload) in self._tried and self._misses % self.LEARN_EVERY:
            return
        if len(self._tried) >= self.LIMIT:
            self._tried.clear()
        self._tried.add(len(payload))
        positions = _skeleton_positions(payload)
        if positions is None:  # numpy scalars in events, say: their length is tried again rarely
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
    doc = _top_dict(_loads_pickle(payload, budget))
    if _check_tree(doc, budget):
        doc = _swap_arrays(doc, {}, 0)
    _SKELETONS.learn(payload)
    return doc


def _top_dict(doc: object) -> dict[Any, Any]:
    if type(doc) is not dict:
        raise DecodeError(Rejection.NOT_A_DOCUMENT, f"top level is {type(doc).__name__}, not dict")
    return doc


# ---------------------------------------------------------------------- entry


def budget_for(payload_bytes: int) -> int:
    """The decoded-memory budget of a payload of `payload_bytes` (see the module docstring)."""
    return min(_SLACK + _EXPANSION * payload_bytes, _MAX_DECODED)


def loads_json_checked(raw: bytes) -> Any:
    """JSON from an untrusted file (import-backup), held to a message's rules: `budget_for` its
    length, estimated before parsing and walked after, depth and value types as `decode_message`.

    Raises ``DecodeError`` (``truncated``, ``garbage``, ``too-complex``, ...) and nothing else.
    """
    try:
        budget = budget_for(len(raw))
        value = _loads_json(raw, budget)
        if type(value) in (dict, list):
            _check_tree({"": value}, budget)
        return value
    except DecodeError:
        raise
    except (MemoryError, RecursionError) as exc:
        raise DecodeError(Rejection.TOO_COMPLEX, type(exc).__name__) from None
    except Exception as exc:  # noqa: BLE001  # as decode_message: only DecodeError leaves
        raise DecodeError(Rejection.GARBAGE, _short(f"{type(exc).__name__}: {exc}")) from None


def decode_message(
    frames: list[bytes],
    *,
    serializer: str = "auto",
    prefix: bytes = b"",
    max_bytes: int = 64 * 2**20,
) -> tuple[str, dict[str, Any]]:
    """Decode one ``Publisher`` message into ``(name, document)`` or raise ``DecodeError``.

    Nothing else leaves it for any frames: an unexpected failure (a bug here
    or in numpy, memory, recursion) is a ``DecodeError`` too. `serializer` is
    one of ``SERIALIZERS`` (a ValueError otherwise: that is a configuration
    bug, not a bad message).
    """
    if serializer != "auto" and serializer not in _LOADERS:
        raise ValueError(f"serializer must be one of {SERIALIZERS}, not {serializer!r}")
    try:
        return _decode(frames, serializer, prefix, max_bytes)
    except DecodeError:
        raise
    except (MemoryError, RecursionError) as exc:
        raise DecodeError(Rejection.TOO_COMPLEX, type(exc).__name__) from None
    except Exception as exc:  # noqa: BLE001  # the promise: hostile bytes only ever give a DecodeError
        raise DecodeError(Rejection.GARBAGE, _short(f"{type(exc).__name__}: {exc}")) from None


def _decode(
    frames: list[bytes], serializer: str, prefix: bytes, max_bytes: int
) -> tuple[str, dict[str, Any]]:
    if len(frames) != 1:
        raise DecodeError(Rejection.FRAME_COUNT, f"{len(frames)} frames, expected 1")
    message = frames[0]
    if type(message) is not bytes:
        if not isinstance(message, (bytes, bytearray, memoryview)):
            raise DecodeError(Rejection.GARBAGE, f"frame of type {type(message).__name__}")
        message = bytes(message)
    if len(message) > max_bytes:
        raise DecodeError(Rejection.OVERSIZED, f"{len(message)} bytes > max_bytes {max_bytes}")
    parts = message.split(b" ", 2)
    if len(parts) != 3:
        raise DecodeError(Rejection.ENVELOPE, "expected `prefix name payload` separated by spaces")
    their_prefix, raw_name, payload = parts
    if prefix and their_prefix != prefix:
        raise DecodeError(Rejection.PREFIX_MISMATCH, _short(their_prefix))
    name = _NAMES_BY_BYTES.get(raw_name)
    if name is None:
        raise DecodeError(Rejection.UNKNOWN_DOCUMENT, _short(raw_name))
    if not payload:
        raise DecodeError(Rejection.TRUNCATED, "empty payload")
    loads = _detect(payload) if serializer == "auto" else _LOADERS[serializer]
    budget = min(_SLACK + _EXPANSION * len(payload), _MAX_DECODED)
    if loads is _loads_pickle:
        return name, _pickle_document(payload, budget)
    doc = _top_dict(loads(payload, budget))
    _check_tree(doc, budget)
    return name, doc
