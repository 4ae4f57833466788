"""validation: real documents pass the fast path; every verdict equals event-model's own validators'."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from event_model import DocumentNames, StreamRange, compose_run, schema_validators
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.run_engine import Document, simulated_runs
from tests.support.strength import examples
from tiled_writer_sidecar.documents import validation
from tiled_writer_sidecar.documents.validation import validate_document
from tiled_writer_sidecar.errors import ValidationError


def event_model_accepts(name: str, doc: Any) -> bool:
    """event-model's verdict (its validators raising anything at all counts as a rejection)."""
    try:
        schema_validators[DocumentNames(name)].validate(doc)
    except Exception:  # noqa: BLE001  # e.g. TypeError for an int key under patternProperties
        return False
    return True


def we_accept(name: str, doc: Any) -> bool:
    try:
        validate_document(name, doc)
    except ValidationError as error:
        assert error.reason == "schema"
        return False
    return True


@pytest.fixture(scope="module")
def run_engine_documents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Document]]:
    """count (with start metadata), scan, an image + int32 waveform detector, and a resource/datum detector."""
    with simulated_runs(
        tmp_path_factory.mktemp("sim"), sample="Si", operator={"name": "x", "id": 7}
    ) as documents:
        yield documents


def composed_documents() -> list[Document]:
    """One of every kind, made with event-model's compose_* API (validate=True), numpy included."""
    run = compose_run(metadata={"scan_id": 1, "hints": {"dimensions": [[["motor"], "primary"]]}})
    data_keys = {
        "motor": {"source": "PV:m", "dtype": "number", "shape": [], "units": "mm", "precision": 3},
        "image": {"source": "PV:img", "dtype": "array", "shape": [2, 2], "external": "STREAM:"},
        "frame": {"source": "PV:f", "dtype": "array", "shape": [3], "dtype_numpy": "<f8"},
    }
    descriptor = run.compose_descriptor(name="primary", data_keys=data_keys)
    event = descriptor.compose_event(
        data={"motor": np.float64(1.5), "frame": np.arange(3.0)},
        timestamps={"motor": 1.0, "frame": 1.0},
        filled={},
    )
    page = descriptor.compose_event_page(
        data={"motor": [1.0, 2.0], "frame": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]},
        timestamps={"motor": [1.0, 2.0], "frame": [1.0, 2.0]},
        seq_num=[2, 3],
    )
    resource = run.compose_resource(
        spec="AD_HDF5", root="/", resource_path="a/b.h5", resource_kwargs={"k": 1}
    )
    datum = resource.compose_datum(datum_kwargs={"point_number": 0})
    datum_page = resource.compose_datum_page(datum_kwargs={"point_number": [1, 2]})
    assert run.compose_stream_resource is not None
    stream_resource = run.compose_stream_resource(
        mimetype="application/x-hdf5",
        uri="file://localhost/a.h5",
        data_key="image",
        parameters={"path": "/d"},
    )
    stream_datum = stream_resource.compose_stream_datum(
        indices=StreamRange(start=0, stop=2),
        seq_nums=StreamRange(start=1, stop=3),
        descriptor=descriptor.descriptor_doc,
    )
    stop = run.compose_stop()
    bulk_events = {descriptor.descriptor_doc["uid"]: [dict(event)]}
    bulk_datum = {"resource": datum["resource"], "datum_ids": [datum["datum_id"]], "datum_kwarg_list": [{}]}
    return [
        ("start", run.start_doc),
        ("descriptor", descriptor.descriptor_doc),
        ("event", event),
        ("event_page", page),
        ("resource", resource.resource_doc),
        ("datum", datum),
        ("datum_page", datum_page),
        ("stream_resource", stream_resource.stream_resource_doc),
        ("stream_datum", stream_datum),
        ("stop", stop),
        ("bulk_events", bulk_events),
        ("bulk_datum", bulk_datum),
    ]


@pytest.fixture(scope="module")
def all_documents(run_engine_documents: list[Document]) -> list[Document]:
    return [*run_engine_documents, *composed_documents()]


# ------------------------------------------------------------------- accepts


@pytest.mark.parametrize("kind", list(DocumentNames))
def test_every_schema_compiles_to_the_fast_validator(kind: DocumentNames) -> None:
    """All twelve event-model schemas translate to fastjsonschema (none falls back to jsonschema)."""
    check = validation._compile(kind.value)
    assert check is not schema_validators[kind].validate


def test_every_real_run_engine_document_passes_the_fast_path(run_engine_documents: list[Document]) -> None:
    """count, scan, array detectors, resource/datum: each passes fastjsonschema without the slow path."""
    names = set()
    for name, doc in run_engine_documents:
        validation._compile(name)(doc)  # raises if the fast path would need event-model
        validate_document(name, doc)
        names.add(name)
    assert names == {"start", "descriptor", "event", "stop", "resource", "datum"}


def test_every_composed_document_of_every_kind_is_accepted() -> None:
    """compose_run's start/descriptor/event/event_page/resource/datum(_page)/stream_*/stop, and bulk_*."""
    documents = composed_documents()
    assert {name for name, _ in documents} == {kind.value for kind in DocumentNames}
    for name, doc in documents:
        assert event_model_accepts(name, doc), name
        validate_document(name, doc)


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("event_page", {"time": np.array([1.0, 2.0])}),  # event-model's "array" includes ndarrays
        ("event_page", {"seq_num": (2, 3)}),  # and tuples
        ("event_page", {"data": {"motor": np.array([1.0, 2.0]), "frame": np.zeros((2, 3))}}),
        ("event", {"time": np.float32(1.5)}),  # numbers.Number
        ("event", {"seq_num": 3.0}),  # an integral float is an integer since draft 6
    ],
)
def test_numpy_values_event_model_accepts_are_accepted_through_the_slow_path(
    name: str, change: dict[str, Any]
) -> None:
    """Where fastjsonschema's types are narrower than event-model's, event-model decides: accepted."""
    doc = {**dict(composed_documents())[name], **change}
    assert event_model_accepts(name, doc)
    validate_document(name, doc)


def test_validation_never_changes_the_document(all_documents: list[Document]) -> None:
    """No defaults are filled in (fastjsonschema's use_default is off): documents stay as they were."""
    for name, doc in all_documents:
        before = copy.deepcopy(doc)
        validate_document(name, doc)
        assert repr(doc) == repr(before)


# ------------------------------------------------------------------- rejects


@pytest.mark.parametrize(
    ("name", "change", "path"),
    [
        ("event", {"seq_num": "1"}, "$.seq_num"),
        ("event", {"seq_num": np.int64(1)}, "$.seq_num"),  # event-model: not an int either
        ("event", {"seq_num": True}, "$.seq_num"),
        ("event", {"extra": 1}, "$"),  # unevaluatedProperties: false
        ("event", {"data": [1]}, "$.data"),
        ("event", {"filled": {"x": 1}}, "$.filled.x"),
        ("event_page", {"seq_num": [1.5]}, "$.seq_num[0]"),
        ("resource", {"path_semantics": "mac"}, "$.path_semantics"),
        ("resource", {"unknown": "x"}, "$"),
        (
            "descriptor",
            {"data_keys": {"m": {"source": "s", "dtype": "float", "shape": []}}},
            "$.data_keys.m.dtype",
        ),
        ("descriptor", {"data_keys": {"m": {"dtype": "number", "shape": []}}}, "$.data_keys.m"),
        ("descriptor", {"hints": {"NX_class": "nx"}}, "$.hints.NX_class"),
        ("descriptor", {"configuration": {"a.b": {}}}, "$"),
        ("descriptor", {"object_keys": {"dev": {"x/y": 1}}}, "$.object_keys.dev"),
        ("start", {"hints": {"a.b": 1}}, "$.hints"),
        ("start", {"md": {"nested": {"bad.key": 1}}}, "$.md.nested"),
        ("stop", {"exit_status": "great"}, "$.exit_status"),
        ("stream_datum", {"indices": {"start": 0}}, "$.indices"),
        ("datum_page", {"datum_id": "not-a-list"}, "$.datum_id"),
    ],
)
def test_documents_event_model_rejects_are_rejected_naming_kind_and_path(
    name: str, change: dict[str, Any], path: str
) -> None:
    """Wrong types, missing/extra keys, bad enums/patterns/keys: rejected with "kind path: why"."""
    doc = {**dict(composed_documents())[name], **change}
    assert not event_model_accepts(name, doc)
    with pytest.raises(ValidationError) as caught:
        validate_document(name, doc)
    assert caught.value.reason == "schema"
    assert caught.value.detail.startswith(f"{name} {path}")


@pytest.mark.parametrize("required", ["uid", "time", "data", "timestamps", "seq_num", "descriptor"])
def test_an_event_missing_any_required_key_is_rejected(required: str) -> None:
    """Each required event key is required."""
    doc = dict(dict(composed_documents())["event"])
    del doc[required]
    assert not we_accept("event", doc)
    assert not event_model_accepts("event", doc)


def test_error_details_never_echo_more_than_200_characters_of_the_document() -> None:
    """A 10 kB bad value or a 1 kB key name is cut: the detail stays short."""
    event = dict(composed_documents())["event"]
    for doc in (
        {**event, "seq_num": "x" * 10_000},
        {**event, "k" * 1000: 1},
        {**event, "data": ["y" * 5000]},
    ):
        with pytest.raises(ValidationError) as caught:
            validate_document("event", doc)
        assert caught.value.detail.startswith("event $")
        assert len(caught.value.detail) <= 200 + len("event ") + 2


def test_an_unknown_document_kind_is_a_schema_error() -> None:
    """A name event-model does not know is rejected, not a KeyError."""
    with pytest.raises(ValidationError, match="unknown document kind"):
        validate_document("bogus", {})


# ---------------------------------------------- same verdict as event-model

_VALUES = [
    None, True, False, 0, 1, -5, 2**70, 1.0, 1.5, float("nan"), "", "x", "number", "array", "integer",
    "posix", "NXdetector", "NXdetector\n", "<f8", "|O8", "FILESTORE:", "success", "abort",
    [], [1, 2], ["a", "b"], [1.5], [[]], [None], (), (1, "a"), {}, {"a": 1}, {"a.b": 1}, {"": 1},
    {"ok": {"x/y": 1}}, {"start": 0, "stop": 1}, {"low": 0, "high": 1}, {1: 2},
    np.int64(3), np.float32(1.5), np.float64(2.5), np.bool_(True), np.str_("number"),
    np.array([1, 2]), np.array([1.5]), np.array(["a"]), np.array(3.0), np.zeros((2, 0)),
]  # fmt: skip

_KEYS = [
    "uid",
    "time",
    "seq_num",
    "data",
    "x",
    "a.b",
    "a/b",
    "",
    "dims",
    "shape",
    "dtype",
    "NX_class",
    "fields",
]


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, (list, tuple)):
        for index, value in enumerate(doc):
            yield from _paths(value, (*prefix, index))


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        doc = doc[step]
    return doc


@st.composite
def mutated_documents(draw: st.DrawFn, pool: list[Document]) -> Document:
    """A valid document with 1-3 edits: delete, replace, add or rename a key, anywhere."""
    name, doc = draw(st.sampled_from(pool))
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(doc))))
        action = draw(st.sampled_from(["replace", "delete", "add", "rename"]))
        value = draw(st.sampled_from(_VALUES))
        if not path:
            if action == "add":
                doc[draw(st.sampled_from(_KEYS))] = copy.deepcopy(value)
            continue
        parent = _get(doc, path[:-1])
        if isinstance(parent, tuple):
            continue
        if action == "replace":
            parent[path[-1]] = copy.deepcopy(value)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict) and action == "add":
            parent[draw(st.sampled_from(_KEYS))] = copy.deepcopy(value)
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(_KEYS))] = parent.pop(path[-1])
    return name, doc


@pytest.fixture(scope="module")
def mutations(all_documents: list[Document]) -> st.SearchStrategy[Document]:
    return mutated_documents(all_documents)


@settings(max_examples=examples(1500), deadline=None)
@given(data=st.data())
def test_same_verdict_as_event_model_on_mutated_documents(
    mutations: st.SearchStrategy[Document], data: st.DataObject
) -> None:
    """Over real and composed documents with random edits, we accept exactly what event-model accepts."""
    name, doc = data.draw(mutations)
    assert we_accept(name, doc) == event_model_accepts(name, doc)


@settings(max_examples=examples(300), deadline=None)
@given(
    st.sampled_from([kind.value for kind in DocumentNames]),
    st.dictionaries(st.sampled_from(_KEYS), st.sampled_from(_VALUES), max_size=6),
)
def test_same_verdict_as_event_model_on_random_documents(name: str, doc: dict[str, Any]) -> None:
    """Random small documents of every kind: same accept/reject verdict as event-model."""
    assert we_accept(name, doc) == event_model_accepts(name, doc)


# ------------------------------------------------------- plain-event fast path


def test_events_meet_the_hand_written_check_first() -> None:
    """event-model's event schema is the one `_plain_event` implements, so it is in use."""
    assert isinstance(validation._compile("event"), validation._PlainFirst)


@settings(max_examples=examples(1500), deadline=None)
@given(data=st.data())
def test_the_hand_written_event_check_only_accepts_what_event_model_accepts(
    all_documents: list[Document], data: st.DataObject
) -> None:
    """Mutated real events (and any document shaped like one): `_plain_event` never says valid wrongly."""
    events = [document for document in all_documents if document[0] == "event"]
    _, doc = data.draw(mutated_documents(events))
    if validation._plain_event(doc):
        assert event_model_accepts("event", doc)


@pytest.mark.parametrize(
    "edit",
    [
        {"seq_num": True},
        {"seq_num": 1.0},
        {"time": False},
        {"uid": np.str_("u")},
        {"data": []},
        {"filled": {"x": 1}},
        {"filled": []},
        {"extra": 1},
    ],
)
def test_the_hand_written_event_check_defers_on_anything_unusual(edit: dict[str, Any]) -> None:
    """Types other than the exact built-ins, or unknown keys: the compiled check decides."""
    doc = {"uid": "u", "descriptor": "d", "seq_num": 1, "time": 1.0, "data": {}, "timestamps": {}}
    assert validation._plain_event(doc)
    assert not validation._plain_event({**doc, **edit})
    assert we_accept("event", {**doc, **edit}) == event_model_accepts("event", {**doc, **edit})
