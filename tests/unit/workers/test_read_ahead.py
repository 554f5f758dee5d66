"""The trainer's read-ahead: the next batch is read between steps and used only under the same
version window; a read the window no longer admits is handed back, a cancelled one too, and a
failed one is read again by the step; against the real store served in this process (no Ray)."""

from __future__ import annotations

import asyncio

import pytest

from asyncflow.errors import StoreTimeout
from dataplane.client import StoreClient
from dataplane.config import DataPlaneConfig
from dataplane.memory.local import serve_locally
from workers.samples import PARTITION, TRAINER, ReadAhead

N = 2


@pytest.fixture
async def store():
    address, stop = await serve_locally(DataPlaneConfig(lease_s=30.0))
    client = await StoreClient.connect(address)
    await client.create_partition(PARTITION, {"prompt_index": "int64"}, consumers=[TRAINER])
    yield client
    await client.close()
    await stop()


def read(store, timeout_s: float | None = None):
    return lambda: store.get(PARTITION, ["prompt_index"], N, TRAINER, sampler="group", timeout_s=timeout_s)


async def put_group(store, prompt: int) -> None:
    await store.put(PARTITION, {"prompt_index": [prompt] * N}, group_size=N)


async def leased(store) -> int:
    return (await store.store_stats())["partitions"][PARTITION]["consumers"][TRAINER]["leased"]


async def test_the_read_waits_for_rows_between_steps_and_the_step_takes_it(store):
    ahead = ReadAhead(store)
    ahead.start(read(store), key=3)
    await asyncio.sleep(0.05)
    assert ahead.pending and await leased(store) == 0  # nothing to read yet: it waits
    await put_group(store, 7)
    await asyncio.sleep(0.05)
    assert await leased(store) == N  # read (and leased) before the step asks for it
    batch = await ahead.take(3)
    assert batch["prompt_index"].tolist() == [7, 7] and not ahead.pending
    await store.ack(batch)
    assert await ahead.take(3) is None  # nothing read ahead: the step reads itself


async def test_a_read_under_another_window_is_handed_back_unused(store):
    await put_group(store, 1)
    ahead = ReadAhead(store)
    ahead.start(read(store), key=3)
    assert await ahead.take(4) is None  # the staleness bound was steered: not this read
    assert await leased(store) == 0
    batch = await read(store)()  # the rows are there for the step's own read
    assert batch["prompt_index"].tolist() == [1, 1]
    await store.ack(batch)


async def test_a_cancelled_read_leaves_no_lease_and_a_failed_one_is_read_again(store):
    ahead = ReadAhead(store)
    ahead.start(read(store, timeout_s=0.1), key=0)
    with pytest.raises(StoreTimeout):
        await read(store, timeout_s=0.2)()  # (the read ahead times out meanwhile)
    assert await ahead.take(0) is None  # it failed: the step reads again
    ahead.start(read(store), key=0)
    await asyncio.sleep(0.05)
    ahead.cancel()  # the trainer closes
    await put_group(store, 5)
    await asyncio.sleep(0.05)
    assert await leased(store) == 0 and not ahead.pending
    batch = await read(store)()
    assert batch["prompt_index"].tolist() == [5, 5]
    await store.ack(batch)
