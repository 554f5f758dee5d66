"""Columns: one field's values for many rows, checked and in the shape they travel in.

`to_column` checks the values a producer gives for one field against the field's spec
and builds the column, so that a bad row is refused before anything reaches the store.

A put or a read moves each field as one column, not one message per row, so the wire
carries a handful of buffers per request whatever the batch size:

    ["d", block]          dense: every row has the same shape; one (n, ...) array or tensor
    ["r", flat, shapes]   ragged: rows of different shapes, concatenated; `shapes` splits them
    ["o", values]         objects: str, bytes or any codec value, one per row

Storage units keep a received column as it arrived (`Chunk`) and address a row as
(chunk, index); a read of consecutive rows of one chunk is a slice of it, with no copy,
and any other read builds a column again (`join`, one concatenation in C). The client turns the columns
of a read back into what the schema promises (`assemble`): a dense field stays one
array, without a copy when a single unit served it. Knows nothing about the network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dataplane.codec import array_meta
from dataplane.errors import SchemaError
from dataplane.schema import FieldSpec


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "dtype")


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or _is_tensor(value)


def _cat(arrays: Sequence[Any]) -> Any:
    if arrays and _is_tensor(arrays[0]):
        import torch

        return torch.cat([a.reshape(-1) for a in arrays])
    return np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.empty(0)


def _stack(arrays: Sequence[Any]) -> Any:
    if _is_tensor(arrays[0]):
        import torch

        return torch.stack(list(arrays))
    return np.stack(arrays)


@dataclass(slots=True)
class Column:
    """One field's validated values for n rows (see `dataplane.columns` for how it travels)."""

    kind: str  # "d" dense | "r" ragged | "o" objects
    block: Any  # dense: the (n, ...) array or tensor; else None
    rows: list[Any]  # ragged / objects: one value per row; dense: empty
    nbytes: list[int]
    lengths: list[int]  # leading dimension per row for ragged fields, else 0


def to_column(field: str, spec: FieldSpec, value: Any, n_rows: int) -> Column:
    """Check `value` (all rows of one field) against `spec`; raise SchemaError naming the problem."""
    if not spec.numeric:  # str, bytes, any
        return _object_column(field, spec, value, n_rows)
    if _is_array(value):
        dtype, shape, _, _ = array_meta(value)
        if len(shape) == 0 or shape[0] != n_rows:
            raise SchemaError(
                f"field {field!r}: got an array of shape {tuple(shape)} for {n_rows} rows; expected "
                f"shape ({n_rows}, ...) with rows along the first dimension"
            )
        _check_dtype(field, spec, dtype)
        _check_shape(field, spec, tuple(shape[1:]), "every row")
        row_bytes = int(value.nbytes) // max(n_rows, 1)
        if spec.ragged:
            return Column("r", None, list(value), [row_bytes] * n_rows, [int(shape[1])] * n_rows)
        return Column("d", value, [], [row_bytes] * n_rows, [0] * n_rows)
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        if len(value) != n_rows:
            raise SchemaError(f"field {field!r}: got {len(value)} values for {n_rows} rows; give one per row")
        numbers = _plain_numbers(spec, value)
        if numbers is not None:  # one number per row, as one array
            return to_column(field, spec, numbers, n_rows)
        rows = _plain_rows(spec, value) or [_row_array(field, spec, v, i) for i, v in enumerate(value)]
        nbytes = [int(r.nbytes) for r in rows]
        if spec.ragged:
            return Column("r", None, rows, nbytes, [int(r.shape[0]) for r in rows])
        return Column("d", _stack(rows) if rows else np.empty(0), [], nbytes, [0] * n_rows)
    raise SchemaError(
        f"field {field!r}: got {type(value).__name__}; expected an array with one row per sample or "
        f"a list of {n_rows} per-row values of {spec}"
    )


def _plain_numbers(spec: FieldSpec, values: Sequence[Any]) -> Any:
    """A scalar field's Python numbers as one array, if numpy reads them as the spec's dtype exactly
    (ints into an int64 field, bools into a bool one), else None: `_row_array` then checks each row
    (a float into an int field, an int out of range) and names the first bad one."""
    if spec.shape or spec.dtype == "bfloat16" or not all(type(v) in (int, float, bool) for v in values):
        return None
    try:
        numbers = np.asarray(values)
    except OverflowError:  # an int beyond int64
        return None
    return numbers if numbers.dtype == np.dtype(spec.dtype) and numbers.shape == (len(values),) else None


def _plain_rows(spec: FieldSpec, values: Sequence[Any]) -> list[Any] | None:
    """`values` as they are if each is a C-contiguous numpy array of the spec's dtype (native byte
    order) and rank whose fixed dims match, checked in one pass; else None (`_row_array` checks each
    row and names the first bad one). The common rows, token ids and log-probs, take this path."""
    if spec.dtype == "bfloat16" or not values:
        return None
    dtype, rank = np.dtype(spec.dtype), len(spec.shape)
    fixed = [(k, d) for k, d in enumerate(spec.shape) if d is not None]
    for v in values:
        if type(v) is not np.ndarray or v.dtype != dtype or v.ndim != rank or not v.flags.c_contiguous:
            return None
        if fixed and any(v.shape[k] != d for k, d in fixed):
            return None
    return list(values)


def _row_array(field: str, spec: FieldSpec, value: Any, i: int) -> Any:
    if not _is_array(value):
        if spec.shape or not isinstance(value, int | float | bool | np.generic):
            raise SchemaError(
                f"field {field!r}, row {i}: got {type(value).__name__}; expected an array of {spec}"
            )
        if spec.dtype == "bfloat16":
            raise SchemaError(f"field {field!r}, row {i}: bfloat16 values must be torch tensors")
        # A plain number for a scalar field: into a float field it is rounded as floats are (0.1 is
        # not exact in float32) unless it overflows; into an int or bool field it must survive unchanged.
        floating = np.dtype(spec.dtype).kind == "f"
        try:
            with np.errstate(all="ignore"):  # an overflow or a NaN into an int is refused just below
                arr = np.asarray(value, dtype=spec.dtype)
            fits = (
                bool(np.isfinite(arr)) or not np.isfinite(float(value)) if floating else arr.item() == value
            )
        except OverflowError:  # a Python int beyond the dtype's range
            fits = False
        if not fits:
            raise SchemaError(
                f"field {field!r}, row {i}: {value!r} does not fit dtype {spec.dtype}"
                + (" (out of its range)" if floating else "; give a value the dtype holds")
            )
        return arr
    dtype, shape, _, _ = array_meta(value)
    _check_dtype(field, spec, dtype, row=i)
    _check_shape(field, spec, tuple(shape), f"row {i}")
    return value


def _check_dtype(field: str, spec: FieldSpec, dtype: str, row: int | None = None) -> None:
    if dtype != spec.dtype:
        where = f"field {field!r}" + ("" if row is None else f", row {row}")
        raise SchemaError(
            f"{where}: dtype {dtype} does not match the schema's {spec.dtype}; convert it first "
            f"(e.g. `.astype(np.{spec.dtype})` or `.to(torch.{spec.dtype})`) or declare the field as "
            f"'{dtype}{str(spec)[len(spec.dtype) :]}'"
        )


def _check_shape(field: str, spec: FieldSpec, shape: tuple[int, ...], where: str) -> None:
    ok = len(shape) == len(spec.shape) and all(d is None or d == s for d, s in zip(spec.shape, shape))
    if not ok:
        raise SchemaError(
            f"field {field!r}, {where}: shape {shape} does not match the schema's {spec} "
            f"(expected {tuple('*' if d is None else d for d in spec.shape)}, '*' = any length)"
        )


def _object_column(field: str, spec: FieldSpec, value: Any, n_rows: int) -> Column:
    if not isinstance(value, Sequence) or isinstance(value, str | bytes) or len(value) != n_rows:
        raise SchemaError(
            f"field {field!r}: expected a list of {n_rows} {spec.dtype} values, got {value!r:.80}"
        )
    kind = {"str": str, "bytes": bytes}.get(spec.dtype)
    if kind is not None:
        for i, v in enumerate(value):
            if not isinstance(v, kind):
                raise SchemaError(f"field {field!r}, row {i}: expected {spec.dtype}, got {type(v).__name__}")
    sizes = [len(v) if isinstance(v, str | bytes) else 0 for v in value]
    return Column("o", None, list(value), sizes, [0] * n_rows)


def wire(column: Column, positions: Sequence[int]) -> list:
    """The column for the rows at `positions`, as it goes to one storage unit."""
    if column.kind == "d":
        lo, hi = positions[0], positions[-1] + 1
        contiguous = hi - lo == len(positions)
        return ["d", column.block[lo:hi] if contiguous else column.block[list(positions)]]
    rows = [column.rows[i] for i in positions]
    if column.kind == "r":
        return ["r", _cat(rows), [list(r.shape) for r in rows]]
    return ["o", rows]


class Chunk:
    """A column as a storage unit keeps it: the received buffers, untouched."""

    __slots__ = ("kind", "data", "shapes", "offsets")

    def __init__(self, wire: list):
        self.kind, self.data = wire[0], wire[1]
        self.shapes: list = []  # ragged only: each row's shape, and where each row starts in `data`
        self.offsets: list[int] = []
        if self.kind == "r":
            self.shapes = wire[2]
            self.offsets = [0]
            for shape in self.shapes:
                self.offsets.append(self.offsets[-1] + math.prod(shape))

    @classmethod
    def of(cls, value: Any) -> Chunk:
        """A one-row chunk holding `value` (used when loading a checkpoint)."""
        return cls(["d", value[None]] if _is_array(value) else ["o", [value]])

    def __len__(self) -> int:
        return len(self.shapes) if self.kind == "r" else len(self.data)

    def row(self, i: int) -> Any:
        if self.kind == "d":
            return self.data[i, ...]  # `...` keeps a 0-d row an array, not a scalar
        if self.kind == "r":
            return self.data[self.offsets[i] : self.offsets[i + 1]].reshape(self.shapes[i])
        return self.data[i]

    def nbytes(self, i: int) -> int:
        value = self.row(i)
        if self.kind == "o":
            return len(value) if isinstance(value, str | bytes) else 0
        return int(value.nbytes)

    def total_nbytes(self) -> int:
        if self.kind == "o":
            return sum(len(v) for v in self.data if isinstance(v, str | bytes))
        return int(self.data.nbytes)

    def slice(self, i: int, j: int) -> list:
        """Rows i..j-1 as a column, sharing this chunk's memory."""
        if self.kind == "d":
            return ["d", self.data[i:j]]
        if self.kind == "r":
            return ["r", self.data[self.offsets[i] : self.offsets[j]], self.shapes[i:j]]
        return ["o", self.data[i:j]]


def read_column(refs: Sequence[tuple[Chunk, int]]) -> list:
    """The column for rows given as (chunk, index): a slice when they are consecutive in one chunk."""
    if refs:
        chunk, first = refs[0]
        if all(c is chunk and i == first + k for k, (c, i) in enumerate(refs)):
            return chunk.slice(first, first + len(refs))
    return join([c.row(i) for c, i in refs])


def join(cells: Sequence[Any]) -> list:
    """The column for a read: one array when the cells are arrays of one dtype, else a list."""
    if cells and all(_is_array(c) for c in cells):
        first = cells[0]
        if all(c.dtype == first.dtype and type(c) is type(first) for c in cells):
            if all(c.shape == first.shape for c in cells):
                return ["d", _stack(cells)]
            return ["r", _cat(cells), [list(c.shape) for c in cells]]
    return ["o", list(cells)]


def rows_of(wire: list) -> list[Any]:
    """One value per row from a column of any kind (views, not copies)."""
    chunk = Chunk(wire)
    return [chunk.row(i) for i in range(len(chunk))]


def assemble(parts: Sequence[tuple[list[int], list]], spec: FieldSpec, n: int) -> Any:
    """Put the columns read from several units back in batch order, in the schema's form.

    `parts` holds (positions in the batch, column) per unit. Dense numeric fields come back
    as one (n, ...) array (tensor for bfloat16), other fields as a list of n values.
    """
    if not spec.numeric or spec.ragged:
        values: list[Any] = [None] * n
        for positions, wire in parts:
            for i, value in zip(positions, rows_of(wire)):
                values[i] = value
        return values
    if len(parts) == 1 and parts[0][0] == list(range(n)):
        return parts[0][1][1]  # one unit, batch order: the received block itself
    if spec.dtype == "bfloat16":
        import torch

        dims = [d for d in spec.shape if d is not None]  # a dense field has no variable dimension
        out: Any = torch.empty((n, *dims), dtype=torch.bfloat16)
        for positions, wire in parts:
            out[torch.as_tensor(positions)] = wire[1]
        return out
    dense: Any = np.empty((n, *spec.shape), dtype=spec.dtype)
    for positions, wire in parts:
        dense[positions] = wire[1]
    return dense


def check_put(
    partition: str, schema: dict[str, FieldSpec], data: Mapping[str, Any], rows: Sequence[int] | None
) -> tuple[int, dict[str, Column]]:
    """The row count and the checked columns of a put; SchemaError names the first problem."""
    if not data:
        raise SchemaError(f"put to {partition!r} with no fields; give at least one of {sorted(schema)}")
    unknown = sorted(set(data) - set(schema))
    if unknown:
        raise SchemaError(
            f"put to {partition!r}: unknown field(s) {unknown}; the schema has {sorted(schema)}. "
            "Fix the name or create the partition with that field"
        )
    n = len(rows) if rows is not None else _row_count(data)
    return n, {f: to_column(f, schema[f], v, n) for f, v in data.items()}


def _row_count(data: Mapping[str, Any]) -> int:
    counts = {f: (v.shape[0] if getattr(v, "shape", ()) else len(v)) for f, v in data.items()}
    if len(set(counts.values())) != 1:
        raise SchemaError(f"fields give different row counts {counts}; every field needs one value per row")
    return next(iter(counts.values()))
