"""Bucketed weight transfer and the weight store, without Ray."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from asyncflow.errors import WorkerError
from services.parallelism.buckets import Slot, flatten, unflatten
from workers.weights import WeightClient, WeightStore


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed": torch.randn(10, 4, generator=g),
        "norm": torch.randn(4, generator=g).to(torch.bfloat16),
        "steps": torch.arange(7),
        "big": torch.randn(64, 8, generator=g),  # larger than a bucket: gets one of its own
    }


def test_flatten_round_trips_every_dtype_through_read_only_buffers():
    state = _state()
    slots, buckets = flatten(state, bucket_bytes=256)
    assert [s.name for s in slots] == list(state)
    assert [len(b) for b in buckets] == [160 + 8 + 56, 2048]  # small ones share a bucket; big alone
    assert all(b.dtype == np.uint8 for b in buckets)
    frozen = [b.copy() for b in buckets]
    for b in frozen:
        b.setflags(write=False)  # what Ray's object store hands out
    wire = [Slot.from_wire(s.to_wire()) for s in slots]
    out = unflatten(wire, frozen)
    for name, t in state.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t)


def test_flatten_rejects_a_nonpositive_bucket():
    with pytest.raises(ValueError, match="bucket_bytes"):
        flatten(_state(), 0)


async def test_weight_store_keeps_recent_versions_and_wakes_waiters():
    store = WeightStore(keep_versions=2)
    client = WeightClient(store, remote=False, bucket_mb=0.001)
    assert await client.latest() == -1
    waiter = asyncio.ensure_future(client.wait_version(1, timeout_s=5))
    await client.publish(0, _state())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in _state().items()}
    await client.publish(1, changed)
    assert await waiter == 1
    version, tensors = await client.pull(0)
    assert version == 1 and torch.equal(tensors["embed"], changed["embed"])
    await client.publish(2, _state())
    assert sorted(store._versions) == [1, 2]  # version 0 was freed
    with pytest.raises(WorkerError, match="versions only grow"):
        await client.publish(2, _state())
    with pytest.raises(TimeoutError):
        await client.wait_version(9, timeout_s=0.05)
