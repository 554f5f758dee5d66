"""The trainer with the flow kind, without Ray or a store: rows as the store hands them over,
the ratio at lag 0, the direction of one step, pre-training and the reference's log-probs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from asyncflow.config import FlowConfig, TrainerConfig, WarmupConfig
from asyncflow.tasks.gaussians import EightGaussians, hit, reward
from services.flow import euler, uniform_grid
from workers.flow_kind import FlowKind
from workers.samples import FLOW_SCHEMA
from workers.trainer import TrainerWorker

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _setup(n: int = 8, **trainer):
    kind = FlowKind(FlowConfig(hidden_size=32, num_layers=2, steps=6), EightGaussians())
    model = kind.model(0)
    engine = kind.engine(seed=1)
    trainer_worker = TrainerWorker(
        model, None, None, TrainerConfig(batch_prompts=2, **trainer), kind, n=n, staleness=0,
        reference=False,
    )  # fmt: skip
    return kind, engine, trainer_worker


async def _rollout(kind, engine, groups: int, n: int) -> dict:
    """What the trainer gets from the store: the fields of `groups` groups after rollout and reward."""
    examples = [kind.task.example(i) for i in range(groups)]
    prompts = kind.prompts(examples)["condition"]
    outputs = await engine.generate(
        [kind.request(str(i), p, n, kind.params()) for i, p in enumerate(prompts)]
    )
    data = {k: list(v) for k, v in kind.results(outputs).items()}
    data["condition"] = [prompts[int(s.request_id)] for s in outputs]
    data["prompt_index"] = np.array([int(s.request_id) for s in outputs])
    data["sample_index"] = np.array([s.index for s in outputs])
    data["reward"] = np.array(
        [
            reward(*kind.reward_args(c, x, examples[0].answer))
            for c, x in zip(data["condition"], data["sample"])
        ],
        dtype=np.float32,
    )
    assert set(data) == set(kind.trainer_reads(False)) <= set(FLOW_SCHEMA)
    return data


async def test_at_lag_zero_every_ratio_is_exactly_one():
    kind, engine, trainer = _setup()
    await engine.update_weights(0, trainer.model.state_dict())
    data = await _rollout(kind, engine, groups=2, n=8)
    rows = kind.rows(data, list(range(16))[::-1], False)  # another order than the engine's
    logprobs, _ = kind.logprobs(trainer.model, rows)
    behavior = torch.tensor([r.behavior for r in rows])
    assert logprobs.shape == (16, 6)
    assert torch.equal(logprobs.detach(), behavior)
    assert torch.equal(torch.exp(logprobs.detach() - behavior), torch.ones(16, 6))
    metrics = trainer.train_on(data)
    assert metrics["logprob_diff_max"] == 0.0 and metrics["is_weight_max"] == 1.0
    assert metrics["mismatch_kl"] == 0.0 and metrics["tokens"] == 16 * 6 and metrics["version"] == 1
    # One update later the same rows are off-policy by one version: the ratio moves off 1.
    stale = trainer.train_on(data)
    assert stale["logprob_diff_max"] > 0 and stale["version"] == 2


async def test_one_step_favours_the_rewarded_samples():
    kind, engine, trainer = _setup(lr=1e-2)
    await engine.update_weights(0, trainer.model.state_dict())
    data = await _rollout(kind, engine, groups=2, n=8)
    rows = kind.rows(data, list(range(16)), False)
    advantages = torch.tensor(data["reward"]).view(2, 8)
    advantages = ((advantages - advantages.mean(1, keepdim=True)) / advantages.std(1, keepdim=True)).view(-1)
    before = kind.logprobs(trainer.model, rows)[0].detach().sum(1)
    trainer.train_on(data)
    after = kind.logprobs(trainer.model, rows)[0].detach().sum(1)
    assert ((after - before) * advantages).sum() > 0


async def test_minibatches_and_the_reference_term_run():
    kind, engine, trainer = _setup(minibatches=2, kl_coef=0.1)
    trainer.reference, trainer.fields = True, kind.trainer_reads(True)
    reference = copy.deepcopy(trainer.model)
    await engine.update_weights(0, trainer.model.state_dict())
    data = await _rollout(kind, engine, groups=2, n=8)
    data["ref_logprobs"] = kind.reference_logprobs(reference, data)
    assert torch.equal(
        torch.tensor(np.stack(data["ref_logprobs"])), torch.tensor(np.stack(data["behavior_logprobs"]))
    )
    metrics = trainer.train_on(data)
    assert metrics["kl_ref"] >= 0 and np.isfinite(metrics["loss"])


def test_warmup_learns_the_eight_modes():
    kind, _, trainer = _setup()
    result = trainer.warmup(kind.task, WarmupConfig(steps=1000, batch_size=256, lr=3e-3))
    assert result["steps"] == 1000
    x = euler(
        trainer.model, torch.randn(2000, 2, generator=torch.Generator().manual_seed(0)), uniform_grid(50)
    )
    answer = kind.task.example(0).answer
    rate = np.mean([hit((), p, answer) for p in x.numpy()])
    assert 0.05 < rate < 0.25  # about one sample in eight near mode 0
    assert np.mean(np.linalg.norm(x.numpy(), axis=1)) == pytest.approx(3.0, abs=0.5)  # on the circle


def test_a_token_task_is_refused_with_the_fix():
    from asyncflow.tasks.sorting import SortDigits

    with pytest.raises(ValueError, match="needs a flow task"):
        FlowKind(FlowConfig(), SortDigits())
