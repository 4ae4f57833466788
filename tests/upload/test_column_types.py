"""column_types: the types a stream table ends with are the ones all its rows infer in one batch.

Each case builds the batches as TiledWriter does (``pyarrow.Table.from_pylist``
of row dicts) and checks that promoting batch by batch gives the schema
``from_pylist`` infers over every row at once, where it infers one; where it
refuses (bool then int), numpy's promotion; and that anything else is refused
with the column named.
"""

from __future__ import annotations

from typing import Any

import pyarrow
import pytest

from tiled_writer_sidecar.errors import BadRunDocument
from tiled_writer_sidecar.upload.column_types import (
    TypeChangeNotWidening,
    conform,
    promote_schema,
    stored_schema,
)


def batches(values: list[Any], cut: int = 1) -> list[pyarrow.Table]:
    rows = [{"seq_num": i, "x": v} for i, v in enumerate(values, 1)]
    return [pyarrow.Table.from_pylist(rows[:cut]), pyarrow.Table.from_pylist(rows[cut:])]


def promoted(values: list[Any], cut: int = 1) -> pyarrow.Schema:
    first, second = batches(values, cut)
    return promote_schema(first.schema, second.schema)


@pytest.mark.parametrize(
    "values",
    [
        [0, 3.5, 4],  # an ophyd counter: int, then float
        [None, 3, 4.5],  # no value at first
        [None, None, "a"],
        [[1, 2], [1.5, 2.5]],  # a small waveform
        [1.5, 2, 3],  # float, then int: no change
        [1, 2, 3],
    ],
    ids=repr,
)
def test_promoting_batch_by_batch_gives_the_one_batch_schema(values: list[Any]) -> None:
    assert promoted(values) == pyarrow.Table.from_pylist([{"seq_num": 0, "x": v} for v in values]).schema


def test_bool_then_int_widens_as_numpy_promotes_where_from_pylist_refuses() -> None:
    """In-process TiledWriter fails on this batch (ArrowInvalid); the sidecar keeps the values, as int64."""
    with pytest.raises(pyarrow.ArrowInvalid):
        pyarrow.Table.from_pylist([{"x": True}, {"x": 2}])
    schema = promoted([True, 2])
    assert schema.field("x").type == pyarrow.int64()
    first, second = batches([True, 2])
    both = pyarrow.concat_tables([conform(first, schema), conform(second, schema)])
    assert both["x"].to_pylist() == [1, 2]


@pytest.mark.parametrize("values", [[1, "overrange"], ["a", 1], [[1, 2], 3], [1.5, [1.0]]], ids=repr)
def test_a_change_that_is_no_widening_is_refused_naming_the_column(values: list[Any]) -> None:
    """Deterministic, and a BadRunDocument: the uploader quarantines the run at once."""
    with pytest.raises(TypeChangeNotWidening, match="column 'x' changed type") as info:
        promoted(values)
    assert isinstance(info.value, BadRunDocument)


def test_an_all_null_column_is_stored_as_strings_until_values_come() -> None:
    """TiledWriter creates an all-null column as strings; the inferred type stays null, so ints still widen."""
    first, second = batches([None, 7])
    assert stored_schema(first.schema).field("x").type == pyarrow.string()
    assert stored_schema(promote_schema(first.schema, second.schema)).field("x").type == pyarrow.int64()


def test_conform_fills_a_missing_column_with_nulls_and_drops_an_unknown_one() -> None:
    """As from_pylist over every row: the first row's columns, nulls where a row has no value."""
    schema = pyarrow.schema([("seq_num", pyarrow.int64()), ("x", pyarrow.float64())])
    batch = pyarrow.Table.from_pylist([{"y": "extra", "seq_num": 2}])
    out = conform(batch, schema)
    assert out.schema == schema and out.to_pylist() == [{"seq_num": 2, "x": None}]


def test_conform_refuses_an_integer_a_double_cannot_hold_exactly() -> None:
    schema = pyarrow.schema([("x", pyarrow.float64())])
    with pytest.raises(TypeChangeNotWidening, match="exactly"):
        conform(pyarrow.Table.from_pylist([{"x": 2**53 + 1}]), schema)
