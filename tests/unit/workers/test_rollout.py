"""RolloutWorker's partial rollout: a version published mid-call reaches the engine mid-call."""

from __future__ import annotations

import asyncio

import pytest

from services.models import EOS_ID, PAD_ID, build_model
from services.serving import Request, SamplingParams
from services.serving.torch_engine import TorchEngine
from workers.rollout import RolloutWorker
from workers.weights import WeightClient, WeightStore

VOCAB = 40


@pytest.mark.parametrize("partial", [True, False])
async def test_a_version_published_mid_call_is_loaded_only_with_partial_rollout(partial):
    weights = WeightClient(WeightStore(), remote=False)
    await weights.publish(0, build_model(VOCAB, seed=0).state_dict())
    engine = TorchEngine(build_model(VOCAB, seed=2), eos_token_id=EOS_ID, pad_token_id=PAD_ID, version=-1)
    worker = RolloutWorker(
        engine, None, weights, n=2, groups_per_call=4, params=SamplingParams(max_new_tokens=40),
        kind=None, partial_rollout=partial,  # no store: the kind (what rows hold) is never asked
    )  # fmt: skip
    await worker.sync_weights(0)
    requests = [Request(f"{i}", [1, 3 + i], 2, worker.params) for i in range(8)]
    call = asyncio.ensure_future(worker._generate(requests))
    for _ in range(4):  # the torch engine yields once per decode step
        await asyncio.sleep(0)
    await weights.publish(1, build_model(VOCAB, seed=1).state_dict())
    out = await call
    versions = {v for c in out for v in c.versions}
    if partial:
        assert worker.stats["mid_call_syncs"] == 1 and engine.version == 1
        assert versions == {0, 1}
        assert all(c.versions == sorted(c.versions) for c in out)
    else:
        assert worker.stats["mid_call_syncs"] == 0 and engine.version == 0
        assert versions == {0}


async def test_a_version_refused_mid_call_is_not_retried_and_the_call_goes_on():
    store = WeightStore()
    weights = WeightClient(store, remote=False, bucket_mb=0.01)
    await weights.publish(0, build_model(VOCAB, seed=0).state_dict())
    engine = TorchEngine(build_model(VOCAB, seed=2), eos_token_id=EOS_ID, pad_token_id=PAD_ID, version=-1)
    worker = RolloutWorker(
        engine, None, weights, n=2, groups_per_call=4, params=SamplingParams(max_new_tokens=40),
        kind=None, partial_rollout=True,
    )  # fmt: skip
    await worker.sync_weights(0)
    requests = [Request(f"{i}", [1, 3 + i], 2, worker.params) for i in range(8)]
    call = asyncio.ensure_future(worker._generate(requests))
    for _ in range(4):
        await asyncio.sleep(0)
    await weights.publish(1, build_model(VOCAB, seed=1).state_dict())
    ((_, buckets),) = store._versions[1][0]
    buckets[0][0][0] ^= 1  # one flipped bit in the stored version
    out = await asyncio.wait_for(call, timeout=60)  # the loop waits for version 2, not spinning on 1
    assert {v for c in out for v in c.versions} == {0}
    assert worker.stats["rejected_versions"] == 1 and worker.stats["mid_call_syncs"] == 0
    assert engine.version == 0


async def test_a_health_probe_answers_beside_a_call_in_flight():
    from asyncflow.config import ModelConfig, RolloutConfig
    from asyncflow.tasks.sorting import SortDigits
    from workers.kinds import TokenKind
    from workers.policy import make_tokenizer

    task = SortDigits()
    tokenizer = make_tokenizer(task)
    kind = TokenKind(tokenizer, ModelConfig(), RolloutConfig(max_new_tokens=4))
    model = build_model(len(tokenizer), seed=0)
    engine = TorchEngine(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=PAD_ID, version=0)
    worker = RolloutWorker(
        engine, None, None, n=2, groups_per_call=4, params=kind.params(), kind=kind  # no store, no weights
    )  # fmt: skip
    prompt = kind.prompts([task.example(0)])[kind.prompt_field][0]
    call = asyncio.ensure_future(
        engine.generate([kind.request(f"{i}", prompt, 2, worker.params) for i in range(8)])
    )
    await asyncio.sleep(0)  # the call is decoding
    seconds = await worker.probe(task.example(1))
    assert 0 < seconds < 30
    assert len(await call) == 16  # the call in flight is not disturbed
