"""Partition schemas: which fields a row has, with what dtype and shape.

A field spec is written as a string: `"int64[*]"` (a 1-D array of any length),
`"float32"` (a scalar), `"uint8[3,*,*]"`, `"bfloat16[*]"` (torch only), or one of
`"str"`, `"bytes"`, `"any"` (any value the codec can encode). `*` marks a variable
dimension; rows of such a field are ragged and travel as a list of arrays.

`to_column` checks the values a producer gives for one field against its spec and
turns them into what a storage unit stores, so that a bad row is refused before
anything reaches the store. This module knows nothing about Ray or the network.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncflow.errors import SchemaError
from dataplane.codec import array_meta

_SPEC = re.compile(r"^\s*([a-z0-9]+)\s*(?:\[\s*([0-9*,\s]*)\s*\])?\s*$")
_NUMERIC = {
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128", "bfloat16",
}  # fmt: skip
_OBJECT = {"str", "bytes", "any"}


@dataclass(frozen=True, slots=True)
class FieldSpec:
    dtype: str
    shape: tuple[int | None, ...] = ()  # None: a variable dimension

    @classmethod
    def parse(cls, text: str, field: str = "?") -> FieldSpec:
        match = _SPEC.match(text) if isinstance(text, str) else None
        if match is None:
            raise SchemaError(
                f"field {field!r}: spec {text!r} is not of the form DTYPE or DTYPE[DIMS], "
                "e.g. 'int64[*]', 'float32', 'uint8[3,*,*]', 'str'"
            )
        dtype, dims = match.group(1), match.group(2)
        if dtype not in _NUMERIC | _OBJECT:
            raise SchemaError(
                f"field {field!r}: unknown dtype {dtype!r} in {text!r}; expected one of "
                f"{sorted(_NUMERIC | _OBJECT)}"
            )
        shape: tuple[int | None, ...] = ()
        if dims is not None and dims.strip():
            try:
                shape = tuple(None if d.strip() == "*" else int(d) for d in dims.split(","))
            except ValueError:
                raise SchemaError(f"field {field!r}: dims in {text!r} must be integers or '*'") from None
        if dtype in _OBJECT and shape:
            raise SchemaError(f"field {field!r}: {dtype!r} fields take no shape, got {text!r}")
        return cls(dtype, shape)

    def __str__(self) -> str:
        if not self.shape:
            return self.dtype
        return f"{self.dtype}[{','.join('*' if d is None else str(d) for d in self.shape)}]"

    @property
    def ragged(self) -> bool:
        return any(d is None for d in self.shape)

    @property
    def numeric(self) -> bool:
        return self.dtype in _NUMERIC


def parse_schema(fields: Mapping[str, str | FieldSpec]) -> dict[str, FieldSpec]:
    if not isinstance(fields, dict) or not fields:
        raise SchemaError(f"a schema is a non-empty mapping field -> spec, got {fields!r}")
    out = {}
    for name, spec in fields.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise SchemaError(f"field name {name!r} must be a Python identifier, e.g. 'response_ids'")
        out[name] = spec if isinstance(spec, FieldSpec) else FieldSpec.parse(spec, name)
    return out


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
    if spec.dtype in _OBJECT:
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
        rows = [_row_array(field, spec, v, i) for i, v in enumerate(value)]
        nbytes = [int(r.nbytes) for r in rows]
        if spec.ragged:
            return Column("r", None, rows, nbytes, [int(r.shape[0]) for r in rows])
        return Column("d", _stack(rows), [], nbytes, [0] * n_rows)
    raise SchemaError(
        f"field {field!r}: got {type(value).__name__}; expected an array with one row per sample or "
        f"a list of {n_rows} per-row values of {spec}"
    )


def _stack(rows: list[Any]) -> Any:
    if rows and not isinstance(rows[0], np.ndarray):
        import torch

        return torch.stack(rows)
    return np.stack(rows) if rows else np.empty(0)


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or type(value).__module__.startswith("torch")


def _row_array(field: str, spec: FieldSpec, value: Any, i: int) -> Any:
    if not _is_array(value):
        if spec.shape or not isinstance(value, int | float | bool | np.generic):
            raise SchemaError(
                f"field {field!r}, row {i}: got {type(value).__name__}; expected an array of {spec}"
            )
        if spec.dtype == "bfloat16":
            raise SchemaError(f"field {field!r}, row {i}: bfloat16 values must be torch tensors")
        # A plain number for a scalar field: cast only if the value survives the cast unchanged.
        arr = np.asarray(value, dtype=spec.dtype)
        if arr.item() != value and not (isinstance(value, float) and np.isnan(value)):
            raise SchemaError(f"field {field!r}, row {i}: {value!r} does not fit dtype {spec.dtype}")
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
            f"'{spec.dtype.replace(spec.dtype, dtype)}{str(spec)[len(spec.dtype) :]}'"
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
