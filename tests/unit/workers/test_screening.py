"""Screening (dynamic sampling): a step keeps the groups whose rewards differ, drops the others
(a note in DROPPED, then acked) and reads on until it holds its batch; against the real store
served in this process (no Ray)."""

from __future__ import annotations

import asyncio

import pytest

from asyncflow.errors import WorkerError
from dataplane.client import StoreClient
from dataplane.config import DataPlaneConfig
from dataplane.memory.local import serve_locally
from workers.samples import ADMISSION, DROPPED, DROPPED_SCHEMA, PARTITION, TRAINER
from workers.screening import take_with_signal

FIELDS = ["prompt_index", "sample_index", "reward"]
N = 2


@pytest.fixture
async def store():
    address, stop = await serve_locally(DataPlaneConfig(lease_s=0.6))
    client = await StoreClient.connect(address)
    schema = {"prompt_index": "int64", "sample_index": "int64", "reward": "float32"}
    await client.create_partition(PARTITION, schema, consumers=[TRAINER])
    await client.create_partition(DROPPED, DROPPED_SCHEMA, consumers=[ADMISSION])
    yield client
    await client.close()
    await stop()


async def put_groups(store, first: int, rewards: list[list[float]]) -> None:
    await store.put(
        PARTITION,
        {"prompt_index": [first + g for g, group in enumerate(rewards) for _ in group],
         "sample_index": [j for group in rewards for j in range(len(group))],
         "reward": [r for group in rewards for r in group]},
        group_size=N,
    )  # fmt: skip


async def test_uniform_groups_are_dropped_noted_and_acked_and_the_step_reads_on(store):
    await put_groups(store, 0, [[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.5, 0.25]])
    take = asyncio.ensure_future(take_with_signal(store, FIELDS, 3, N, v_min=0, version=4, max_drops=8))
    await asyncio.sleep(0.3)
    assert not take.done(), "two groups with signal of three: it waits for a third"
    await put_groups(store, 4, [[0.0, 0.0], [0.0, 1.0]])  # one more uniform, one with signal
    screened = await asyncio.wait_for(take, 10)
    batch = screened.batch
    assert sorted(set(batch["prompt_index"].tolist())) == [0, 3, 5]
    assert len(batch) == 3 * N
    assert screened.dropped_groups == 3
    assert sorted(map(tuple, screened.dropped)) == [(1, 0), (1, 1), (2, 0), (2, 1), (4, 0), (4, 1)]
    notes = await store.get(DROPPED, ["prompt_index", "version"], 10, ADMISSION, min_rows=1, timeout_s=1)
    assert sorted(notes["prompt_index"].tolist()) == [1, 2, 4]
    assert set(notes["version"].tolist()) == {4}
    stats = (await store.store_stats())["partitions"][PARTITION]["consumers"][TRAINER]
    assert (stats["acked"], stats["leased"]) == (3 * N, 3 * N)  # dropped: consumed; kept: held
    await store.ack(batch)  # the step's ack: held all along
    with pytest.raises(Exception):  # noqa: B017 (any store error: nothing is left to hand out)
        await store.get(PARTITION, FIELDS, N, TRAINER, timeout_s=0.2)


async def test_the_held_groups_stay_leased_while_the_step_waits_longer_than_a_lease(store):
    await put_groups(store, 0, [[1.0, 0.0]])
    take = asyncio.ensure_future(take_with_signal(store, FIELDS, 2, N, v_min=0, version=0, max_drops=8))
    await asyncio.sleep(2.0)  # more than three leases of 0.6 s
    await put_groups(store, 1, [[0.0, 1.0]])
    screened = await asyncio.wait_for(take, 10)
    assert sorted(screened.batch["prompt_index"].tolist()) == [0, 0, 1, 1]  # group 0 not redelivered
    await store.ack(screened.batch)


async def test_past_the_bound_it_fails_naming_the_option_and_the_fix(store):
    await put_groups(store, 0, [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    with pytest.raises(WorkerError, match=r"dynamic_sampling dropped 3 groups.*= 2.*max_dropped_batches"):
        await take_with_signal(store, FIELDS, 1, N, v_min=0, version=0, max_drops=2)
