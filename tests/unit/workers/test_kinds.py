"""The token kind as the trainer, rollout and reward see it: samples in training order, their
log-probs with gradient on exactly the response tokens, micro-batches, rows round-tripped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asyncflow.config import AsyncFlowConfig, ModelConfig, RolloutConfig
from asyncflow.tasks.sorting import SortDigits
from workers.kinds import TokenKind, make_kind
from workers.policy import make_tokenizer


def kind(**rollout) -> TokenKind:
    return TokenKind(make_tokenizer(SortDigits()), ModelConfig(), RolloutConfig(**rollout))


def data() -> dict:
    return {
        "prompt_ids": [np.array([1, 5, 6]), np.array([1, 7])],
        "response_ids": [np.array([8, 2]), np.array([9, 9, 2])],
        "behavior_logprobs": [np.array([-0.1, -0.2], np.float32), np.array([-0.3, -0.4, -0.5], np.float32)],
        "token_versions": [np.array([3, 4]), np.array([2, 2, 2])],
        "reward": np.array([1.0, 0.0], np.float32),
        "ref_logprobs": [np.zeros(2, np.float32), np.zeros(3, np.float32)],
    }


def test_samples_come_in_the_given_order_with_their_oldest_version():
    rows = kind().rows(data(), [1, 0], reference=True)
    assert [r.response for r in rows] == [[9, 9, 2], [8, 2]]
    assert [r.version(99) for r in rows] == [2, 3]
    assert rows[0].ref == [0.0, 0.0, 0.0] and rows[1].reward == 1.0
    assert kind().rows(data(), [0], reference=False)[0].ref is None


def test_logprobs_have_gradient_exactly_on_the_response_tokens():
    k = kind(temperature=0.7)
    model = k.model(0)
    rows = k.rows(data(), [0, 1], reference=False)
    lp, mask = k.logprobs(model, rows)  # (2, L-1)
    assert lp.shape == mask.shape == (2, 4) and int(mask.sum()) == 5
    lp[mask].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert (lp[mask] <= 0).all()


def test_micro_batches_cover_every_sample_once():
    rows = kind().rows(data(), [0, 1], reference=False)
    for budget in (0, 5, 1000):
        parts = kind().micro_batches(rows, budget)
        assert sorted(i for p in parts for i in p) == [0, 1]


def test_fields_of_each_role_fit_the_schema_and_rows_round_trip():
    from workers.samples import SCHEMA

    k = make_kind(AsyncFlowConfig(), SortDigits())
    assert set(k.trainer_reads(True)) <= set(SCHEMA) and "ref_logprobs" in k.trainer_reads(True)
    assert set(k.prompt_fields) | set(k.rollout_fields) <= set(SCHEMA)
    prompts = k.prompts([SortDigits().example(0)])["prompt_ids"]
    text, response, answer = k.reward_args(
        prompts[0], np.array([*k.tokenizer.encode("123"), k.tokenizer.eos_token_id]), "x"
    )
    assert response == "123" and answer == "x" and text.endswith(">")


def test_the_engine_samples_what_the_kind_recomputes():
    import asyncio

    k = kind(temperature=0.9, top_k=4)
    engine = k.engine(seed=0)
    model = k.model(1)
    asyncio.run(engine.update_weights(0, model.state_dict()))
    prompts = k.prompts([SortDigits().example(i) for i in range(3)])["prompt_ids"]
    out = asyncio.run(engine.generate([k.request(str(i), p, 2, k.params()) for i, p in enumerate(prompts)]))
    fields = k.results(out)
    d = {"prompt_ids": [prompts[int(c.request_id)] for c in out], **fields,
         "reward": np.zeros(len(out), np.float32)}  # fmt: skip
    rows = k.rows(d, list(range(len(out))), reference=False)
    with torch.no_grad():
        lp, mask = k.logprobs(model, rows)
    behavior = torch.tensor([v for r in rows for v in r.behavior])
    assert torch.allclose(lp[mask], behavior, atol=1e-5)


def test_the_reference_computes_chunked_logprobs_as_whole_ones():
    whole = kind(temperature=0.7)
    chunked = TokenKind(whole.tokenizer, ModelConfig(), RolloutConfig(temperature=0.7), chunk_tokens=2)
    model = whole.model(0)
    batch = {k: data()[k] for k in ("prompt_ids", "response_ids")}
    for a, b in zip(whole.reference_logprobs(model, batch), chunked.reference_logprobs(model, batch)):
        assert a.shape == b.shape and np.allclose(a, b, atol=1e-6)


def test_the_warm_start_with_chunked_logprobs_takes_the_same_steps():
    from asyncflow.config import WarmupConfig

    task, config = SortDigits(), WarmupConfig(steps=2, batch_size=4)
    whole = kind()
    chunked = TokenKind(whole.tokenizer, ModelConfig(), RolloutConfig(), chunk_tokens=3)
    models = [whole.model(0), chunked.model(0)]
    losses = [k.warmup(m, task, config)["loss"] for k, m in zip((whole, chunked), models)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # Adam divides by the gradient's size, so float rounding in a near-zero gradient can move a
    # weight by up to ~lr; 1e-4 is a tenth of one step (lr 1e-3), far below what a wrong loss moves
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
