"""Partition schemas: which fields a row has, with what dtype and shape.

A field spec is written as a string: `"int64[*]"` (a 1-D array of any length),
`"float32"` (a scalar), `"uint8[3,*,*]"`, `"bfloat16[*]"` (torch only), or one of
`"str"`, `"bytes"`, `"any"` (any value the codec can encode). `*` marks a variable
dimension; rows of such a field are ragged and travel as a list of arrays.

This module knows nothing about values, Ray or the network; `dataplane.columns` checks
values against a spec.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from dataplane.errors import SchemaError

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
