"""Column types of a stream table across batches: the rule that decides when a table is rewritten.

TiledWriter builds each batch with ``pyarrow.Table.from_pylist`` and Tiled
casts every append to the type its table was created with, so a column
whose first batch held integers refuses a later batch of floats (Tiled
answers 500). In-process TiledWriter writing all rows in one batch gets
the type Arrow infers over every row. `promote_schema` computes that type
batch by batch:

- a column's type widens the way numpy promotes (``bool -> int64 ->
  float64``, element-wise inside lists), and an all-null column takes the
  type of the first values that come;
- a column a batch lacks is null in that batch, a column the table lacks is
  dropped (``from_pylist`` takes its columns from the first row);
- any other change (a string after numbers, a list after a scalar) is not a
  widening: `TypeChangeNotWidening`, raised the same way for the same
  documents, so the run is quarantined with that reason.

`stored_schema` is the schema Tiled's table gets (TiledWriter stores an
all-null column as strings); when it changes, the table is rewritten with
every row (`run_writer.SidecarRunWriter`). `conform` casts a batch to a
table's schema exactly (``safe`` casts: an integer a double cannot hold
exactly is refused, as ``from_pylist`` refuses it in one batch).
"""

from __future__ import annotations

import numpy
import pyarrow

from tiled_writer_sidecar.errors import BadRunDocument


class TypeChangeNotWidening(BadRunDocument):
    """A column changed type in a way no table can hold exactly (quarantines the run)."""


def _numeric(arrow_type: pyarrow.DataType) -> bool:
    return bool(
        pyarrow.types.is_boolean(arrow_type)
        or pyarrow.types.is_integer(arrow_type)
        or pyarrow.types.is_floating(arrow_type)
    )


def promote_type(old: pyarrow.DataType, new: pyarrow.DataType, column: str = "?") -> pyarrow.DataType:
    """The type that holds values of both `old` and `new` exactly; raise `TypeChangeNotWidening`."""
    if old.equals(new) or pyarrow.types.is_null(new):
        return old
    if pyarrow.types.is_null(old):
        return new
    if _numeric(old) and _numeric(new):
        return pyarrow.from_numpy_dtype(numpy.result_type(old.to_pandas_dtype(), new.to_pandas_dtype()))
    if pyarrow.types.is_list(old) and pyarrow.types.is_list(new):
        return pyarrow.list_(promote_type(old.value_type, new.value_type, column))
    raise TypeChangeNotWidening(
        f"column {column!r} changed type from {old} to {new}, which is not a widening"
    )


def promote_schema(known: pyarrow.Schema, batch: pyarrow.Schema) -> pyarrow.Schema:
    """`known`'s columns, each promoted to hold `batch`'s values too (see the module docstring)."""
    if known.equals(batch):
        return known
    names = set(batch.names)
    return pyarrow.schema(
        [
            pyarrow.field(f.name, promote_type(f.type, batch.field(f.name).type, f.name))
            if f.name in names
            else f
            for f in known
        ]
    )


def _stored_type(arrow_type: pyarrow.DataType) -> pyarrow.DataType:
    if pyarrow.types.is_null(arrow_type):
        return pyarrow.string()
    if pyarrow.types.is_list(arrow_type) and pyarrow.types.is_null(arrow_type.value_type):
        return pyarrow.list_(pyarrow.string())
    return arrow_type


def stored_schema(schema: pyarrow.Schema) -> pyarrow.Schema:
    """The schema TiledWriter creates a table with for a batch of `schema` (null columns as strings)."""
    return pyarrow.schema([pyarrow.field(f.name, _stored_type(f.type)) for f in schema])


def conform(table: pyarrow.Table, schema: pyarrow.Schema) -> pyarrow.Table:
    """`table` with `schema`'s columns, in its order and types (a missing column is null); exact or raise."""
    if table.schema.equals(schema):
        return table
    names = set(table.column_names)
    columns = [
        table.column(f.name) if f.name in names else pyarrow.nulls(table.num_rows, f.type) for f in schema
    ]
    try:
        return pyarrow.Table.from_arrays(columns, names=schema.names).cast(schema, safe=True)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TypeChangeNotWidening(
            f"a value cannot be stored exactly with the table's types: {first}"
        ) from err
