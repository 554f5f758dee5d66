"""The scheduled torch engine: preemption under a KV budget, with the KV kept on the host or
recomputed, produces exactly the tokens of an uninterrupted run; priorities decide who runs;
weight updates never mix versions within a step."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.models import EOS_ID, PAD_ID, build_model
from services.serving import Engine, Request, SamplingParams
from services.serving.torch_engine import TorchEngine
from services.serving.torch_scheduled import ScheduledTorchEngine

VOCAB = 20
GREEDY = SamplingParams(top_k=1, max_new_tokens=12)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_a():
    return build_model(VOCAB, seed=0)


def engine_for(model, **kwargs) -> ScheduledTorchEngine:
    return ScheduledTorchEngine(model, eos_token_id=EOS_ID, pad_token_id=PAD_ID, **kwargs)


def requests(count: int = 6, params: SamplingParams = GREEDY) -> list[Request]:
    """Prompts of 1..5 tokens, two samples each."""
    return [
        Request(f"r{i}", [3 + (i * 7 + j) % 17 for j in range(1 + i % 5)], 2, params) for i in range(count)
    ]


@pytest.mark.parametrize("keep_kv", [True, False])
async def test_preempt_then_resume_gives_the_uninterrupted_tokens(model_a, keep_kv):
    whole = engine_for(model_a)
    expected = await whole.generate(requests())
    assert whole.stats["preemptions"] == 0
    squeezed = engine_for(model_a, kv_budget_tokens=40, keep_kv=keep_kv)
    got = await squeezed.generate(requests())
    assert [c.response_ids for c in got] == [c.response_ids for c in expected]
    for a, b in zip(got, expected):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    stats = squeezed.stats
    assert stats["preemptions"] > 0
    if keep_kv:  # restored from the host: nothing computed twice
        assert stats["restores"] == stats["preemptions"] and stats["recomputed_tokens"] == 0
        assert stats["host_kv_bytes"] > 0 and stats["prefill_tokens"] == whole.stats["prefill_tokens"]
    else:
        assert stats["restores"] == 0 and stats["recomputed_tokens"] > 0
        extra = stats["prefill_tokens"] - whole.stats["prefill_tokens"]
        assert extra == stats["recomputed_tokens"]  # every recomputed token is counted


async def test_same_tokens_as_the_unscheduled_engine(model_a):
    torch_engine = TorchEngine(model_a, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    assert isinstance(engine_for(model_a), Engine)
    expected = [c.response_ids for c in await torch_engine.generate(requests())]
    assert [
        c.response_ids for c in await engine_for(model_a, max_batch_size=3).generate(requests())
    ] == expected


async def finish_order(engine: ScheduledTorchEngine, batch: list[Request]) -> list[str]:
    order: list[str] = []

    async def one(request: Request) -> None:
        await engine.generate([request])
        order.append(request.request_id)

    await asyncio.gather(*(one(r) for r in batch))
    return order


async def test_one_row_runs_groups_by_priority(model_a):
    params = SamplingParams(top_k=1, max_new_tokens=4)
    batch = [Request(f"g{i}", [5, 6], 1, params, priority=(p,)) for i, p in enumerate([3, 1, 2])]
    assert await finish_order(engine_for(model_a, max_batch_size=1), batch) == ["g1", "g2", "g0"]
    fcfs = engine_for(model_a, max_batch_size=1, policy="fcfs")  # ignores the callers' priorities
    assert await finish_order(fcfs, batch) == ["g0", "g1", "g2"]


async def test_rl_policy_runs_the_group_closest_to_completion_first(model_a):
    # One row. g0 (two samples) arrives before g1 (one sample): FCFS finishes g0 first, the RL
    # priority g1 (one sample from trainable); each sample runs to its end before the next.
    params = SamplingParams(top_k=1, max_new_tokens=3)
    batch = [Request("g0", [4], 2, params), Request("g1", [7], 1, params)]
    rl = engine_for(model_a, max_batch_size=1)
    assert await finish_order(rl, batch) == ["g1", "g0"]
    assert rl.stats["steps"] == 9 and rl.stats["preemptions"] == 0  # one row: a step per token
    assert await finish_order(engine_for(model_a, max_batch_size=1, policy="fcfs"), batch) == ["g0", "g1"]


async def test_update_mid_generate_recomputes_under_the_new_weights(model_a):
    model_b = build_model(VOCAB, seed=1)
    engine = engine_for(build_model(VOCAB, seed=0))
    task = asyncio.create_task(engine.generate(requests(3)))
    for _ in range(5):
        await asyncio.sleep(0)
    await engine.update_weights(1, model_b.state_dict())
    out = await task
    for c in out:
        switch = c.versions.index(1) if 1 in c.versions else len(c.versions)
        assert c.versions == [0] * switch + [1] * (len(c.versions) - switch)
        if switch < len(c.versions):  # the tokens after the switch are model B's choices
            ids = torch.tensor([c.prompt_ids + c.response_ids])
            with torch.no_grad():
                by_b = model_b(ids).logits[0, len(c.prompt_ids) - 1 : -1].argmax(-1).tolist()
            assert c.response_ids[switch:] == by_b[switch:]
    assert engine.stats["recomputed_tokens"] > 0  # the old weights' KV was dropped


async def test_close_aborts_and_bad_settings_are_named(model_a):
    engine = engine_for(build_model(VOCAB, seed=0))
    task = asyncio.create_task(engine.generate(requests(2)))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    await engine.close()
    assert {c.finish_reason for c in await task} == {"abort"}
    with pytest.raises(ValueError, match="policy='lifo'"):
        engine_for(model_a, policy="lifo")
    with pytest.raises(ValueError, match="= 17 KV tokens exceeds kv_budget_tokens=8"):
        await engine_for(model_a, kv_budget_tokens=8).generate([Request("r", [3] * 5, 1, GREEDY)])
    with pytest.raises(ValueError, match="priority="):
        Request("r", [3], 1, GREEDY, priority=(1.5,))  # type: ignore[arg-type]


async def test_a_next_turn_reuses_the_finished_turns_kv(model_a):
    first = [Request(f"t{i}", p, 1, GREEDY) for i, p in enumerate([[3, 4, 5], [6, 7], [8]])]

    async def two_turns(engine: ScheduledTorchEngine) -> list[list[int]]:
        turn1 = await engine.generate(first)
        # the next turn: the context so far (prompt + response) and an observation of two tokens
        turn2 = [
            Request(f"u{c.request_id}", c.prompt_ids + c.response_ids + [9, 10], 1, GREEDY) for c in turn1
        ]
        return [c.response_ids for c in await engine.generate(turn2)]

    plain, reusing = engine_for(model_a), engine_for(model_a, turn_cache_tokens=1000)
    assert await two_turns(reusing) == await two_turns(plain)
    assert plain.stats["reused_tokens"] == 0
    # each turn-2 context but its last token was prefilled in full by the plain engine; the
    # reusing one prefilled only the observation's first token and the turn's last response token
    assert reusing.stats["reused_tokens"] == plain.stats["prefill_tokens"] - reusing.stats["prefill_tokens"]
    assert reusing.stats["prefill_tokens"] == sum(len(r.prompt_ids) - 1 for r in first) + 2 * len(first)
    with pytest.raises(ValueError, match="turn_cache_tokens=-1"):
        engine_for(model_a, turn_cache_tokens=-1)


async def test_bfloat16_autocast_runs_every_forward_of_the_scheduled_engine():
    model = build_model(VOCAB, seed=0)  # its own: the engine wraps this model's forward in autocast
    engine = engine_for(model, kv_budget_tokens=40, autocast="bfloat16")  # tight: preempts and restores
    out = await engine.generate(requests(6, SamplingParams(max_new_tokens=10)))
    assert engine.stats["preemptions"] > 0 and all(p.dtype == torch.float32 for p in model.parameters())
    float32 = build_model(VOCAB, seed=0)
    worst = 0.0
    for c in out:
        with torch.no_grad():
            logits = float32(torch.tensor([c.prompt_ids + c.response_ids])).logits[
                0, len(c.prompt_ids) - 1 : -1
            ]
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.response_ids)[:, None]).squeeze(-1)
        worst = max(worst, (ref - torch.tensor(c.logprobs)).abs().max().item())
    assert 1e-4 < worst < 0.1  # bfloat16's rounding shows, and is small
