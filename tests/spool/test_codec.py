"""spool codec: documents round-trip exactly (numpy dtype/shape/bits kept); bad payloads: DecodeError."""

from __future__ import annotations

import enum
import struct
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.support.run_engine import simulated_runs
from tests.support.strength import examples
from tiled_writer_sidecar.errors import DecodeError
from tiled_writer_sidecar.spool.codec import FORMAT_VERSION, pack_document, unpack_document


def stored(value: Any) -> Any:
    """What the codec promises to give back for `value` (tuples -> lists, subclasses -> base types)."""
    if isinstance(value, np.ndarray):
        return stored(value.tolist()) if value.dtype.hasobject else value
    if isinstance(value, np.generic):
        return value
    if isinstance(value, dict):
        return {stored(k): stored(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [stored(v) for v in value]
    for base in (bool, int, float, str, bytes):
        if isinstance(value, base):
            return base(value)
    return value


def identical(a: Any, b: Any) -> bool:
    """Same types, same numpy dtype/shape/bits, same float bits (NaN payloads, -0.0)."""
    if isinstance(a, np.ndarray):
        return (
            type(b) is np.ndarray and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        )
    if isinstance(a, np.generic):
        return type(a) is type(b) and a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(identical, a, b))
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, complex):
        return identical(a.real, b.real) and identical(a.imag, b.imag)
    return bool(a == b)


def round_trip(doc: dict[str, Any], name: str = "event") -> dict[str, Any]:
    back_name, back = unpack_document(pack_document(name, doc))
    assert back_name == name
    return back


# ----------------------------------------------------------- real documents


@pytest.fixture(scope="module")
def run_engine_documents(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """count, scan, an image + int32 waveform detector, and a resource/datum detector."""
    with simulated_runs(tmp_path_factory.mktemp("sim")) as documents:
        yield documents


def test_every_real_run_engine_document_round_trips(run_engine_documents: list[tuple[str, Any]]) -> None:
    """Start/descriptor/event/stop/resource/datum: np.float64 scalars and image arrays come back exact."""
    arrays = 0
    for name, doc in run_engine_documents:
        back = round_trip(doc, name)
        assert identical(stored(doc), back)
        for value in back.get("data", {}).values() if name == "event" else ():
            if isinstance(value, np.ndarray):
                arrays += 1
                assert value.flags.writeable and value.flags.owndata
    assert arrays == 4


# -------------------------------------------------------------- exact values


_NAN_WITH_PAYLOAD = struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\x7f")[0]


@pytest.mark.parametrize(
    "value",
    [
        None, True, False, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1, 10**100, -(10**100),
        0.0, -0.0, 1.5, float("inf"), float("-inf"), float("nan"), _NAN_WITH_PAYLOAD,
        "", "é", "\ud800", "a\udfffb", b"", b"\x00\xff", 1 + 2j, complex(float("nan"), -0.0),
    ],
)  # fmt: skip
def test_python_scalars_round_trip_with_type_and_bits(value: Any) -> None:
    """ints of any size, floats bit for bit (NaN payload, -0.0), lone surrogates, bytes, complex."""
    assert identical({"v": value}, round_trip({"v": value}))


def test_tuples_and_subclasses_come_back_as_plain_builtins() -> None:
    """Tuples -> lists, OrderedDict -> dict, IntEnum -> int, str/float subclasses -> str/float."""

    class Color(enum.IntEnum):
        RED = 1

    class Text(str):
        pass

    doc = {"t": (1, (2, "x")), "od": OrderedDict(b=1, a=2), "e": Color.RED, "s": Text("x"), "big": 2**70}
    back = round_trip(doc)
    assert identical({"t": [1, [2, "x"]], "od": {"b": 1, "a": 2}, "e": 1, "s": "x", "big": 2**70}, back)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=">i2").reshape(3, 4),
        np.arange(24.0).reshape(2, 3, 4).transpose(2, 0, 1),  # not contiguous
        np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        np.arange(10)[::3],
        np.array(3.5),  # 0-d
        np.zeros((0, 3), dtype="<u4"),
        np.zeros((2, 0, 5), dtype="U3"),
        np.array([True, False]),
        np.array(["a", "hé"], dtype="<U2"),
        np.array([b"ab", b""], dtype="S2"),
        np.array(["2020-01-01T00:00:00.5", "NaT"], dtype="datetime64[ms]"),
        np.array([1, 2], dtype="timedelta64[25s]"),
        np.array([1 + 2j], dtype="<c8"),
        np.array([1.0], dtype=np.longdouble),
        np.array([np.nan, -0.0], dtype="<f2"),
        np.zeros(2, dtype=[("x", "<f4"), ("y", "<i8", (2,))]),
        np.zeros(
            2, dtype={"names": ["x", "y"], "formats": ["<f4", "<u2"], "offsets": [0, 8], "itemsize": 16}
        ),
        np.zeros(1, dtype=[(("title", "n"), "<f8"), ("sub", [("a", "u1")])]),
        np.zeros(3, dtype="V4"),
    ],
    ids=lambda a: f"{a.dtype}-{a.shape}",
)
def test_arrays_keep_dtype_shape_and_bytes_and_come_back_writable(array: np.ndarray) -> None:
    """Any layout, endianness, 0-d/empty, str/bytes/datetime/complex/structured dtypes: identical."""
    back = round_trip({"a": array})["a"]
    assert identical(array, back)
    assert back.flags.writeable


@pytest.mark.parametrize(
    "scalar",
    [
        np.float64(1.5), np.float32(-0.0), np.float16(np.nan), np.int8(-1), np.uint64(2**64 - 1),
        np.bool_(True), np.complex64(1 - 1j), np.str_("hé"), np.str_(""), np.str_("a\x00"),
        np.bytes_(b"x\x00"), np.bytes_(b""), np.datetime64("2020-01-01", "D"), np.timedelta64(5, "ms"),
        np.longdouble(1.25), np.zeros(1, dtype=[("x", "<i4")])[0], np.void(b""),
    ],
    ids=lambda s: str(s.dtype),
)  # fmt: skip
def test_numpy_scalars_keep_their_type_and_bytes(scalar: np.generic) -> None:
    """np.float64 stays np.float64 (not float), np.str_ stays np.str_, structured np.void too."""
    assert identical(scalar, round_trip({"s": scalar})["s"])


def test_object_arrays_are_stored_as_lists_of_their_elements() -> None:
    """Object arrays (no dtype to keep) become nested lists of their elements."""
    array = np.array([["a", 1], [None, 2.5]], dtype=object)
    assert identical([["a", 1], [None, 2.5]], round_trip({"o": array})["o"])
    assert identical([], round_trip({"o": np.array([], dtype=object)})["o"])


@pytest.mark.parametrize("value", [{1, 2}, frozenset(), object(), range(2)])
def test_values_no_document_holds_cannot_be_packed(value: Any) -> None:
    """Sets and arbitrary objects are a TypeError at pack time (the wire decoder never lets them in)."""
    with pytest.raises(TypeError, match="cannot store"):
        pack_document("event", {"v": value})


def test_non_string_keys_round_trip() -> None:
    """The codec itself stores int/float/bool/None/bytes keys too (the wire allows only str)."""
    doc: dict[Any, Any] = {"m": {1: "a", 2.5: "b", False: "c", None: "d", b"k": "e"}}
    assert identical(doc, round_trip(doc))


def test_the_format_is_frozen() -> None:
    """Golden bytes: changing the encoding breaks this test; then bump FORMAT_VERSION and read both."""
    doc = {
        "f": 1.5,
        "i": -2,
        "s": "x",
        "b": True,
        "n": None,
        "t": (1,),
        "v": np.float64(2.0),
        "a": np.arange(2, dtype="<i2"),
    }
    assert FORMAT_VERSION == 1
    assert pack_document("event", doc) == (
        b"\x93\x01\xa5event\x88\xa1f\xcb?\xf8\x00\x00\x00\x00\x00\x00\xa1i\xfe\xa1s\xa1x\xa1b\xc3\xa1n\xc0"
        b"\xa1t\x91\x01\xa1v\xc7\x0c\x02<f8\x00\x00\x00\x00\x00\x00\x00\x00@"
        b"\xa1a\xc7\x11\x01\x01\x02\x00\x00\x00\x00\x00\x00\x00<i2\x00\x00\x00\x01\x00"
    )


# -------------------------------------------------------------- hypothesis

_dtypes = (
    hnp.scalar_dtypes()
    | hnp.unicode_string_dtypes()
    | hnp.byte_string_dtypes()
    | hnp.array_dtypes(subtype_strategy=hnp.scalar_dtypes(), max_size=3)
)
_arrays = hnp.arrays(_dtypes, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))
_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.complex_numbers(),
    st.text(st.characters(codec=None, categories=None), max_size=10),  # lone surrogates included
    st.binary(max_size=10),
    _arrays,
    _arrays.map(lambda a: a.reshape(-1)[0] if a.size else a),  # numpy scalars of every dtype
    hnp.arrays(object, 3, elements=st.one_of(st.none(), st.integers(), st.text(max_size=3))),
)
documents = st.dictionaries(
    st.text(max_size=8),
    st.recursive(
        _leaves,
        lambda children: (
            st.lists(children, max_size=3)
            | st.tuples(children)
            | st.dictionaries(st.text(max_size=5), children, max_size=3)
        ),
        max_leaves=12,
    ),
    max_size=6,
)


@settings(max_examples=examples(300), deadline=None)
@given(documents, st.sampled_from(["start", "event", "descriptor"]))
def test_generated_documents_round_trip_exactly(doc: dict[str, Any], name: str) -> None:
    """Any mix of Python values, numpy arrays (any dtype/shape) and scalars comes back identical."""
    assert identical(stored(doc), round_trip(doc, name))


@settings(max_examples=examples(500), deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_unpack_to_a_document_or_a_decode_error(payload: bytes) -> None:
    """Whatever the bytes, unpack_document raises DecodeError (spool-corrupt/spool-version) or returns."""
    try:
        name, doc = unpack_document(payload)
    except DecodeError as error:
        assert error.reason in {"spool-corrupt", "spool-version"}
    else:
        assert type(name) is str and type(doc) is dict


@settings(max_examples=examples(300), deadline=None)
@given(documents, st.data())
def test_damaged_payloads_raise_only_decode_error(doc: dict[str, Any], data: st.DataObject) -> None:
    """Real payloads cut short or with flipped bits: a document or a DecodeError, nothing else."""
    payload = bytearray(pack_document("event", doc))
    if data.draw(st.booleans()):
        del payload[data.draw(st.integers(0, len(payload) - 1)) :]
    else:
        where = data.draw(st.integers(0, len(payload) - 1))
        payload[where] ^= 1 << data.draw(st.integers(0, 7))
    try:
        unpack_document(bytes(payload))
    except DecodeError as error:
        assert error.reason in {"spool-corrupt", "spool-version"}


_OBJECT_ARRAY = b"\x01\x05" + b"\x00" * 7 + b"|O\x00" + b"\x00" * 40


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (msgpack.packb([2, "event", {}]), "spool-version"),
        (msgpack.packb(["1", "event", {}]), "spool-version"),
        (msgpack.packb([1, 5, {}]), "spool-corrupt"),
        (msgpack.packb([1, "event", []]), "spool-corrupt"),
        (msgpack.packb({"name": "event"}), "spool-corrupt"),
        (msgpack.packb([1, "event", {"x": msgpack.ExtType(99, b"")}]), "spool-corrupt"),
        (msgpack.packb([1, "event", {"x": msgpack.ExtType(1, _OBJECT_ARRAY)}]), "spool-corrupt"),
        (b"", "spool-corrupt"),
    ],
    ids=["version-2", "version-str", "name-int", "doc-list", "map", "ext-99", "object-dtype", "empty"],
)  # fmt: skip
def test_well_formed_msgpack_that_is_not_a_record_is_refused(payload: bytes, reason: str) -> None:
    """Another format version is spool-version; any other shape, unknown ext or object dtype spool-corrupt."""
    with pytest.raises(DecodeError) as caught:
        unpack_document(payload)
    assert caught.value.reason == reason
    assert len(caught.value.detail) <= 200
