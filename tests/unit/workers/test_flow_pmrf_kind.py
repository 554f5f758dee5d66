"""The flow kind with PMRF as the policy (flow.pmrf), without Ray or a store: the two-stage
warm-start, the data-space sample the reward sees, the ratio at lag 0 and RL that keeps the
mean head fixed; the restoration task's answers and rewards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asyncflow.config import EncoderConfig, FlowConfig, Patterns, PMRFConfig, TrainerConfig, WarmupConfig
from asyncflow.tasks.digits import split
from asyncflow.tasks.gaussians import EightGaussians
from asyncflow.tasks.restoration import DigitRestoration, answer_of, mse, parse_answer, reward
from services.flow.pmrf import PMRFPolicy
from workers.flow_kind import FlowKind
from workers.trainer import TrainerWorker

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REFINER_ONLY = Patterns(patterns=("flow.*",))


def _kind(mean_steps: int = 0) -> FlowKind:
    pmrf = PMRFConfig(sigma_s=0.1, hidden_size=16, num_layers=1, mean_steps=mean_steps)
    return FlowKind(FlowConfig(hidden_size=32, num_layers=2, steps=4, pmrf=pmrf), DigitRestoration("mask"))


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


async def _batch(kind: FlowKind, engine, groups: int = 2, n: int = 4) -> dict:
    """What the trainer reads from the store; reward: minus the MSE to the clean digit (no classifier)."""
    examples = [kind.task.example(i) for i in range(groups)]
    prompts = kind.prompts(examples)["condition"]
    outputs = await engine.generate(
        [kind.request(str(i), p, n, kind.params()) for i, p in enumerate(prompts)]
    )
    data = {k: list(v) for k, v in kind.results(outputs).items()}
    data["condition"] = [prompts[int(s.request_id)] for s in outputs]
    data["prompt_index"] = np.array([int(s.request_id) for s in outputs])
    data["sample_index"] = np.array([s.index for s in outputs])
    answers = [examples[int(s.request_id)].answer for s in outputs]
    data["reward"] = np.array(
        [-mse(*kind.reward_args(c, x, a)) for c, x, a in zip(data["condition"], data["sample"], answers)],
        dtype=np.float32,
    )
    assert set(data) == set(kind.trainer_reads(False))
    return data


def test_warmup_trains_the_mean_head_then_the_refiner():
    kind = _kind(mean_steps=3)
    model = kind.model(0)
    assert isinstance(model, PMRFPolicy) and model.condition_dim == 64 and model.flow.condition_dim == 0
    for name, p in model.named_parameters():  # as trainer.trainable {patterns: [flow.*]} leaves them
        p.requires_grad_(name.startswith("flow."))
    fresh = _state(model)
    result = kind.warmup(model, kind.task, WarmupConfig(steps=2, batch_size=16, lr=1e-3))
    assert result["mean_steps"] == 3 and np.isfinite(result["mean_loss"]) and np.isfinite(result["loss"])
    after = model.state_dict()
    assert all(not torch.equal(fresh[k], after[k]) for k, _ in model.named_parameters())
    assert all(p.requires_grad == n.startswith("flow.") for n, p in model.named_parameters())


async def test_rl_at_lag_zero_is_exact_and_the_reward_sees_the_restored_image():
    kind = _kind()
    model = kind.model(0)
    mean = _state(model.mean)
    trainer = TrainerWorker(
        model, None, None, TrainerConfig(batch_prompts=2, lr=1e-2, trainable=REFINER_ONLY), kind, n=4,
        staleness=0, reference=False,
    )  # fmt: skip
    engine = kind.engine(seed=1)
    await engine.update_weights(0, trainer.model.state_dict())
    data = await _batch(kind, engine)
    # the sample is f(y) + sigma_s z of the last residual, not the residual itself
    cond, latents = torch.as_tensor(np.stack(data["condition"])), torch.as_tensor(np.stack(data["latents"]))
    with torch.no_grad():
        expected = model.mean(cond) + 0.1 * latents[:, -1]
    assert torch.allclose(torch.as_tensor(np.stack(data["sample"])), expected, atol=1e-6)
    metrics = trainer.train_on(data)
    assert metrics["logprob_diff_max"] == 0.0 and metrics["is_weight_max"] == 1.0
    assert all(torch.equal(mean[k], v) for k, v in model.mean.state_dict().items())  # f stays fixed
    assert trainer.train_on(data)["logprob_diff_max"] > 0  # the refiner moved


def test_restoration_answers_carry_the_clean_digit_exactly():
    (train, labels), _ = split()
    answer = answer_of(train[5], int(labels[5]))
    label, clean = parse_answer(answer)
    assert label == labels[5] and np.array_equal(clean, train[5]) and len(answer) == 66
    task = DigitRestoration("noise")
    example = task.example(7)
    label, clean = parse_answer(example.answer)
    y = np.asarray(example.condition, np.float32)
    assert y.shape == (64,) and 0.05 < np.mean((y - clean) ** 2) < 0.5  # y = x + 0.5 n
    assert mse(y, clean, example.answer) == 0.0
    assert reward(y, clean, example.answer)["mse"] == 0.0
    assert reward(y, y, example.answer)["mse"] == pytest.approx(-np.mean((y - clean) ** 2), rel=1e-6)
    assert task.eval_example(3) == DigitRestoration("noise").eval_example(3)  # fixed held-out degradation
    with pytest.raises(ValueError, match="not 'label:<64 levels"):
        mse(y, clean, "7")
    with pytest.raises(ValueError, match="degradation='smudge'"):
        DigitRestoration("smudge")


def test_pmrf_needs_a_conditional_task_and_excludes_the_encoder():
    with pytest.raises(ValueError, match="flow.pmrf reads the task's condition"):
        FlowKind(FlowConfig(pmrf=PMRFConfig()), EightGaussians())
    with pytest.raises(ValueError, match="set one of them"):
        FlowConfig(pmrf=PMRFConfig(), encoder=EncoderConfig())
