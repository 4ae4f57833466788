"""wire: real Publisher messages decode exactly; hostile or broken bytes only ever raise DecodeError."""

from __future__ import annotations

import builtins
import json
import math
import os
import pickle
import pickletools
import struct
import subprocess
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import msgpack
import msgpack_numpy
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.support.framing import CapturingPublisher, json_serializer, jsonable
from tests.support.run_engine import Document, simulated_runs
from tests.support.strength import examples
from tiled_writer_sidecar.documents import wire
from tiled_writer_sidecar.documents.wire import (
    DOCUMENT_NAMES,
    REASONS,
    SERIALIZERS,
    decode_message,
)
from tiled_writer_sidecar.errors import DecodeError
from tiled_writer_sidecar.spool.codec import pack_document

Serializer = Callable[[Any], bytes]

# ------------------------------------------------------------------ helpers


def same(a: Any, b: Any) -> bool:
    """Deep equality that also compares numpy dtypes, shapes and bits, and container types."""
    if isinstance(a, np.ndarray):
        if not (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        return same(a.tolist(), b.tolist()) if a.dtype.hasobject else a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return type(a) is type(b) and a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, dict):  # OrderedDict may come back as dict
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float):
        return type(b) is float and (a == b or (math.isnan(a) and math.isnan(b)))
    return type(a) is type(b) and a == b


def _plain_msgpack(doc: Any) -> bytes:
    return msgpack.packb(jsonable(doc))  # type: ignore[no-any-return]


#: label -> (serializer, prefix) of the Publishers subscribed to the one real acquisition.
PUBLISHERS: dict[str, tuple[Serializer, bytes]] = {
    "pickle": (pickle.dumps, b""),
    **{f"pickle{p}": ((lambda d, p=p: pickle.dumps(d, protocol=p)), b"") for p in range(6)},
    "msgpack_numpy": (msgpack_numpy.packb, b""),
    "msgpack": (_plain_msgpack, b""),
    "json": (json_serializer, b""),
    "pickle-BL1": (pickle.dumps, b"BL1"),
}


class Acquired:
    """What one real acquisition emitted: the documents, and each Publisher's messages."""

    def __init__(self, documents: list[Document], messages: dict[str, list[bytes]]) -> None:
        self.documents = documents
        self.messages = messages


@pytest.fixture(scope="module")
def acquired(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Acquired]:
    """count, scan, an array detector (image + int32 waveform) and a resource/datum detector, once."""
    publishers = {label: CapturingPublisher(*options) for label, options in PUBLISHERS.items()}
    try:
        with simulated_runs(tmp_path_factory.mktemp("sim"), *publishers.values()) as documents:
            yield Acquired(documents, {label: p.sent for label, p in publishers.items()})
    finally:
        for publisher in publishers.values():
            publisher.close()


def _payload(message: bytes) -> bytes:
    return message.split(b" ", 2)[2]


def _reject(frames: list[bytes], **options: Any) -> DecodeError:
    with pytest.raises(DecodeError) as caught:
        decode_message(frames, **options)
    assert caught.value.reason in REASONS
    return caught.value


# ------------------------------------------------- real documents, every format


@pytest.mark.parametrize("label", ["pickle", *(f"pickle{p}" for p in range(6))])
def test_publisher_pickles_of_real_runs_decode_to_what_the_run_engine_emitted(
    acquired: Acquired, label: str
) -> None:
    """count/scan/array/resource runs, pickled by Publisher with any protocol, decode exactly."""
    messages = acquired.messages[label]
    assert len(messages) == len(acquired.documents)
    for message, (name, emitted) in zip(messages, acquired.documents, strict=True):
        assert decode_message([message], serializer="pickle") == (name, ANY)
        decoded_name, doc = decode_message([message])
        assert decoded_name == name
        assert same(emitted, doc)
    names = {name for name, _ in acquired.documents}
    assert {"start", "descriptor", "event", "stop", "resource", "datum"} <= names
    events = [doc for name, doc in acquired.documents if name == "event"]
    assert any(isinstance(e["data"].get("img"), np.ndarray) for e in events)
    assert any(isinstance(e["data"].get("waveform"), np.ndarray) for e in events)


@pytest.mark.parametrize(
    ("label", "reference"),
    [("msgpack_numpy", msgpack_numpy.unpackb), ("msgpack", msgpack.unpackb), ("json", json.loads)],
)
@pytest.mark.parametrize("mode", ["auto", "explicit"])
def test_msgpack_and_json_publishers_decode_like_their_own_loaders(
    acquired: Acquired, label: str, reference: Callable[[bytes], Any], mode: str
) -> None:
    """Every real document decodes to exactly what msgpack_numpy/msgpack/json.loads return."""
    serializer = "auto" if mode == "auto" else label.split("_")[0]
    for message, (name, _) in zip(acquired.messages[label], acquired.documents, strict=True):
        assert decode_message([message], serializer=serializer)[0] == name
        assert same(reference(_payload(message)), decode_message([message], serializer=serializer)[1])


def test_msgpack_numpy_arrays_of_real_events_keep_dtype_shape_and_values(acquired: Acquired) -> None:
    """The image (float64 10x10) and the int32 2x3 waveform come back as equal numpy arrays."""
    pairs = zip(acquired.messages["msgpack_numpy"], acquired.documents, strict=True)
    checked = 0
    for message, (name, emitted) in pairs:
        if name != "event":
            continue
        doc = decode_message([message])[1]
        for key, value in emitted["data"].items():
            if isinstance(value, np.ndarray):
                assert same(value, doc["data"][key])
                checked += 1
    assert checked >= 4


def test_prefix_matches_exactly_and_an_empty_prefix_accepts_all_like_remote_dispatcher(
    acquired: Acquired,
) -> None:
    """prefix b"BL1" accepts BL1 only; the default b"" accepts any sender (RemoteDispatcher's rule)."""
    message = acquired.messages["pickle-BL1"][0]
    assert decode_message([message], prefix=b"BL1")[0] == "start"
    assert decode_message([message])[0] == "start"
    assert _reject([message], prefix=b"BL2").reason == "prefix-mismatch"
    assert _reject([acquired.messages["pickle"][0]], prefix=b"BL1").reason == "prefix-mismatch"


# ----------------------------------------------------------- pickle is safe

SIDE_EFFECTS: list[Callable[[Path], tuple[Any, tuple[Any, ...]]]] = [
    lambda marker: (os.system, (f"touch {marker}",)),
    lambda marker: (builtins.open, (str(marker), "w")),
    lambda marker: (builtins.eval, (f"open({str(marker)!r}, 'w')",)),
    lambda marker: (builtins.exec, (f"open({str(marker)!r}, 'w')",)),
    lambda marker: (subprocess.Popen, (["touch", str(marker)],)),
    lambda marker: (np.save, (str(marker), np.zeros(1))),
    lambda marker: (Path.touch, (marker,)),
]


class Evil:
    def __init__(self, reduce: tuple[Any, tuple[Any, ...]]) -> None:
        self.reduce = reduce

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.reduce


@pytest.mark.parametrize(
    "effect", SIDE_EFFECTS, ids=["os.system", "open", "eval", "exec", "Popen", "np.save", "touch"]
)
@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("nested", [False, True], ids=["top", "inside-event-data"])
def test_pickles_calling_anything_else_are_refused_before_any_side_effect(
    tmp_path: Path, effect: Callable[[Path], Any], protocol: int, nested: bool
) -> None:
    """os.system, open, eval, exec, Popen, np.save...: pickle-forbidden-global, and the file never appears."""
    marker = tmp_path / "pwned"
    evil: Any = Evil(effect(marker))
    if nested:
        evil = {"uid": "u", "time": 1.0, "data": {"det": evil}, "timestamps": {"det": 1.0}, "seq_num": 1}
    error = _reject([b" event " + pickle.dumps(evil, protocol=protocol)], serializer="pickle")
    assert error.reason == "pickle-forbidden-global"
    assert not marker.exists()
    assert not (tmp_path / "pwned.npy").exists()


def _stack_global(module: str, name: str) -> bytes:
    def text(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()

    return text(module) + text(name) + b"\x93"


@pytest.mark.parametrize(
    ("program", "reason"),
    [
        # numpy's _reconstruct asked for another class than ndarray
        (
            _stack_global("numpy._core.multiarray", "_reconstruct")
            + _stack_global("numpy", "dtype")
            + b"K\x00\x85C\x01b\x87R.",
            "pickle-forbidden-global",
        ),
        # _codecs.encode with a codec other than latin-1
        (_stack_global("_codecs", "encode") + b"\x8c\x03abc\x8c\x05rot13\x86R.", "pickle-forbidden-global"),
        # the ndarray token is not callable: no 10**12-element allocation
        (_stack_global("numpy", "ndarray") + b"\x8a\x06\x00\x10\xa5\xd4\xe8\x00\x85\x85R.", "garbage"),
        # memo bombs: LONG_BINPUT / PUT with huge indices (CPython would allocate index * 16 bytes)
        (b"Nr" + struct.pack("<I", 4_000_000_000) + b".", "too-complex"),
        (b"Np99999999999\n.", "too-complex"),
        (b"N", "truncated"),
        (b"\xff.", "garbage"),
    ],
    ids=["reconstruct-dtype", "codecs-rot13", "ndarray-call", "long-binput", "put", "no-stop", "bad-opcode"],
)
def test_hand_made_pickles_abusing_allowed_globals_or_the_memo_are_refused(
    program: bytes, reason: str
) -> None:
    """Allowed numpy/codecs globals only rebuild arrays and latin-1 bytes; memo indices stay bounded."""
    assert _reject([b" event \x80\x04" + program]).reason == reason


def test_shared_references_cannot_expand_into_a_billion_laughs() -> None:
    """A 1 KiB pickle whose structure expands to 2**40 strings is too-complex (the codec would hang)."""
    bomb: Any = ["x" * 100]
    for _ in range(40):
        bomb = [bomb, bomb]
    payload = pickle.dumps({"data": bomb})
    assert len(payload) < 2000
    assert _reject([b" event " + payload]).reason == "too-complex"


def test_nesting_deeper_than_100_is_too_complex_in_every_format() -> None:
    """Deep nesting is refused before the spool codec (or recursion) could choke on it."""
    deep: Any = 1
    for _ in range(150):
        deep = [deep]
    for payload in (pickle.dumps({"a": deep}), msgpack.packb({"a": deep}), json.dumps({"a": deep}).encode()):
        assert _reject([b" event " + payload]).reason == "too-complex"
    assert _reject([b" event " + b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"]).reason == "too-complex"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({1, 2}, "unsupported-type"),
        (frozenset({1}), "unsupported-type"),
        (bytearray(b"ab"), "unsupported-type"),
        ({1: "int key"}, "unsupported-type"),
        (np.array([object()], dtype=object), "pickle-forbidden-global"),
        (range(3), "pickle-forbidden-global"),
    ],
    ids=["set", "frozenset", "bytearray", "int-key", "object", "range"],
)
def test_values_a_document_cannot_hold_are_refused(value: Any, reason: str) -> None:
    """Only what the spool codec stores gets through (sets, bytearrays, int keys, classes: no)."""
    assert _reject([b" event " + pickle.dumps({"data": value}, protocol=5)]).reason == reason


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (pickle.dumps([1, 2]), "not-a-document"),
        (pickle.dumps("text"), "not-a-document"),
        (pickle.dumps({1: 2}), "not-a-document"),
        (msgpack.packb(None), "not-a-document"),
        (msgpack.packb({b"k": 1}), "not-a-document"),
        (msgpack.packb({1: 2}), "garbage"),  # strict_map_key: int keys are refused while unpacking
        (b"[1, 2]", "not-a-document"),
    ],
)
def test_anything_but_a_dict_with_str_keys_is_not_a_document(payload: bytes, reason: str) -> None:
    """Lists, scalars and maps with non-str keys at the top are refused, whatever the format."""
    serializer = "json" if payload.startswith(b"[") else "pickle" if payload[:1] == b"\x80" else "msgpack"
    assert _reject([b" start " + payload], serializer=serializer).reason == reason


def test_allowed_objects_pass_object_arrays_of_plain_values_and_ordered_dicts() -> None:
    """Object arrays of plain values, OrderedDict (-> dict), complex and protocol-2 bytes decode."""
    doc = {
        "o": np.array(["a", 1, None], dtype=object),
        "od": OrderedDict(b=1, a=2),
        "c": 1 + 2j,
        "b": b"\x00\xff",
        "s": np.float32(1.5),
        "f": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "v": np.arange(10)[::3],
    }
    for protocol in range(6):
        _, back = decode_message([b" start " + pickle.dumps(doc, protocol=protocol)])
        assert same(doc, back)
        assert type(back["od"]) is dict
        pack_document("start", back)


# ----------------------------------------------------------- msgpack safety


def _nd(kind: bytes, type_: Any, shape: list[int], data: bytes) -> dict[bytes, Any]:
    return {b"nd": True, b"type": type_, b"kind": kind, b"shape": shape, b"data": data}


def test_msgpack_numpy_object_arrays_are_refused_without_unpickling(tmp_path: Path) -> None:
    """kind "O" carries a pickle: msgpack-object-array, and its payload never runs."""
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Evil((os.system, (f"touch {marker}",))))
    payload = msgpack.packb({"data": _nd(b"O", [["", "|O"]], [1], evil)}, use_bin_type=True)
    assert _reject([b" event " + payload]).reason == "msgpack-object-array"
    assert not marker.exists()
    real = msgpack_numpy.packb({"data": np.array([1, "a"], dtype=object)})
    assert _reject([b" event " + real]).reason == "msgpack-object-array"


@pytest.mark.parametrize(
    "bad",
    [
        _nd(b"", "<f8", [3], b"\x00" * 23),  # too few bytes
        _nd(b"", "<f8", [-1], b""),  # negative dimension
        _nd(b"", "|O", [1], b"\x00" * 8),  # object dtype by typestr
        _nd(b"", "f8; import os", [1], b"\x00" * 8),  # not a typestr
        _nd(b"X", "<f8", [1], b"\x00" * 8),  # unknown kind
        {b"nd": False, b"type": "<f8", b"data": b"\x00"},  # scalar too short
    ],
)
def test_malformed_msgpack_numpy_maps_are_garbage(bad: dict[bytes, Any]) -> None:
    """Array maps whose dtype, shape and bytes disagree are refused, never half-built."""
    assert _reject([b" event " + msgpack.packb({"data": bad}, use_bin_type=True)]).reason == "garbage"


def test_msgpack_numpy_scalars_complex_and_structured_arrays_decode() -> None:
    """np.float32/int64/bool_ scalars, complex numbers and structured arrays come back equal."""
    doc = {
        "f32": np.float32(1.25),
        "i64": np.int64(-3),
        "b": np.bool_(True),
        "c": 2 - 1j,
        "rec": np.zeros(2, dtype=[("x", "<f4"), ("y", "<i8")]),
        "nd": 1.0,  # a key named like msgpack_numpy's marker is just a key
    }
    payload = msgpack_numpy.packb(doc)
    _, back = decode_message([b" start " + payload])
    assert same(msgpack_numpy.unpackb(payload), back)
    assert same(doc, back)


def test_msgpack_extension_types_and_timestamps_are_refused() -> None:
    """msgpack ext types (timestamps included) are no document value."""
    for value in (msgpack.ExtType(5, b"x"), msgpack.Timestamp(1, 0)):
        assert _reject([b" event " + msgpack.packb({"t": value})]).reason == "unsupported-type"


# ---------------------------------------------------- envelope, auto, reasons


def test_every_reason_code_has_a_message_that_produces_it() -> None:
    """The stable reason codes, each with an example (REASONS is complete and each is reachable)."""
    good = b" start " + pickle.dumps({"uid": "u", "time": 1.0})
    examples: dict[str, tuple[list[bytes], dict[str, Any]]] = {
        "frame-count": ([good, b""], {}),
        "oversized": ([good], {"max_bytes": len(good) - 1}),
        "envelope": ([b"start"], {}),
        "prefix-mismatch": ([b"OTHER start {}"], {"prefix": b"BL1"}),
        "unknown-document": ([b" bulk_events {}"], {}),
        "truncated": ([b" start "], {}),
        "garbage": ([b" start [1]"], {}),
        "pickle-forbidden-global": ([b" start " + pickle.dumps(Evil((print, ("x",))))], {}),
        "msgpack-object-array": ([b" start " + msgpack_numpy.packb({"o": np.array([None])})], {}),
        "too-complex": ([b" start \x80\x04Nr\xff\xff\xff\xff."], {}),
        "not-a-document": ([b" start " + msgpack.packb({b"k": 1})], {}),
        "unsupported-type": ([b" start " + pickle.dumps({"s": {1}})], {}),
    }
    assert set(examples) == set(REASONS)
    for reason, (frames, options) in examples.items():
        assert _reject(frames, **options).reason == reason
    assert _reject([]).reason == "frame-count"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"\x80", {}),  # msgpack's empty map, the only 1-byte payload starting 0x80
        (b"\x80\x05" + pickle.dumps({"a": 1}, protocol=5)[2:], {"a": 1}),
        (b"\x81\xa1a\x01", {"a": 1}),  # msgpack fixmap
        (b"\xde\x00\x01\xa1a\x01", {"a": 1}),  # msgpack map16
        (b"\xdf\x00\x00\x00\x01\xa1a\x01", {"a": 1}),  # msgpack map32
        (b'{"a": 1}', {"a": 1}),
        (b' \n\t{"a": 1}', {"a": 1}),  # JSON may start with whitespace
        (pickle.dumps({"a": 1}, protocol=0), {"a": 1}),  # "(dp0"
        (pickle.dumps({"a": 1}, protocol=1), {"a": 1}),  # "}q"
    ],
)
def test_auto_recognizes_each_format_from_its_first_bytes(payload: bytes, expected: dict[str, Any]) -> None:
    """auto: 0x80+proto = pickle, lone 0x80 = msgpack {}, maps = msgpack, "{" = JSON, "(" "}" = pickle 0/1."""
    assert decode_message([b" start " + payload]) == ("start", expected)


@pytest.mark.parametrize("payload", [b"[1]", b"\x90", b"\x00", b"x", b"\xc0", b"  ", b"\x80\x04"])
def test_auto_calls_payloads_that_cannot_be_a_document_garbage_or_truncated(payload: bytes) -> None:
    """Arrays, nil, text and cut-off pickles are not guessed at."""
    assert _reject([b" start " + payload]).reason in {"garbage", "truncated"}


def test_a_wrong_serializer_name_is_a_configuration_error() -> None:
    """An unknown serializer is a ValueError (a bug in the caller), not a rejected message."""
    assert SERIALIZERS == ("auto", "pickle", "msgpack", "json")
    with pytest.raises(ValueError, match="serializer"):
        decode_message([b" start {}"], serializer="yaml")


def test_bytearray_and_memoryview_frames_are_accepted() -> None:
    """Frames from recv_multipart(copy=False) style buffers decode like bytes."""
    message = b" start " + pickle.dumps({"a": 1})
    assert decode_message([bytearray(message)]) == ("start", {"a": 1})  # type: ignore[list-item]
    assert decode_message([memoryview(message)]) == ("start", {"a": 1})  # type: ignore[list-item]


@pytest.mark.parametrize("name", sorted(DOCUMENT_NAMES))
def test_every_event_model_document_name_is_accepted(name: str) -> None:
    """All ten event-model document names pass the envelope (bulk_* do not)."""
    assert decode_message([f" {name} ".encode() + b"{}"])[0] == name


# ----------------------------------------------------------------- truncation


@pytest.mark.parametrize("label", ["pickle", "pickle2", "pickle0", "msgpack_numpy", "json"])
def test_every_prefix_of_every_real_message_is_truncated(acquired: Acquired, label: str) -> None:
    """Cutting a real message anywhere gives truncated (JSON: or garbage), never another exception."""
    for message in acquired.messages[label][:8]:
        head = len(message) - len(_payload(message))
        for cut in range(head, len(message)):
            if message[head:cut] == b"\x80":  # by design the lone 0x80 is msgpack's empty map
                assert decode_message([message[:cut]])[1] == {}
                continue
            reason = _reject([message[:cut]]).reason
            if label == "json":
                assert reason in {"truncated", "garbage"}
            else:
                assert reason == "truncated", (cut, message[:cut][-20:])


# ---------------------------------------------------------------- hypothesis

_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
    hnp.arrays(
        hnp.scalar_dtypes() | hnp.unicode_string_dtypes() | hnp.byte_string_dtypes(),
        hnp.array_shapes(min_dims=0, max_dims=3, max_side=3),
    ),
    hnp.from_dtype(np.dtype("f4")).map(np.float32),
    st.integers(-(2**31), 2**31 - 1).map(np.int32),
)
documents = st.dictionaries(
    st.text(max_size=10),
    st.recursive(
        _leaves,
        lambda children: (
            st.lists(children, max_size=4)
            | st.tuples(children, children)
            | st.dictionaries(st.text(max_size=6), children, max_size=4)
        ),
        max_leaves=15,
    ),
    max_size=6,
)


@settings(max_examples=examples(150), deadline=None)
@given(documents, st.integers(0, 5))
def test_any_document_pickled_with_any_protocol_round_trips(doc: dict[str, Any], protocol: int) -> None:
    """Generated documents (numpy of every dtype, tuples, bytes, big ints) decode like pickle.loads."""
    payload = pickle.dumps(doc, protocol=protocol)
    name, back = decode_message([b" event " + payload], serializer="pickle")
    assert same(pickle.loads(payload), back)  # numpy itself turns >U into <U before protocol 5
    pack_document(name, back)


@settings(max_examples=examples(100), deadline=None)
@given(documents)
def test_any_msgpack_numpy_document_decodes_like_msgpack_numpy(doc: dict[str, Any]) -> None:
    """Whatever msgpack_numpy packs (object arrays aside) decodes to what it would unpack itself."""
    try:
        payload = msgpack_numpy.packb(doc)
    except (TypeError, ValueError, OverflowError):  # msgpack_numpy cannot pack it: nothing to compare
        return
    expected = msgpack_numpy.unpackb(payload)
    _, back = decode_message([b" event " + payload])
    assert same(expected, back)


def _pickle_programs() -> st.SearchStrategy[bytes]:
    """Byte streams made of real pickle opcodes with plausible arguments (and allowed globals)."""
    globals_ = [
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("collections", "OrderedDict"),
        ("builtins", "complex"),
        ("_codecs", "encode"),
        ("os", "system"),
    ]
    texts = [b"f8", b"<i4", b"O", b"latin1", b"numpy", b"dtype", b"K", b"C", b"\x00" * 8, b"rot13"]
    tokens = []
    for op in pickletools.opcodes:
        code = op.code.encode("latin-1")
        if op.arg is None:
            tokens.append(st.just(code))
        elif op.arg.n > 0:
            tokens.append(st.binary(min_size=op.arg.n, max_size=op.arg.n).map(lambda a, c=code: c + a))
        elif op.arg.n == pickletools.UP_TO_NEWLINE:
            lines = [b"0\n", b"1\n", b"12\n", b"'a'\n", b"1.5\n", b"numpy\ndtype\n", b"os\nsystem\n", b"-1\n"]
            tokens.append(st.sampled_from(lines).map(lambda a, c=code: c + a))
        else:
            width = {-2: 1, -3: 4, -4: 4, -5: 8}[op.arg.n]
            tokens.append(
                st.sampled_from(texts).map(lambda t, c=code, w=width: c + len(t).to_bytes(w, "little") + t)
            )
    tokens.append(st.sampled_from(globals_).map(lambda g: _stack_global(*g)))
    return st.lists(st.one_of(tokens), max_size=30).map(lambda ops: b"\x80\x04" + b"".join(ops) + b".")


@settings(max_examples=examples(600), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_pickle_programs())
def test_random_pickle_programs_only_raise_decode_error(program: bytes) -> None:
    """Opcode-level fuzzing of the restricted unpickler: a document or a DecodeError, nothing else."""
    try:
        name, doc = decode_message([b" event " + program])
    except DecodeError as error:
        assert error.reason in REASONS
    else:
        pack_document(name, doc)


@settings(max_examples=examples(400), deadline=None)
@given(
    st.sampled_from(["auto", "pickle", "msgpack", "json"]),
    st.binary(max_size=300),
    st.sampled_from([b"", b"\x80\x04", b"\x80\x02", b"\x81", b"\xde\x00\x02", b"{", b"(", b"}"]),
)
def test_arbitrary_payload_bytes_only_raise_decode_error(serializer: str, tail: bytes, head: bytes) -> None:
    """Random payloads (with format-like first bytes) give a document or a DecodeError, nothing else."""
    try:
        name, doc = decode_message([b" event " + head + tail], serializer=serializer)
    except DecodeError as error:
        assert error.reason in REASONS
    else:
        pack_document(name, doc)


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(st.binary(max_size=60), max_size=4), st.binary(max_size=8))
def test_arbitrary_frame_lists_only_raise_decode_error(frames: list[bytes], prefix: bytes) -> None:
    """Any list of frames and any configured prefix: a document or a DecodeError."""
    try:
        decode_message(frames, prefix=prefix.replace(b" ", b""))
    except DecodeError as error:
        assert error.reason in REASONS


@settings(
    max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_real_messages_only_raise_decode_error(acquired: Acquired, data: st.DataObject) -> None:
    """Real messages truncated, bit-flipped, spliced or shortened: a document or a DecodeError."""
    label = data.draw(st.sampled_from(sorted(PUBLISHERS)))
    message = bytearray(data.draw(st.sampled_from(acquired.messages[label])))
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, len(message)))
        action = data.draw(st.sampled_from(["cut", "flip", "insert", "delete"]))
        if action == "cut":
            del message[where:]
        elif action == "flip" and where < len(message):
            message[where] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "insert":
            message[where:where] = data.draw(st.binary(min_size=1, max_size=8))
        elif where < len(message):
            del message[where : where + data.draw(st.integers(1, 8))]
    try:
        name, doc = decode_message([bytes(message)])
    except DecodeError as error:
        assert error.reason in REASONS
    else:
        pack_document(name, doc)


def test_large_protocol_2_pickles_with_many_memo_entries_are_not_mistaken_for_bombs() -> None:
    """2**20 + 50 memoized strings: LONG_BINPUT indices past the fast path, bounded by size, decode."""
    doc = {"data": [str(i) for i in range(2**20 + 50)]}
    _, back = decode_message([b" event " + pickle.dumps(doc, protocol=2)])
    assert back == doc


def test_bytes_after_stop_are_ignored_like_pickle_loads_does() -> None:
    """pickle.loads ignores what follows STOP; so does the opcode scan (no false rejection)."""
    assert decode_message([b" start " + pickle.dumps({"a": 1}) + b"\xff\xff"]) == ("start", {"a": 1})


# ------------------------------------------------------ pickle skeletons


def _verdict(message: bytes) -> tuple[str, Any]:
    """What decode_message says: the spooled bytes of the document, or the refusal reason."""
    try:
        name, doc = decode_message([message])
    except DecodeError as error:
        return "refused", error.reason
    return "document", pack_document(name, doc)


def _event_pickle(seq: int, protocol: int = 4) -> bytes:
    shared = "det"
    doc = {
        "uid": f"{seq:036d}",
        "time": 1.5 * seq,
        "data": {shared: seq / 3, "motor": -seq},
        "timestamps": {shared: 2.5 * seq, "motor": 0.5},
        "seq_num": seq,
        "filled": {},
        "descriptor": "d" * 36,
    }
    return b" event " + pickle.dumps(doc, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickles_of_a_known_skeleton_decode_exactly_like_pickle_loads(
    monkeypatch: pytest.MonkeyPatch, protocol: int
) -> None:
    """Events pickled alike skip the scan and the walk, and still decode to exactly what was pickled."""
    monkeypatch.setattr(wire, "_SKELETONS", wire._Skeletons())
    messages = [_event_pickle(seq, protocol) for seq in range(300, 400)]
    assert len({len(m) for m in messages}) == 1
    for message in messages:
        assert decode_message([message])[1] == pickle.loads(message.split(b" ", 2)[2])
    assert wire._SKELETONS.known(messages[-1].split(b" ", 2)[2])


@settings(max_examples=examples(500), deadline=None)
@given(st.integers(300, 399), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4))
def test_a_known_skeleton_never_changes_a_verdict(seq: int, edits: list[tuple[int, int]]) -> None:
    """Bytes overwritten in a pickle whose skeleton is known: the same verdict as with none known.

    Overwritten opcodes, string lengths or memo indices (sharing bombs, LONG_BINPUT, non-ASCII text)
    change the skeleton, so the full scan and walk decide; overwritten values decode as values.
    """
    learnt = wire._Skeletons()
    base = _event_pickle(seq)
    for message in (base, _event_pickle(seq + 1)):
        learnt.learn(message.split(b" ", 2)[2])
    mutated = bytearray(base)
    for where, value in edits:
        mutated[7 + where % (len(base) - 7)] = value
    original = wire._SKELETONS
    try:
        wire._SKELETONS = wire._Skeletons()  # type: ignore[misc]
        expected = _verdict(bytes(mutated))
        wire._SKELETONS = learnt  # type: ignore[misc]
        assert _verdict(bytes(mutated)) == expected
    finally:
        wire._SKELETONS = original  # type: ignore[misc]


def test_a_known_skeleton_does_not_admit_a_sharing_bomb_of_the_same_length() -> None:
    """Same length, same opcodes, but BINGET indices that nest shared lists: still too complex."""
    skeletons = wire._Skeletons()
    flat = b"\x80\x04]\x94(" + b"]\x94" * 30 + b"e}\x94\x8c\x01a\x94h\x00s."
    skeletons.learn(flat)
    bomb = bytearray(flat)
    assert skeletons.known(bytes(flat))
    bomb[-3] = 0x01  # the value is another memo slot: not the learnt skeleton
    assert not skeletons.known(bytes(bomb))


def test_non_ascii_text_and_other_opcodes_are_never_learnt() -> None:
    """A str that is not ASCII, a global or a LONG_BINPUT makes a pickle unlearnable."""
    for doc in ({"a": "\u00e9"}, {"a": np.float64(1.0)}, {"a": complex(1, 2)}):
        assert wire._skeleton_positions(pickle.dumps(doc, protocol=4)) is None
    assert wire._skeleton_positions(b"\x80\x02}r\x00\x00\x00\x00.") is None
    assert wire._skeleton_positions(pickle.dumps({"a": "x"}, protocol=4)) is not None


def test_skeletons_stay_few_per_length_and_in_all() -> None:
    """However varied the pickles, a lookup compares at most PER_LENGTH skeletons, and LIMIT are kept."""
    skeletons = wire._Skeletons()
    for i in range(5000):
        skeletons.learn(pickle.dumps({f"k{i % 97:02d}": [None] * (i % 7), "v": "x" * (i % 13)}, protocol=4))
    assert all(len(entries) <= skeletons.PER_LENGTH for entries in skeletons._by_length.values())
    assert sum(len(entries) for entries in skeletons._by_length.values()) <= skeletons.LIMIT


def test_a_lying_frame_length_cannot_smuggle_a_memo_bomb_past_the_scan() -> None:
    """A FRAME shorter than its contents made the file-reading C unpickler skip bytes and run a
    LONG_BINPUT the scan had read as string contents (2**26: 1 GiB touched). It now reads in order."""
    inner = b"\x8c\x07ab"  # the frame ends inside this 7-character string
    hidden = b"r" + struct.pack("<I", 2**30)  # LONG_BINPUT 2**30: 16 GiB of memo
    payload = b"\x80\x04\x95" + struct.pack("<Q", len(inner)) + inner + b"XXXXXC\x05" + hidden + b"."
    with pytest.raises(DecodeError) as caught:
        decode_message([b" event " + payload])
    assert caught.value.reason == "not-a-document"  # it read `C\x05 r...` as bytes, like the scan


@settings(max_examples=examples(400), deadline=None)
@given(st.integers(300, 399), st.integers(0, 300))
def test_frame_lengths_never_change_what_the_restricted_unpickler_reads(seq: int, frame: int) -> None:
    """Any FRAME length: the restricted unpickler parses like in-memory `pickle.loads` (or both fail)."""
    payload = bytearray(_event_pickle(seq).split(b" ", 2)[2])
    payload[3:11] = struct.pack("<Q", frame)
    try:
        expected: Any = pickle.loads(bytes(payload))
    except Exception as error:  # noqa: BLE001
        expected = type(error)
    try:
        got: Any = wire._restricted_loads(bytes(payload))
    except Exception as error:  # noqa: BLE001
        got = type(error)
    assert repr(got) == repr(expected)
