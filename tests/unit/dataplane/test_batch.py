"""Joining two batches of one consumer."""

from __future__ import annotations

import numpy as np
import pytest

from asyncflow.errors import SchemaError
from dataplane.batch import Batch


def _batch(rows, consumer="c"):
    n = len(rows)
    data = {
        "x": np.array(rows, dtype=np.int64),
        "ids": [np.arange(r) for r in rows],
        "s": [str(r) for r in rows],
    }
    return Batch("p", consumer, list(rows), data, [0] * n, list(rows), [1] * n, [r for r in rows])


def test_sum_keeps_rows_fields_and_metadata_aligned():
    joined = _batch([1, 2]) + _batch([5])
    assert joined.rows == [1, 2, 5] and joined.groups == [1, 2, 5] and joined.lengths == [1, 2, 5]
    assert joined["x"].tolist() == [1, 2, 5] and joined["s"] == ["1", "2", "5"]
    assert [len(a) for a in joined["ids"]] == [1, 2, 5]


def test_batches_of_different_consumers_do_not_join():
    with pytest.raises(SchemaError, match="cannot join"):
        _batch([1]) + _batch([2], consumer="other")
