"""Cells: one field of one row as the bytes a key-value backend stores, and back.

A column checked by `dataplane.columns.to_column` is cut into one byte string per row,
and the cells of a read are put back together into what the schema promises (a dense
field is one (n, ...) array, a ragged one a list of arrays, objects a list of values):

    numeric, one or no `*` dim   the row's raw bytes (native order); the shape follows from
                                 the spec and the byte count
    numeric, several `*` dims    uint32 per `*` dim, then the raw bytes
    str / bytes                  utf-8 / the bytes themselves
    any                          a codec blob (`dataplane.codec.pack`: msgpack + raw buffers)

Dense rows are views of the put's buffer, not copies. bfloat16 fields come back as torch
tensors, every other numeric field as numpy arrays. No pickle. Knows nothing about Redis.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from dataplane.codec import array_from, array_meta, pack, unpack
from dataplane.columns import Column
from dataplane.schema import FieldSpec

Cell = bytes | memoryview


def _kind(spec: FieldSpec) -> str:
    return "torch" if spec.dtype == "bfloat16" else "numpy"


def _itemsize(spec: FieldSpec) -> int:
    return 2 if spec.dtype == "bfloat16" else np.dtype(spec.dtype).itemsize


def encode_column(spec: FieldSpec, column: Column, n: int) -> list[Cell]:
    """One cell per row of a checked column."""
    if column.kind == "d":
        _, _, _, raw = array_meta(column.block)
        step = len(raw) // max(n, 1)
        return [raw[i * step : (i + 1) * step] for i in range(n)]
    if column.kind == "r":
        return [encode_value(spec, row) for row in column.rows]
    return [encode_value(spec, value) for value in column.rows]


def encode_run(spec: FieldSpec, column: Column, n: int) -> tuple[Cell, list[int]]:
    """The cells of a checked column back to back, and their byte lengths (one length when every
    cell has it): what a key-value backend stores as one value. A dense column is its buffer as is."""
    if column.kind == "d":
        _, _, _, raw = array_meta(column.block)
        return raw, [len(raw) // max(n, 1)]
    if _plain_ragged(spec, column.rows):  # the rows' raw bytes back to back: one concatenation in C
        lengths = [row.nbytes for row in column.rows]
        return b"".join(column.rows), lengths[:1] if len(set(lengths)) == 1 else lengths
    cells = encode_column(spec, column, n)
    lengths = [len(c) for c in cells]
    return b"".join(cells), lengths[:1] if len(set(lengths)) == 1 else lengths


def _plain_ragged(spec: FieldSpec, rows: Sequence[Any]) -> bool:
    """A numeric field with one `*` dim whose rows are C-contiguous numpy arrays in native byte order:
    each row's cell is its raw bytes (`encode_value`), so the run is the rows concatenated."""
    if not (spec.numeric and _kind(spec) == "numpy" and sum(d is None for d in spec.shape) == 1 and rows):
        return False
    return all(type(r) is np.ndarray and r.flags.c_contiguous and r.dtype.isnative for r in rows)


def encode_value(spec: FieldSpec, value: Any) -> Cell:
    """One row's value (an array of the spec's shape, or a str / bytes / any value) as a cell."""
    if spec.dtype == "str":
        return value.encode()
    if spec.dtype == "bytes":
        return bytes(value)
    if spec.dtype == "any":
        return pack(value)
    _, shape, _, raw = array_meta(value)
    var = (
        [d for d, s in zip(shape, spec.shape) if s is None] if sum(s is None for s in spec.shape) > 1 else []
    )
    return struct.pack(f"<{len(var)}I", *var) + bytes(raw) if var else raw


def decode_value(spec: FieldSpec, cell: Cell) -> Any:
    if spec.dtype == "str":
        return str(cell, "utf-8")
    if spec.dtype == "bytes":
        return bytes(cell)
    if spec.dtype == "any":
        return unpack(cell)
    return array_from(*_array_parts(spec, cell), _kind(spec))


def _array_parts(spec: FieldSpec, cell: Cell) -> tuple[Any, str, tuple[int, ...]]:
    nvar = sum(d is None for d in spec.shape)
    if nvar > 1:
        var = iter(struct.unpack_from(f"<{nvar}I", cell))
        return (
            memoryview(cell)[4 * nvar :],
            spec.dtype,
            tuple(next(var) if d is None else d for d in spec.shape),
        )
    if nvar == 1:
        fixed = math.prod(d for d in spec.shape if d is not None) * _itemsize(spec)
        free = len(cell) // fixed if fixed else 0
        return cell, spec.dtype, tuple(free if d is None else d for d in spec.shape)
    return cell, spec.dtype, tuple(d for d in spec.shape if d is not None)


def decode_column(spec: FieldSpec, cells: Sequence[Cell]) -> Any:
    """The cells of n rows of one field, in the schema's form (see `dataplane.columns.assemble`)."""
    if spec.numeric and not spec.ragged:
        return decode_dense(spec, b"".join(cells), len(cells))
    if spec.numeric and _kind(spec) == "numpy" and sum(d is None for d in spec.shape) == 1:
        # The common ragged field (token ids, log-probs): a plain view per row, 18x faster than
        # the checked path, which only multi-`*` and bfloat16 fields need.
        dtype = np.dtype(spec.dtype)
        if len(spec.shape) == 1:
            return [np.frombuffer(cell, dtype) for cell in cells]
        return [np.frombuffer(cell, dtype).reshape(_array_parts(spec, cell)[2]) for cell in cells]
    return [decode_value(spec, cell) for cell in cells]


def decode_dense(spec: FieldSpec, cells: Cell, n: int) -> Any:
    """n rows of a dense numeric field from their cells back to back, as one array (no copy)."""
    shape = tuple(d for d in spec.shape if d is not None)
    return array_from(cells, spec.dtype, (n, *shape), _kind(spec))


def decode_run(spec: FieldSpec, run: Cell, lengths: Sequence[int]) -> Any:
    """Like decode_column, from the cells back to back in `run` (byte lengths `lengths`): views of
    `run`, cut as one array where the field allows (dense, or ragged numeric with one `*`)."""
    if spec.numeric and not spec.ragged:
        return decode_dense(spec, run, len(lengths))
    if spec.numeric and _kind(spec) == "numpy" and len(spec.shape) == 1:
        dtype = np.dtype(spec.dtype)
        flat, out, at = np.frombuffer(run, dtype), [], 0
        for size in lengths:
            out.append(flat[at : at + size // dtype.itemsize])
            at += size // dtype.itemsize
        return out
    view, cells, at = memoryview(run), [], 0
    for size in lengths:
        cells.append(view[at : at + size])
        at += size
    return decode_column(spec, cells)


async def read_columns(
    wire: Any, key: str, wanted: list[tuple[int, FieldSpec]], cols: list[tuple], n: int
) -> tuple[list | None, int]:
    """The columns of fields `wanted` (bit, spec) of n rows whose metadata is `cols` by item: one
    GETRANGE per run of adjacent cells of a chunk (rows are put and got in order, so mostly one
    per field), all in one round trip. None if a chunk is gone (its field was regenerated)."""
    plans, reads = [], []
    for b, _ in wanted:
        plan = cell_runs(*cols[8 + 3 * b : 11 + 3 * b]) if n else ([], None)
        if plan is None:
            return None, 0
        reads += [(f"{key}:x:{chunk}:{b}", begin, end) for chunk, begin, end, _ in plan[0] if end > begin]
        plans.append(plan)
    replies = iter(await wire.getranges(reads) if reads else [])
    columns = []
    for (_, spec), (runs, sizes) in zip(wanted, plans):
        if sizes is not None:  # one run in row order: the column's cells back to back
            chunk, begin, end, _ = runs[0]
            data = next(replies) if end > begin else b""
            if len(data) != end - begin:
                return None, 0
            columns.append(decode_run(spec, data, sizes))
            continue
        cells: list = [b""] * n
        for _, begin, end, members in runs:
            data = next(replies) if end > begin else b""
            if len(data) != end - begin:
                return None, 0
            view = memoryview(data)
            for pos, off, size in members:
                cells[pos] = view[off - begin : off - begin + size]
        columns.append(decode_column(spec, cells))
    return columns, sum(end - begin for _, begin, end in reads)  # each cell is in one read


def array_header(n: int) -> bytes:
    """msgpack's header of an array of n items: with n packed items after it, one packed array."""
    if n < 16:
        return bytes([0x90 | n])
    return b"\xdc" + n.to_bytes(2, "big") if n < 1 << 16 else b"\xdd" + n.to_bytes(4, "big")


def cell_runs(
    chunks: Sequence[str], offsets: Sequence[int], sizes: Sequence[int]
) -> tuple[list[tuple[str, int, int, list]], Sequence[int] | None] | None:
    """Where the cells of one field are (row i's: chunk, offset, length), as runs of adjacent cells:
    (chunk, first byte, end byte, [(row position, offset, length), ...]), and, if they are one run
    in row order, the cells' lengths (the members are then not listed). None if a row has no cell
    (chunk '')."""
    if chunks and chunks[0] and chunks.count(chunks[0]) == len(chunks):  # mostly: one put's rows in order
        if list(offsets) == list(itertools.accumulate(sizes[:-1], initial=offsets[0])):
            return [(chunks[0], offsets[0], offsets[-1] + sizes[-1], [])], sizes
    runs: list = []
    for chunk, off, size, pos in sorted(zip(chunks, offsets, sizes, range(len(chunks)))):
        if not chunk:
            return None
        if runs and runs[-1][0] == chunk and runs[-1][2] == off:
            runs[-1][2] = off + size
            runs[-1][3].append((pos, off, size))
        else:
            runs.append([chunk, off, off + size, [(pos, off, size)]])
    return [tuple(r) for r in runs], None
