"""Cells: every kind of field survives the trip to per-row bytes and back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asyncflow.errors import SchemaError
from dataplane.columns import to_column
from dataplane.redis.cells import (
    decode_column,
    decode_run,
    decode_value,
    encode_column,
    encode_run,
    encode_value,
)
from dataplane.schema import FieldSpec


@pytest.mark.parametrize(
    ("spec", "values"),
    [
        ("int64", np.array([3, -4])),
        ("float32[3]", np.arange(6, dtype=np.float32).reshape(2, 3)),
        ("int64[*]", [np.arange(5), np.arange(0)]),
        ("uint8[2,*]", [np.ones((2, 3), np.uint8), np.zeros((2, 1), np.uint8)]),
        ("uint8[*,*]", [np.ones((2, 3), np.uint8), np.zeros((4, 1), np.uint8)]),
        ("str", ["héllo", ""]),
        ("bytes", [b"\x00\x01", b""]),
        ("any", [{"k": [1, 2]}, None]),
    ],
)
@pytest.mark.parametrize("whole", [False, True], ids=["cells", "run"])
def test_columns_round_trip(spec, values, whole):
    """Per-row cells, and (as the Redis backend stores them) all cells back to back in one run."""
    field = FieldSpec.parse(spec)
    column = to_column("f", field, values, 2)
    if whole:
        run, lengths = encode_run(field, column, 2)
        back = decode_run(field, bytes(run), lengths * 2 if len(lengths) == 1 else lengths)
    else:
        back = decode_column(field, [bytes(c) for c in encode_column(field, column, 2)])
    if isinstance(back, np.ndarray):
        np.testing.assert_array_equal(back, values)
        assert back.dtype == np.dtype(field.dtype)
    else:
        for got, want in zip(back, values):
            assert (got == want).all() if isinstance(want, np.ndarray) else got == want
            assert getattr(got, "shape", None) == getattr(want, "shape", None)


def test_bfloat16_comes_back_as_torch():
    field = FieldSpec.parse("bfloat16[*]")
    cell = encode_value(field, torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
    back = decode_value(field, bytes(cell))
    assert back.dtype == torch.bfloat16 and back.tolist() == [1.5, -2.0]
    dense = FieldSpec.parse("bfloat16[2]")
    column = to_column("h", dense, torch.ones((3, 2), dtype=torch.bfloat16), 3)
    block = decode_column(dense, [bytes(c) for c in encode_column(dense, column, 3)])
    assert block.shape == (3, 2) and block.dtype == torch.bfloat16


def test_dense_cells_are_views_of_the_put_buffer():
    field = FieldSpec.parse("float32[4]")
    block = np.zeros((8, 4), np.float32)
    cells = encode_column(field, to_column("x", field, block, 8), 8)
    assert all(isinstance(c, memoryview) and c.nbytes == 16 for c in cells)
    block[1, 0] = 7.0
    assert np.frombuffer(cells[1], np.float32)[0] == 7.0  # no copy was made


def test_plain_ragged_rows_take_one_pass_and_match_the_row_by_row_path():
    """Native C-contiguous numpy rows are checked in one pass and concatenated in C; rows that are
    not (a strided view, big-endian, a torch tensor) go row by row, to the same bytes; a bad row
    among plain ones is still named."""
    field = FieldSpec.parse("int64[*]")
    plain = [np.arange(5), np.arange(0), np.arange(3) * 7]
    mixed = [(np.arange(10) // 2)[::2], np.arange(0).astype(">i8"), torch.arange(3) * 7]
    runs = [encode_run(field, to_column("ids", field, rows, 3), 3) for rows in (plain, mixed)]
    assert bytes(runs[0][0]) == bytes(runs[1][0]) == b"".join(r.tobytes() for r in plain)
    assert runs[0][1] == runs[1][1] == [40, 0, 24]
    with pytest.raises(SchemaError, match=r"field 'ids', row 2: dtype int32"):
        to_column("ids", field, [np.arange(2), np.arange(3), np.arange(4, dtype=np.int32)], 3)
    wide = FieldSpec.parse("float32[2,*]")
    with pytest.raises(SchemaError, match="row 1"):
        to_column("w", wide, [np.zeros((2, 3), np.float32), np.zeros((3, 3), np.float32)], 2)


def test_plain_numbers_of_a_scalar_field_take_one_array_and_bad_ones_are_named():
    """Python ints into an int64 field (bools into a bool one) become one array, the same cells as
    an array's; a float into an int field, an int beyond int64 or a float into a bool field still
    goes row by row, and the error names the row."""
    ints, flags = FieldSpec.parse("int64"), FieldSpec.parse("bool")
    for spec, values in ((ints, [3, -4, 2**62]), (flags, [True, False])):
        column = to_column("n", spec, values, len(values))
        as_array = to_column("n", spec, np.array(values, spec.dtype), len(values))
        assert encode_run(spec, column, len(values)) == encode_run(spec, as_array, len(values))
    for bad, row in (([1, 2.5], 1), ([1, 2, 2**70], 2), ([-(2**64), 1], 0)):
        with pytest.raises(SchemaError, match=rf"field 'n', row {row}: .* does not fit dtype int64"):
            to_column("n", ints, bad, len(bad))
    with pytest.raises(SchemaError, match=r"field 'f', row 1"):
        to_column("f", flags, [True, 0.5], 2)
