"""PPO's critic in the trainer (trainer.estimator: gae), without Ray or a store: at lag 0 the policy
ratio is exactly 1, the value loss falls on repeated batches, the critic is no part of the policy
(or of what is published), and its state survives a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asyncflow.config import CriticConfig, ModelConfig, RolloutConfig, TrainerConfig, load_config
from asyncflow.errors import ConfigError
from services.models import build_model, build_tokenizer
from services.serving import Request, SamplingParams
from services.serving.torch_engine import TorchEngine
from workers.kinds import TokenKind
from workers.trainable import publication
from workers.trainer import TrainerWorker

pytestmark = pytest.mark.usefixtures("one_thread")
N = 4


async def _batch(model, tok) -> dict:
    engine = TorchEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=3)
    prompts = [[tok.bos_token_id, *tok.encode(p)] for p in ("42>", "917>")]
    params = SamplingParams(max_new_tokens=5)
    out = await engine.generate([Request(str(i), p, N, params) for i, p in enumerate(prompts)])
    return {
        "prompt_ids": [np.array(c.prompt_ids) for c in out],
        "response_ids": [np.array(c.response_ids) for c in out],
        "behavior_logprobs": [np.array(c.logprobs, dtype=np.float32) for c in out],
        "token_versions": [np.array(c.versions) for c in out],
        "reward": np.array([float(len(c.response_ids) % 2) for c in out], dtype=np.float32),
        "prompt_index": np.repeat(np.arange(2), N),
        "sample_index": np.tile(np.arange(N), 2),
    }


def _trainer(tok, seed: int = 1, **critic) -> TrainerWorker:
    config = TrainerConfig(batch_prompts=2, lr=1e-3, estimator="gae", critic=CriticConfig(**critic))
    kind = TokenKind(tok, ModelConfig(), RolloutConfig())
    return TrainerWorker(build_model(len(tok), seed=seed), None, None, config, kind, n=N, staleness=0,
                         reference=False)  # fmt: skip


@pytest.fixture
def tok():
    return build_tokenizer(list("0123456789>"))


async def test_ppo_steps_at_lag_zero_have_ratio_one_and_the_value_loss_falls(tok):
    torch.manual_seed(0)
    trainer = _trainer(tok, lr=1e-2)
    data = await _batch(trainer.model, tok)
    first = trainer.train_on(data)
    assert first["ratio_mean"] == 1.0 and first["clip_fraction"] == 0.0  # one minibatch: on-policy
    assert first["value_mean"] == 0.0  # the value head starts at zero
    for key in ("value_loss", "explained_variance", "value_clip_fraction", "policy_loss", "value_grad_norm"):
        assert np.isfinite(first[key]), key
    losses = [first["value_loss"]] + [trainer.train_on(data)["value_loss"] for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert trainer.version == 16


async def test_the_critic_is_its_own_model_and_is_not_published(tok):
    trainer = _trainer(tok)
    trainer.train_on(await _batch(trainer.model, tok))
    assert trainer.critic is not None
    policy = {p.data_ptr() for p in trainer.model.parameters()}
    assert not policy & {p.data_ptr() for p in trainer.critic.model.parameters()}
    published = publication(trainer.model, "all", whole=True)
    assert set(published) == set(trainer.model.state_dict())  # the policy's tensors, nothing else
    assert not any("head.weight" == name for name in published)


async def test_the_critic_resumes_from_a_checkpoint(tok, tmp_path):
    torch.manual_seed(0)
    trainer = _trainer(tok)
    data = await _batch(trainer.model, tok)
    trainer.train_on(data)
    trainer.save(str(tmp_path / "ck"))
    resumed = _trainer(tok, seed=5)  # other initial weights: all of them must come from the checkpoint
    assert resumed.load(str(tmp_path / "ck")) == 1
    assert resumed.critic is not None and trainer.critic is not None
    for a, b in zip(trainer.critic.model.state_dict().values(), resumed.critic.model.state_dict().values()):
        torch.testing.assert_close(a, b)
    after, again = trainer.train_on(data), resumed.train_on(data)  # optimizer state restored too
    for key in ("value_loss", "loss", "explained_variance", "grad_norm", "value_grad_norm"):
        assert again[key] == pytest.approx(after[key], rel=1e-5, abs=1e-7), key
    kind = TokenKind(tok, ModelConfig(), RolloutConfig())
    plain = TrainerWorker(
        build_model(len(tok), seed=1), None, None, TrainerConfig(batch_prompts=2), kind, n=N, staleness=0,
        reference=False,
    )  # fmt: skip
    plain.save(str(tmp_path / "grpo"))
    with pytest.raises(ValueError, match="holds no critic"):
        _trainer(tok).load(str(tmp_path / "grpo"))


def test_config_combinations_are_checked(tmp_path):
    from pathlib import Path

    example = Path(__file__).parents[3] / "examples" / "sort.yaml"
    config = load_config(example, ["trainer.estimator=gae", "trainer.critic={lam: 0.9}"])
    assert config.trainer.critic is not None and config.trainer.critic.lam == 0.9
    with pytest.raises(ConfigError, match="trainer.critic is not set"):
        load_config(example, ["trainer.estimator=gae"])
    with pytest.raises(ConfigError, match="does not use a critic"):
        load_config(example, ["trainer.critic={}"])
    with pytest.raises(ConfigError, match="trainer.num_ranks: 1"):
        load_config(example, ["trainer.estimator=gae", "trainer.critic={}", "trainer.num_ranks=2"])
    with pytest.raises(ConfigError, match="lam"):
        load_config(example, ["trainer.estimator=gae", "trainer.critic={lam: 1.5}"])
    with pytest.raises(ConfigError, match="a flow policy has none"):
        load_config(example.parent / "flow-2d.yaml", ["trainer.estimator=gae", "trainer.critic={}"])


async def test_the_reward_sits_on_the_last_token_and_the_kl_is_a_per_token_reward(tok):
    torch.manual_seed(0)
    critic = CriticConfig(whiten=False, lam=1.0)
    config = TrainerConfig(batch_prompts=2, estimator="gae", critic=critic, kl_coef=0.5)
    kind = TokenKind(tok, ModelConfig(), RolloutConfig())
    trainer = TrainerWorker(build_model(len(tok), seed=1), None, None, config, kind, n=N, staleness=0,
                            reference=True)  # fmt: skip
    data = await _batch(trainer.model, tok)
    data["ref_logprobs"] = [b - 0.1 for b in data["behavior_logprobs"]]  # log μ - log π_ref = 0.1
    rows = kind.rows(data, list(range(2 * N)), reference=True)
    trainer._wrap()
    assert trainer.critic is not None
    targets, figures = trainer.critic.targets(rows, [list(range(2 * N))], config.kl_coef)
    assert figures["kl_ref"] == pytest.approx(0.1, abs=1e-5)
    for i, row in enumerate(rows):  # V = 0 at start, gamma = lam = 1: advantage = return = reward-to-go
        n = len(row.response)
        to_go = [row.reward - 0.5 * 0.1 * (n - t) for t in range(n)]
        torch.testing.assert_close(targets[i, 1, :n], torch.tensor(to_go), atol=1e-5, rtol=0)
        torch.testing.assert_close(targets[i, 0, :n], torch.tensor(to_go), atol=1e-5, rtol=0)
        assert targets[i, :, n:].abs().sum() == 0
    metrics = trainer.train_on(data)
    assert metrics["kl_ref"] == pytest.approx(0.1, abs=1e-5) and "value_loss" in metrics


async def test_minibatches_split_the_critics_targets_with_the_groups(tok):
    torch.manual_seed(0)
    config = TrainerConfig(batch_prompts=2, minibatches=2, estimator="gae", critic=CriticConfig())
    kind = TokenKind(tok, ModelConfig(), RolloutConfig())
    trainer = TrainerWorker(build_model(len(tok), seed=1), None, None, config, kind, n=N, staleness=0,
                            reference=False)  # fmt: skip
    metrics = trainer.train_on(await _batch(trainer.model, tok))
    assert np.isfinite(metrics["value_loss"]) and metrics["samples"] == 2 * N
    assert metrics["value_mean"] != 0.0  # the second minibatch saw the critic after its first step
