"""PromptSource: admission within the staleness bound, pause and resume, a new bound; against the
real store served in this process (no Ray)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from asyncflow.config import ModelConfig, RolloutConfig
from asyncflow.tasks.sorting import SortDigits
from dataplane.client import StoreClient
from dataplane.memory.local import serve_locally
from workers.kinds import TokenKind
from workers.policy import make_tokenizer
from workers.samples import ADMISSION, DROPPED, DROPPED_SCHEMA, PARTITION, SCHEMA
from workers.source import PromptSource
from workers.weights import WeightClient, WeightStore


@pytest.fixture
async def store():
    address, stop = await serve_locally()
    client = await StoreClient.connect(address)
    await client.create_partition(PARTITION, SCHEMA, consumers=["trainer"])
    yield client
    await client.close()
    await stop()


async def settle(source: PromptSource, expect: int) -> None:
    """Wait until the source admitted `expect` prompts, then check it admits no more meanwhile."""
    for _ in range(2000):  # up to 20 s on a loaded machine; returns as soon as the count is reached
        if source.cursor >= expect:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    assert source.cursor == expect


async def test_admission_follows_the_trainer_version_and_the_bound(store):
    task = SortDigits()
    kind = TokenKind(make_tokenizer(task), ModelConfig(), RolloutConfig(n=2))
    weights = WeightClient(WeightStore(), remote=False)
    source = PromptSource(task, kind, store, weights, n=2, batch_prompts=3, staleness=1, prompts_per_put=2)
    tensors = {"w": torch.zeros(2)}
    await weights.publish(0, tensors)
    running = asyncio.ensure_future(source.run())
    try:
        await settle(source, 6)  # (version 0 + k 1 + 1) x 3 prompts
        stats = (await store.store_stats())["partitions"][PARTITION]
        assert stats["rows"] == 12  # n = 2 rows per prompt
        await weights.publish(1, tensors)
        await settle(source, 9)  # one more batch per published version
        assert await source.pause() == 9
        await weights.publish(2, tensors)
        await settle(source, 9)  # paused: nothing admitted
        source.set_staleness(0)  # the bound from version 2 with k = 0: (2 + 0 + 1) x 3 = 9
        source.resume()
        await settle(source, 9)
        source.set_staleness(2)
        await weights.publish(3, tensors)
        await settle(source, 18)  # (3 + 2 + 1) x 3
        batch = await store.get(PARTITION, ["prompt_index", "sample_index", "admit_version"], 36, "trainer")
        assert sorted(batch["prompt_index"].tolist()) == sorted(list(range(18)) * 2)
        assert sorted(batch["sample_index"].tolist()) == [0, 1] * 18 or set(
            batch["sample_index"].tolist()
        ) == {0, 1}
        assert max(batch["admit_version"].tolist()) == 3
        await store.ack(batch)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_each_dropped_group_frees_a_slot_and_a_pause_holds_the_notes_unread(store):
    """Dynamic sampling: a note in DROPPED admits one more prompt at the same version; paused, the
    source reads none (a checkpoint holds them unread and `freed` without them)."""
    await store.create_partition(DROPPED, DROPPED_SCHEMA, consumers=[ADMISSION])
    task = SortDigits()
    kind = TokenKind(make_tokenizer(task), ModelConfig(), RolloutConfig(n=2))
    weights = WeightClient(WeightStore(), remote=False)
    source = PromptSource(
        task, kind, store, weights, n=2, batch_prompts=3, staleness=0, dynamic_sampling=True
    )
    await weights.publish(0, {"w": torch.zeros(2)})
    running = asyncio.ensure_future(source.run())
    try:
        await settle(source, 3)  # (0 + 0 + 1) x 3
        await store.put(DROPPED, {"prompt_index": [0, 2], "version": [0, 0]})
        await settle(source, 5)  # two slots freed at version 0
        assert source.freed == 2
        assert await source.pause() == 5
        await store.put(DROPPED, {"prompt_index": [3], "version": [0]})
        await settle(source, 5)
        assert source.freed == 2
        stats = (await store.store_stats())["partitions"][DROPPED]["consumers"][ADMISSION]
        assert stats["leased"] == 0  # handed back, not held across the pause
        source.resume()
        await settle(source, 6)
        assert source.freed == 3
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    restarted = PromptSource(task, kind, store, weights, n=2, batch_prompts=3, staleness=0, cursor=6, freed=3)
    running = asyncio.ensure_future(restarted.run())
    try:
        await settle(restarted, 6)  # a resumed source counts the freed slots it was given, no more
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_admit_ahead_pauses_admission_while_the_trainer_has_batches_waiting(store):
    """admit_ahead = 1: the source stops once a batch's rows wait for the trainer (far below the
    staleness bound of k = 4) and admits again when the trainer took them and published."""
    from asyncflow.errors import StoreTimeout

    task = SortDigits()
    kind = TokenKind(make_tokenizer(task), ModelConfig(), RolloutConfig(n=2))
    weights = WeightClient(WeightStore(), remote=False)
    with pytest.raises(StoreTimeout):  # the trainer asks first: the store learns which fields it reads
        await store.get(PARTITION, ["prompt_index"], 1, "trainer", timeout_s=0.05)
    source = PromptSource(
        task, kind, store, weights, n=2, batch_prompts=3, staleness=4, prompts_per_put=2, admit_ahead=1
    )
    tensors = {"w": torch.zeros(2)}
    await weights.publish(0, tensors)
    running = asyncio.ensure_future(source.run())
    try:
        await settle(source, 4)  # 4 prompts = 8 ready rows >= 1 batch of 3 x 2: no more
        batch = await store.get(PARTITION, ["prompt_index"], 6, "trainer")
        await store.ack(batch)  # 2 rows still wait: fewer than a batch
        await weights.publish(1, tensors)
        await settle(source, 6)
        source.admit_ahead = None  # as far as the bound allows: (1 + 4 + 1) x 3
        await weights.publish(2, tensors)
        await settle(source, 21)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_admit_ahead_turned_off_while_the_stats_are_read_admits_on(store):
    """Setting admit_ahead to None while the source awaits the store's stats (the race
    that once ended the source's task with a TypeError) leaves it admitting up to the bound."""
    task = SortDigits()
    kind = TokenKind(make_tokenizer(task), ModelConfig(), RolloutConfig(n=2))
    weights = WeightClient(WeightStore(), remote=False)
    source = PromptSource(task, kind, store, weights, n=2, batch_prompts=3, staleness=0, admit_ahead=1)
    read_stats = store.store_stats

    async def stats_then_turn_off() -> dict:
        stats = await read_stats()
        source.admit_ahead = None  # lands while _wanted awaits these stats
        return stats

    store.store_stats = stats_then_turn_off
    await weights.publish(0, {"w": torch.zeros(2)})
    running = asyncio.ensure_future(source.run())
    try:
        await settle(source, 3)  # (0 + 0 + 1) x 3: the bound, reached with admit_ahead off
        assert not running.done()
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
