"""wire under attack (issue 12, classes 1, 4, 5) and structure-aware fuzzing of the decoder.

The hostile pickles are built the way numpy itself pickles (``__reduce__``
returning numpy's own callables), with states numpy would never write: a
dtype field beyond the item size, a void scalar without data, an object
array with a zero and a huge dimension, BUILD on an allowed global. The
container bombs are what msgpack, JSON and pickle encode most densely.

The hypothesis tests mutate real messages: documents of a real RunEngine
(count, scan, an image detector) pickled by bluesky's own ``Publisher``
(``pickle.dumps``, protocol 4 by default, and 2 and 5), packed by
msgpack_numpy and JSON; pickles are mutated opcode by opcode (dropped,
doubled, swapped, arguments rewritten, allowed globals, BUILD, REDUCE, memo
and container opcodes inserted). Each property: `decode_message` returns a
``(name, dict)`` or raises `DecodeError`, nothing else, and its peak traced
memory stays under `wire.budget_for(len(payload))`; what decodes, given to
`validate_document`, raises nothing but `RejectedMessage`, with a short
ASCII detail.
"""

from __future__ import annotations

import functools
import json
import pickle
import pickletools
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import msgpack_numpy
import numpy as np
import pytest
from bluesky import plans as bp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ophyd.sim import hw

from tests.support.framing import SERIALIZERS, CapturingPublisher, raw_frame
from tests.support.hostile_pickles import (
    OBJECT_STATE,
    PLAIN_STATE,
    FakeDtype,
    FakeScalar,
    build_on_global_pickle,
    object_array,
    outside_field_dtype,
    void_scalar_without_data,
)
from tests.support.strength import examples
from tiled_writer_sidecar.documents import wire
from tiled_writer_sidecar.documents.validation import validate_document
from tiled_writer_sidecar.documents.wire import REASONS, budget_for, decode_message
from tiled_writer_sidecar.errors import DecodeError, RejectedMessage
from tiled_writer_sidecar.testing import Acquisition


def class1_start(offset: int) -> dict[str, Any]:
    """A start document whose `time` is a void scalar of `outside_field_dtype` (schema: not a number)."""
    return {"uid": "c1", "time": FakeScalar(outside_field_dtype(offset), b"\x00" * 8)}


def reject(payload: bytes, name: str = "start") -> DecodeError:
    with pytest.raises(DecodeError) as caught:
        decode_message([raw_frame(name, payload)])
    assert caught.value.reason in REASONS
    assert caught.value.detail.isascii() and len(caught.value.detail) <= 200
    return caught.value


def peak_of(call: Callable[[], Any]) -> int:
    """Peak traced memory (bytes) while `call` runs."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        try:
            call()
        except DecodeError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ----------------------------------------------------------- class 1: dtypes


@pytest.mark.parametrize("offset", [8, 64, 2**20, 2**28, 2**40])
def test_a_dtype_field_outside_its_item_size_is_refused_before_any_numpy_object_exists(offset: int) -> None:
    """Class 1: BUILD with a field offset beyond the item size (numpy read past its buffer when
    the message was formatted: heap bytes in the log, SIGSEGV for a large offset): garbage."""
    error = reject(pickle.dumps(class1_start(offset), protocol=4))
    assert error.reason == "garbage"
    assert "outside its item size" in error.detail


def test_dtype_states_numpy_never_writes_are_refused() -> None:
    """Object fields, unknown typecodes and units, nested depth, wrong sizes: refused, never built."""
    obj = FakeDtype("O8", OBJECT_STATE)
    bad = [
        FakeDtype("V8", (3, "|", None, ("x",), {"x": (obj, 0)}, 8, 1, 16)),  # Python objects in a struct
        FakeDtype("f8; import os", PLAIN_STATE),
        FakeDtype("M8", (4, "<", None, None, None, -1, -1, 0, (None, (b"lightyears", 1, 1, 1)))),
        FakeDtype("f8", (3, "<", None, None, None, 16, -1, 0)),  # item size 16 for a float64
        FakeDtype("V16", (3, "|", (FakeDtype("f8", PLAIN_STATE), (3,)), None, None, 16, 8, 0)),
        FakeDtype("f8", (9, "<", None, None, None, -1, -1, 0)),
    ]
    for dtype in bad:
        reject(pickle.dumps({"x": FakeScalar(dtype, b"\x00" * 8)}, protocol=4))


def test_validation_details_of_numpy_values_are_short_printable_ascii() -> None:
    """A start whose time is a (sound) structured scalar: schema error, detail ASCII and <= 200 chars."""
    value = np.zeros((), dtype=[("\u00e9" * 50, "<f8"), ("y", "S300")])[()]
    _, doc = decode_message([raw_frame("start", pickle.dumps({"uid": "u", "time": value}))])
    with pytest.raises(RejectedMessage) as caught:
        validate_document("start", doc)
    assert caught.value.detail.isascii() and caught.value.detail.isprintable()
    assert len(caught.value.detail) <= 220


# ------------------------------------------------------ class 4: memory bombs


def test_a_void_scalar_without_data_is_refused_without_allocating_it() -> None:
    """Class 4: numpy scalar of a 1 GiB void dtype and no data (~100 bytes): refused, nothing allocated."""
    payload = pickle.dumps({"uid": "u", "time": 1.0, "x": void_scalar_without_data(2**30)}, protocol=4)
    assert len(payload) < 200
    assert peak_of(lambda: reject(payload)) < 2**20


@pytest.mark.parametrize("shape", [(2**40, 0), (0, 2**40), (2**20, 2**20, 0)])
def test_an_object_array_with_a_zero_dimension_costs_its_other_dimensions(shape: tuple[int, ...]) -> None:
    """Class 4: an empty object array of shape (2**40, 0) would make 2**40 lists in tolist(): too-complex."""
    assert reject(pickle.dumps({"x": object_array(shape)}, protocol=4)).reason == "too-complex"


def test_sound_empty_and_zero_dimension_arrays_still_decode() -> None:
    """Arrays with a zero dimension of modest size (and their dtypes) come back as numpy made them."""
    doc = {"a": np.zeros((0, 3)), "b": np.zeros((5, 0), dtype=object), "c": np.zeros(0, dtype="V0")}
    _, back = decode_message([raw_frame("event", pickle.dumps(doc))])
    for key, value in doc.items():
        assert back[key].shape == value.shape and back[key].dtype == value.dtype


def container_bombs(size: int) -> dict[str, bytes]:
    """Payloads of about `size` bytes made of empty containers: each byte is a 56-64 byte object."""
    count = size // 2
    pickled = b"\x80\x04}\x8c\x01x]" + b"(" + b"]" * count + b"es."
    appends = b"\x80\x04}\x8c\x01x]" + b"]a" * (count // 2) + b"s."
    return {
        "msgpack": b"\x81\xa1x\xdd" + struct.pack(">I", count) + b"\x90" * count,
        "msgpack-maps": b"\x81\xa1x\xdd" + struct.pack(">I", count) + b"\x80" * count,
        "json": b'{"x": [' + b"[]," * (count // 3) + b"[]]}",
        "pickle": pickled,
        "pickle-appends": appends,
        "pickle-tuples": b"\x80\x04}\x8c\x01xN" + b"\x85" * count + b"s.",
    }


@pytest.mark.parametrize("kind", sorted(container_bombs(10)))
def test_container_bombs_are_refused_before_they_are_built(kind: str) -> None:
    """Class 4: 16 MiB of empty lists/dicts (msgpack, JSON, pickle EMPTY_LIST/APPEND, TUPLE1 chains)
    took the receiver to 2.4 GiB; now too-complex, and peak memory stays under the budget."""
    payload = container_bombs(16 * 2**20)[kind]
    budget = budget_for(len(payload))
    peak = peak_of(lambda: reject(payload))
    with pytest.raises(DecodeError) as caught:
        decode_message([raw_frame("event", payload)])
    assert caught.value.reason == "too-complex"
    assert peak < budget, (peak, budget)
    assert peak < 4 * len(payload) + 2**20  # refused before decoding, not after


def test_large_legitimate_payloads_stay_within_the_budget() -> None:
    """A 16 MiB image, 1 MiB of floats and 200,000 short strings decode in every format."""
    doc = {"img": np.arange(2**21, dtype="f8"), "floats": [float(i) for i in range(2**17)]}
    texts = {"names": [f"det{i}" for i in range(200_000)]}
    payloads = [pickle.dumps(doc), pickle.dumps(texts, protocol=2), msgpack_numpy.packb(doc)]
    payloads.append(json.dumps(texts).encode())
    for payload in payloads:
        name, back = decode_message([raw_frame("event", payload)])
        assert name == "event" and set(back) in ({"img", "floats"}, {"names"})


# ------------------------------------------------- class 5: BUILD on globals


def test_build_on_an_allowed_global_is_refused_and_changes_nothing() -> None:
    """Class 5: BUILD on what find_class returned (setattr __defaults__) is pickle-forbidden-global,
    and the decoder's functions keep their state for the next message."""
    before = {name: getattr(wire, name).__defaults__ for name in ("_scalar", "_codecs_encode", "_frombuffer")}
    assert reject(build_on_global_pickle({"uid": "c5", "time": 1.0})).reason == "pickle-forbidden-global"
    after = {name: getattr(wire, name).__defaults__ for name in before}
    assert after == before
    assert decode_message([raw_frame("start", pickle.dumps({"x": np.float64(2.5)}))])[1] == {"x": 2.5}


@pytest.mark.parametrize(
    "target", ["numpy ndarray", "numpy dtype", "collections OrderedDict", "_codecs encode"]
)
def test_no_object_a_pickle_can_reach_accepts_build(target: str) -> None:
    """Every global find_class hands out refuses BUILD (dict state and slot state alike)."""
    module, name = target.split()
    glob = b"\x8c" + bytes([len(module)]) + module.encode() + b"\x8c" + bytes([len(name)]) + name.encode()
    for state in (b"}\x8c\x01a\x8c\x01bs", b"N}\x8c\x01a\x8c\x01bs\x86"):
        payload = b"\x80\x04" + glob + b"\x93" + state + b"b0}."
        assert reject(payload).reason == "pickle-forbidden-global"


def test_a_pickle_gets_fresh_objects_every_time() -> None:
    """Two loads of the same global: distinct objects, bound to their own load."""
    loads = [wire._Load(2**30) for _ in range(2)]
    found = [wire._RestrictedUnpickler(b".", load).find_class("numpy", "dtype") for load in loads]
    assert found[0] is not found[1]
    assert not hasattr(found[0], "__dict__")


# ------------------------------------------------------------- real messages


@functools.cache
def real_messages() -> dict[str, tuple[bytes, ...]]:
    """A real RunEngine's count, scan and image runs, as each serializer's Publisher sent them."""
    devices = hw()
    publishers = {label: CapturingPublisher(serializer) for label, serializer in SERIALIZERS.items()}
    try:
        with Acquisition(None) as acquisition:  # a RunEngine of its own, no proxy
            for publisher in publishers.values():
                acquisition.subscribe(publisher)
            acquisition.run(bp.count([devices.det], num=2))
            acquisition.run(bp.scan([devices.det1, devices.det2], devices.motor, -1, 1, 3))
            acquisition.run(bp.count([devices.direct_img, devices.det], num=2))
    finally:
        for publisher in publishers.values():
            publisher.close()
    return {label: tuple(publisher.sent) for label, publisher in publishers.items()}


@pytest.fixture(scope="module", autouse=True)
def _acquired_before_any_strategy_runs() -> None:
    """The RunEngine runs once, before hypothesis (it uses `random`, which strategies must not)."""
    real_messages()


def check_message(data: bytes) -> None:
    """The properties: a document or a DecodeError, memory under the budget, validation rejects only."""
    payload = data.split(b" ", 2)[-1]
    result: list[tuple[str, dict[str, Any]]] = []

    def decode() -> None:
        try:
            result.append(decode_message([data]))
        except DecodeError as error:
            assert error.reason in REASONS
            assert error.detail.isascii() and len(error.detail) <= 200

    peak = peak_of(decode)
    assert peak <= budget_for(len(payload)), (peak, budget_for(len(payload)))
    if result:
        name, doc = result[0]
        assert type(name) is str and type(doc) is dict
        try:
            validate_document(name, doc)
        except RejectedMessage as error:
            assert error.detail.isascii() and len(error.detail) <= 300


def opcodes(payload: bytes) -> list[tuple[int, int]]:
    """(start, end) of each opcode of a pickle (real pickles always parse)."""
    ops = list(pickletools.genops(payload))
    starts = [pos for _, _, pos in ops]
    return list(zip(starts, [*starts[1:], len(payload)], strict=True))


SNIPPETS = [
    b"b",  # BUILD
    b"R",  # REDUCE
    b"0",  # POP
    b"2",  # DUP
    b"\x94",  # MEMOIZE
    b"h\x00",  # BINGET 0
    b"r\xff\xff\xff\x7f",  # LONG_BINPUT 2**31
    b"]",  # EMPTY_LIST
    b"}",  # EMPTY_DICT
    b"(",  # MARK
    b"e",  # APPENDS
    b"u",  # SETITEMS
    b"\x85",  # TUPLE1
    b"N",
    b"\x95\xff\xff\xff\xff\x00\x00\x00\x00",  # FRAME of 4 GiB
    b"B\xff\xff\xff\x7f",  # BINBYTES of 2 GiB
    b"\x8c\x05numpy\x8c\x05dtype\x93",
    b"\x8c\x05numpy\x8c\x07ndarray\x93",
    b"\x8c\x16numpy._core.multiarray\x8c\x06scalar\x93",
    b"\x8c\x16numpy._core.multiarray\x8c\x0c_reconstruct\x93",
    b"\x8c\x13numpy._core.numeric\x8c\x0b_frombuffer\x93",
    b"\x8c\x06_codecs\x8c\x06encode\x93",
    b"\x8c\x08builtins\x8c\x04eval\x93",
    b"\x8c\x02V9\x88\x88\x87",  # dtype args ("V9", True, True)
    b"J\xff\xff\xff\x7f",  # BININT 2**31 - 1
    b"K\x03\x8c\x01|NNNJ\x00\x00\x00@K\x01K\x00t",  # a dtype state of a 1 GiB item
]


@st.composite
def mutated_pickles(draw: st.DrawFn) -> bytes:
    """A real Publisher pickle with 1-4 opcode-level mutations."""
    label = draw(st.sampled_from(["pickle", "pickle2", "pickle5"]))
    original = draw(st.sampled_from(real_messages()[label]))
    payload = original.split(b" ", 2)[2]
    envelope = original[: len(original) - len(payload)]
    data = bytearray(payload)
    for _ in range(draw(st.integers(1, 4))):
        ops = opcodes(bytes(data)) if _ == 0 else [(i, i + 1) for i in range(len(data))]
        if not ops:
            break
        start, end = draw(st.sampled_from(ops))
        action = draw(st.sampled_from(["drop", "double", "swap", "argument", "insert", "cut", "flip"]))
        if action == "drop":
            del data[start:end]
        elif action == "double":
            data[start:start] = data[start:end]
        elif action == "swap":
            other, other_end = draw(st.sampled_from(ops))
            if other_end <= start:
                data[other:end] = data[start:end] + data[other_end:start] + data[other:other_end]
        elif action == "argument" and end - start > 1:
            data[start + 1 : end] = draw(st.binary(min_size=end - start - 1, max_size=end - start - 1))
        elif action == "insert":
            data[start:start] = draw(st.sampled_from(SNIPPETS))
        elif action == "cut":
            del data[start:]
        elif start < len(data):
            data[start] ^= 1 << draw(st.integers(0, 7))
    return envelope + bytes(data)


@settings(max_examples=examples(700), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_pickles())
def test_mutated_publisher_pickles_only_raise_decode_error_within_the_budget(data: bytes) -> None:
    """Opcode-level mutations of real Publisher pickles: a document or a DecodeError, memory under budget,
    and validation of what decodes raises only RejectedMessage."""
    check_message(data)


def _msgpack_mutations(data: st.DataObject, payload: bytes) -> bytes:
    mutated = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, max(len(mutated) - 1, 0)))
        action = data.draw(st.sampled_from(["flip", "header", "cut", "insert"]))
        if action == "flip" and mutated:
            mutated[where] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "header":  # a container/str/bin header claiming a huge length
            mutated[where:where] = data.draw(
                st.sampled_from([b"\xdd\xff\xff\xff\xff", b"\xdf\x7f\xff\xff\xff", b"\xdb\xff\xff\xff\xff"])
            )
        elif action == "cut":
            del mutated[where:]
        else:
            mutated[where:where] = data.draw(st.binary(min_size=1, max_size=6))
    return bytes(mutated)


@settings(max_examples=examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["msgpack_numpy", "json"]), st.data())
def test_mutated_msgpack_and_json_messages_only_raise_decode_error_within_the_budget(
    label: str, data: st.DataObject
) -> None:
    """msgpack_numpy and JSON Publisher messages mutated (flips, huge headers, cuts, inserts): same
    properties as for pickles."""
    original = data.draw(st.sampled_from(real_messages()[label]))
    payload = original.split(b" ", 2)[2]
    check_message(original[: len(original) - len(payload)] + _msgpack_mutations(data, payload))


@st.composite
def msgpack_trees(draw: st.DrawFn) -> bytes:
    """msgpack documents of nested containers, numpy maps with any dtype/shape/data claims."""
    nd = st.fixed_dictionaries(
        {
            "nd": st.booleans(),
            "type": st.sampled_from(["<f8", "|V1000000000", "|O", "<U3", [["x", "<f4"]], "bad"]),
            "kind": st.sampled_from([b"", b"V", b"O"]),
            "shape": st.lists(st.sampled_from([0, 1, 3, 2**40]), max_size=3),
            "data": st.binary(max_size=24),
        }
    )
    leaf = (
        st.none()
        | st.integers(-(2**63), 2**63 - 1)
        | st.floats()
        | st.text(max_size=5)
        | st.binary(max_size=5)
        | nd
    )
    tree = st.recursive(
        leaf,
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids, max_size=4),
        max_leaves=8,
    )
    doc = draw(st.dictionaries(st.text(max_size=6), tree, max_size=5))
    return msgpack.packb(doc, use_bin_type=True)  # type: ignore[no-any-return]


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgpack_trees())
def test_generated_msgpack_numpy_maps_only_raise_decode_error_within_the_budget(payload: bytes) -> None:
    """msgpack_numpy array/scalar maps claiming any dtype, shape and data: document or DecodeError."""
    check_message(raw_frame("event", payload))


def test_every_real_message_still_decodes_and_validates() -> None:
    """The unmutated real messages of every serializer decode and pass event-model's schemas."""
    for label, sent in real_messages().items():
        for data in sent:
            name, doc = decode_message([data])
            validate_document(name, doc)
        assert len(sent) > 10, label


@pytest.fixture(autouse=True)
def _no_tracemalloc_left() -> Iterator[None]:
    yield
    assert not tracemalloc.is_tracing()


# --------------------------------------------------- deep nesting (issue 20)

_KEY = b"X\x01\x00\x00\x00k"  # BINUNICODE "k"


def deep_pickles(depth: int) -> dict[str, bytes]:
    """A start whose value at ``k`` nests `depth` deep, in every container a pickle can make.

    Each one's innermost object is None (or a dict key): the C unpickler hashes
    a tuple key recursively, without a guard (200,000 TUPLE1: SIGSEGV).
    """
    state8 = b"(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffN"
    return {
        "tuple1-as-key": b"\x80\x02}N" + b"\x85" * depth + b"Ns.",
        "tuple2": b"\x80\x02}" + _KEY + b"N" + b"N\x86" * depth + b"s.",
        "tuple3": b"\x80\x02}" + _KEY + b"N" + b"NN\x87" * depth + b"s.",
        "tuple1-memoized": b"\x80\x04}N" + b"\x85\x94" * depth + b"Ns.",
        "tuple1-dup": b"\x80\x02}N" + b"\x852\x85\x86" * depth + b"Ns.",
        "mark-tuple-as-key": b"\x80\x02}" + b"(" * depth + b"N" + b"t" * depth + b"Ns.",
        "mark-list": b"\x80\x02}" + _KEY + b"(" * depth + b"l" * depth + b"s.",
        "mark-dict": b"\x80\x02}" + _KEY + (b"(" + _KEY) * depth + b"(d" + b"d" * depth + b"s.",
        "append": b"\x80\x02}" + _KEY + b"]" + b"]" * depth + b"a" * depth + b"s.",
        "appends": b"\x80\x02}" + _KEY + b"](" * depth + b"]" + b"e" * depth + b"s.",
        "setitem": b"\x80\x02}" + _KEY + b"}" + (_KEY + b"}") * depth + b"s" * depth + b"s.",
        "setitems": b"\x80\x02}" + _KEY + b"}" + (b"(" + _KEY + b"}") * depth + b"u" * depth + b"s.",
        "dtype-state": b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00f8\x89\x88\x87R"
        + state8
        + b"\x85" * depth
        + b"tb}"
        + _KEY
        + b"(ds.",
        "reduce-args": b"\x80\x02}"
        + _KEY
        + b"ccollections\nOrderedDict\n"
        + b"N"
        + b"\x85" * depth
        + b"\x85Rs.",
    }


def deep_msgpack_and_json(depth: int) -> dict[str, bytes]:
    return {
        "msgpack-arrays": b"\x81\xa1k" + b"\x91" * depth + b"\xc0",
        "msgpack-maps": b"\x81\xa1k" + b"\x81\xa1k" * depth + b"\xc0",
        "json-arrays": b'{"k":' + b"[" * depth + b"]" * depth + b"}",
        "json-objects": b'{"k":' + b'{"k":' * depth + b"1" + b"}" * depth + b"}",
    }


def test_deep_nesting_of_every_container_kind_is_refused_before_it_is_built() -> None:
    """Issue 20: deep nesting of every container (TUPLE1-3, MARK groups, APPEND(S), SETITEM(S),
    memo, DUP, a dtype state, reduce arguments; msgpack, JSON) is too-complex, refused by the scan
    before the unpickler builds (and hashes) it; 150 levels pass the scan and the walk refuses them.
    20,000 levels here, 100 times the scan's limit (the 200,000-deep tuples that crashed the unpickler are
    decoded in a child process by tests/e2e/test_hostile_round2.py)."""
    for depth in (20_000, 150):
        for kind, payload in {**deep_pickles(depth), **deep_msgpack_and_json(depth)}.items():
            with pytest.raises(DecodeError) as caught:
                decode_message([raw_frame("start", payload)])
            if depth > 1000:  # (150 levels: the walk refuses them, or a type check comes first)
                assert caught.value.reason == "too-complex", (kind, depth, caught.value)
            if depth > 1000 and kind.startswith(("tuple", "mark", "append", "set", "dtype", "reduce")):
                assert "pickle nests deeper than" in caught.value.detail, kind


def test_documents_nested_to_the_walks_limit_still_decode() -> None:
    """A start nested 100 deep (the walk's limit), with an array and a structured dtype at the bottom."""
    inner: Any = {"a": np.zeros(3, dtype=[("x", "f8"), ("y", [("z", "i4", (2,))])]), "t": (1, 2)}
    for level in range(98):
        inner = [inner] if level % 2 else {"k": inner}
    doc = {"uid": "u", "time": 1.0, "k": inner}
    for protocol in (2, 4, 5):
        name, back = decode_message([raw_frame("start", pickle.dumps(doc, protocol=protocol))])
        assert name == "start" and back["uid"] == "u"


@st.composite
def nested_pickles(draw: st.DrawFn) -> bytes:
    """A start whose ``k`` nests 1-400 deep, each level a container kind of its own."""
    depth = draw(st.integers(1, 400))
    kinds = draw(
        st.lists(
            st.sampled_from(["t1", "t2", "mt", "ml", "md", "ap", "si", "memo"]),
            min_size=depth,
            max_size=depth,
        )
    )
    body = b"N"
    for kind in kinds:
        body = {
            "t1": body + b"\x85",
            "t2": b"N" + body + b"\x86",
            "mt": b"(" + body + b"t",
            "ml": b"(" + body + b"l",
            "md": b"(" + _KEY + body + b"d",
            "ap": b"]" + body + b"a",
            "si": b"}" + _KEY + body + b"s",
            "memo": body + b"\x94",
        }[kind]
    return raw_frame("start", b"\x80\x04}" + _KEY + body + b"s.")


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nested_pickles())
def test_generated_deep_pickles_decode_within_the_limit_or_are_too_complex(data: bytes) -> None:
    """Any mix of container kinds: a document (nested at most 100 deep) or too-complex, nothing else."""
    try:
        decode_message([data])
    except DecodeError as error:
        assert error.reason in ("too-complex", "unsupported-type", "garbage"), error
    check_message(data)
