"""Columns: one field's values for many rows, in the shape they travel in.

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
from collections.abc import Sequence
from typing import Any

import numpy as np

from dataplane.schema import Column, FieldSpec


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
        if self.kind == "d":
            return int(self.data.nbytes) // max(len(self.data), 1)
        if self.kind == "r":
            return (
                (self.offsets[i + 1] - self.offsets[i]) * self.data.element_size()
                if _is_tensor(self.data)
                else (self.offsets[i + 1] - self.offsets[i]) * self.data.itemsize
            )
        value = self.data[i]
        return len(value) if isinstance(value, str | bytes) else 0

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


def split(wire: list) -> list[Any]:
    """Per-row cells of a received column: views into its buffers, no copies."""
    kind = wire[0]
    if kind == "d":
        block = wire[1]
        return [block[i, ...] for i in range(len(block))]  # `...` keeps 0-d rows arrays, not scalars
    if kind == "r":
        flat, shapes = wire[1], wire[2]
        cells, offset = [], 0
        for shape in shapes:
            size = math.prod(shape)
            cells.append(flat[offset : offset + size].reshape(shape))
            offset += size
        return cells
    return list(wire[1])


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
    """One value per row from a column of any kind."""
    return split(wire) if wire[0] in ("d", "r") else list(wire[1])


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
