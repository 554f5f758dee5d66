"""A rollout call on an engine that batches concurrent calls writes each group to the store as soon
as its samples finish: reward reads the first groups while the slowest still generates."""

from __future__ import annotations

import asyncio

import pytest

from asyncflow.config import ModelConfig, RolloutConfig
from asyncflow.tasks.sorting import SortDigits
from dataplane.client import StoreClient
from dataplane.memory.local import serve_locally
from services.serving.simulated import SimulatedEngine
from workers.kinds import TokenKind
from workers.policy import make_tokenizer
from workers.rollout import RolloutWorker
from workers.samples import PARTITION, PROMPT_FIELDS, REWARD, ROLLOUT, ROLLOUT_FIELDS, SCHEMA, TRAINER, take
from workers.weights import WeightClient, WeightStore

pytestmark = pytest.mark.usefixtures("one_thread")
N, GROUPS = 2, 6


@pytest.mark.parametrize("batches_calls", [True, False])
async def test_groups_reach_the_store_as_they_finish_when_the_engine_batches_calls(batches_calls):
    address, stop = await serve_locally()
    store = await StoreClient.connect(address)
    try:
        await store.create_partition(PARTITION, SCHEMA, consumers=[ROLLOUT, REWARD, TRAINER])
        task = SortDigits()
        kind = TokenKind(make_tokenizer(task), ModelConfig(), RolloutConfig(max_new_tokens=60, n=N))
        engine = SimulatedEngine(
            vocab_size=len(kind.tokenizer), eos_token_id=kind.tokenizer.eos_token_id, time_per_token_s=0.01,
            min_tokens=2, alpha=0.8, seed=3,
        )  # fmt: skip
        engine.batches_calls = batches_calls  # as a continuous-batching server, or as one that is not
        weights = WeightClient(WeightStore(), remote=False)
        await weights.publish(0, {})
        worker = RolloutWorker(
            engine, store, weights, n=N, groups_per_call=GROUPS, params=kind.params(), kind=kind
        )
        examples = [task.example(i) for i in range(GROUPS)]
        prompts = kind.prompts(examples)["prompt_ids"]
        rows = range(GROUPS * N)
        await store.put(PARTITION, {
            "prompt_ids": [prompts[i // N] for i in rows], "prompt_index": [i // N for i in rows],
            "sample_index": [i % N for i in rows], "answer": [examples[i // N].answer for i in rows],
            "admit_version": [0] * len(rows), "info": [""] * len(rows),
        }, group_size=N)  # fmt: skip
        batch = await take(
            store, PROMPT_FIELDS, len(rows), ROLLOUT, unit=N, sampler="group", writes=ROLLOUT_FIELDS
        )
        assert len(batch) == len(rows)
        call = asyncio.ensure_future(worker.process(batch))
        fields = ["response_ids", "prompt_index", "sample_index"]
        first = await store.get(PARTITION, fields, len(rows), REWARD, min_rows=N)
        during = not call.done()  # the first group arrived while the call was still generating
        await call
        assert during == batches_calls
        assert len(first) == len(rows) or batches_calls  # one put per call unless the engine batches calls
        await store.ack(first)
        await store.ack(batch)
        got = first
        if len(first) < len(rows):
            rest = await store.get(PARTITION, fields, len(rows) - len(first), REWARD)
            assert set(first.rows).isdisjoint(rest.rows)
            got = first + rest
        assert len(got) == len(rows) == worker.stats["samples"]  # every row once, each with its response
        pairs = set(zip(got["prompt_index"].tolist(), got["sample_index"].tolist()))
        assert len(pairs) == len(rows) and all(len(r) > 0 for r in got["response_ids"])
    finally:
        await store.close()
        await stop()
