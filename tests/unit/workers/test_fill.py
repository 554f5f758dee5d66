"""fill: a batch that comes back after a resume with some rows already written is written once."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from asyncflow.errors import SchemaError
from dataplane.batch import Batch, ClientStats
from workers.samples import PARTITION, fill


class WriteOnceStore:
    """A field is written once per row, and a put that repeats one stores nothing (as the stores do)."""

    def __init__(self, written: dict[int, float]):
        self.written = dict(written)
        self.stats = ClientStats()

    async def put(self, partition, data, rows=None, **kw):
        assert partition == PARTITION
        index = rows.rows if isinstance(rows, Batch) else list(rows)
        if any(r in self.written for r in index):
            raise SchemaError(
                f"partition {partition!r}, row {index[0]}: fields ['reward'] were already written"
            )
        self.written.update(zip(index, (float(x) for x in data["reward"])))
        return index


def _batch(rows: list[int]) -> Batch:
    n = len(rows)
    return Batch(PARTITION, "reward", rows, {}, [0] * n, [0] * n, [0] * n, [1] * n)


def test_rows_written_before_the_checkpoint_keep_their_values_the_rest_are_written():
    store = WriteOnceStore({11: 0.5})  # row 11's reward was written before the checkpoint
    batch = _batch([10, 11, 12])
    asyncio.run(fill(store, {"reward": np.asarray([1.0, 2.0, 3.0], np.float32)}, batch))
    assert store.written == {10: 1.0, 11: 0.5, 12: 3.0}


def test_other_refusals_still_fail():
    class Refusing(WriteOnceStore):
        async def put(self, *args, **kw):
            raise SchemaError("field 'reward' wants float32, got str")

    with pytest.raises(SchemaError, match="wants float32"):
        asyncio.run(fill(Refusing({}), {"reward": ["x"]}, _batch([1])))
