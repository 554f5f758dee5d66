"""GSPO, CISPO and REINFORCE++ against hand-computed cases, and at lag 0 the on-policy gradient."""

from __future__ import annotations

import math

import pytest
import torch

from asyncflow.algorithms import aggregate, group_advantages, policy_loss


def _inputs(b: int = 4, t: int = 5):
    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(b, t, generator=g) * 2  # (B, T) log-probs of sampled tokens
    adv = torch.randn(b, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1:] = False
    return lp, adv, mask


@pytest.mark.parametrize("objective", ["gspo", "cispo"])
@pytest.mark.parametrize("correction", ["none", "decoupled", "tis"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_lag_zero_gradient_is_the_vanilla_policy_gradient(objective, correction, agg):
    base, adv, mask = _inputs()
    lp = base.clone().requires_grad_(True)
    _, metrics = policy_loss(
        lp, base.clone(), adv, mask, proximal_logprobs=base.clone(), correction=correction, agg=agg,
        max_tokens=8, objective=objective,
    )  # fmt: skip
    _.backward()
    ref = base.clone().requires_grad_(True)
    aggregate(-adv.unsqueeze(-1) * ref, mask, agg, max_tokens=8).backward()  # -A log pi
    torch.testing.assert_close(lp.grad, ref.grad)
    assert metrics["clip_fraction"] == 0.0
    assert metrics["ratio_mean"] == pytest.approx(1.0)


def _two_rows(log_ratios: list[list[float]], advantages: list[float], **kw):
    """Rows of two tokens, behaviour log-prob 0, current log-prob = the given log-ratios."""
    lp = torch.tensor(log_ratios).requires_grad_(True)  # (2, 2)
    mask = torch.ones_like(lp, dtype=torch.bool)
    loss, metrics = policy_loss(
        lp, torch.zeros_like(lp), torch.tensor(advantages), mask, correction="none", **kw
    )
    loss.backward()
    return loss, lp.grad, metrics


def test_gspo_clips_the_sequence_ratio_not_the_tokens():
    # row 0: token ratios e^0.3 and e^-0.3 (PPO clips the first at eps 0.2), sequence ratio e^0 = 1;
    # row 1: token ratios e^0.1, e^0.5 (sequence e^0.3 ≈ 1.35 > 1.2): the whole sequence is clipped.
    loss, grad, metrics = _two_rows(
        [[0.3, -0.3], [0.1, 0.5]], [1.0, 1.0], objective="gspo", agg="seq-mean-token-mean"
    )
    # row 0: value -s·A = -1, gradient of -s·A·mean_t log π: -1/2 per token, over 2 rows;
    # row 1: clipped at 1.2 (A > 0): value -1.2, no gradient.
    assert loss.item() == pytest.approx((-1.0 - 1.2) / 2)
    torch.testing.assert_close(grad, torch.tensor([[-0.25, -0.25], [0.0, 0.0]]))
    assert metrics["clip_fraction"] == 0.5
    _, ppo_grad, _ = _two_rows([[0.3, -0.3], [0.1, 0.5]], [1.0, 1.0], agg="seq-mean-token-mean")
    assert ppo_grad[0, 0] == 0.0 and ppo_grad[1, 0] != 0.0  # PPO: per token, the other way round


def test_gspo_weight_is_the_sequence_geometric_mean_truncated():
    lp = torch.zeros(1, 2, requires_grad=True)
    behavior = torch.tensor([[math.log(0.5), math.log(8.0)]]).neg()  # prox/behaviour = 0.5 and 8
    prox = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, metrics = policy_loss(
        lp, behavior, torch.tensor([1.0]), mask, proximal_logprobs=prox, is_cap=None, objective="gspo"
    )
    # token weights 0.5 and 8, geometric mean 2: loss = -2 · 1 · 1
    assert loss.item() == pytest.approx(-2.0)
    assert metrics["is_weight_mean"] == pytest.approx(2.0)
    loss, _ = policy_loss(
        lp, behavior, torch.tensor([1.0]), mask, proximal_logprobs=prox, is_cap=1.5, objective="gspo"
    )
    assert loss.item() == pytest.approx(-1.5)


def test_cispo_keeps_the_gradient_of_clipped_tokens_scaled_by_the_clipped_ratio():
    # ratios 1.5 (A > 0, PPO would drop it) and 0.5 (A < 0, PPO would drop it) at eps 0.2
    lp = torch.tensor([[math.log(1.5)], [math.log(0.5)]]).requires_grad_(True)  # (2, 1)
    mask = torch.ones_like(lp, dtype=torch.bool)
    loss, metrics = policy_loss(
        lp, torch.zeros_like(lp), torch.tensor([1.0, -1.0]), mask, correction="none", objective="cispo"
    )
    loss.backward()
    # gradient of -sg(clip(ρ))·A·log π per token, token-mean over 2: -1.2·1/2 and -0.8·(-1)/2
    torch.testing.assert_close(lp.grad.squeeze(-1), torch.tensor([-0.6, 0.4]))
    assert metrics["clip_fraction"] == 1.0
    _, ppo = policy_loss(
        lp.detach().requires_grad_(True), torch.zeros_like(lp), torch.tensor([1.0, -1.0]), mask,
        correction="none",
    )  # fmt: skip
    assert ppo["clip_fraction"] == 1.0  # PPO: both tokens clipped, no gradient at all


def test_an_unknown_objective_is_refused_by_name():
    lp, adv, mask = _inputs()
    with pytest.raises(ValueError, match="unknown objective 'ppo2'"):
        policy_loss(lp, lp, adv, mask, objective="ppo2")  # type: ignore[arg-type]


def test_reinforce_plus_plus_centres_per_group_and_scales_by_the_batch_std():
    rewards = torch.tensor([[1.0, 0.0], [3.0, 1.0]])  # centred: [[.5, -.5], [1, -1]]
    centred = torch.tensor([[0.5, -0.5], [1.0, -1.0]])
    std = math.sqrt((0.25 + 0.25 + 1 + 1) / 4)  # over the whole batch, population std
    torch.testing.assert_close(group_advantages(rewards, "reinforce++"), centred / (std + 1e-6))
    # GRPO scales each group by its own std: both groups become ±0.707
    grpo = group_advantages(rewards, "grpo")
    torch.testing.assert_close(grpo[0], grpo[1])
    assert torch.equal(group_advantages(torch.ones(3, 4), "reinforce++"), torch.zeros(3, 4))


def test_is_mask_drops_the_tokens_whose_behaviour_weight_leaves_the_band():
    # one sample, three tokens; the trainer's log-probs equal the proximal ones (ratio 1), and the
    # behaviour weights pi_prox / mu are 0.3, 1.0 and 6.0: the band [0.5, 5] keeps only the middle one
    prox = torch.log(torch.tensor([[0.3, 0.5, 0.6]]))
    mu = prox - torch.log(torch.tensor([[0.3, 1.0, 6.0]]))
    mask, adv = torch.ones(1, 3, dtype=torch.bool), torch.tensor([2.0])
    lp = prox.clone().requires_grad_(True)
    loss, metrics = policy_loss(
        lp, mu, adv, mask, proximal_logprobs=prox, is_cap=2.0, is_mask=(0.5, 5.0), agg="token-mean"
    )
    loss.backward()
    # token-mean over all three tokens: only the kept token's -w * rho * A = -1 * 1 * 2 survives
    assert loss.item() == pytest.approx(-2.0 / 3)
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, -2.0 / 3, 0.0]]))
    assert metrics["is_masked_fraction"] == pytest.approx(2 / 3)
    assert metrics["is_ess"] == pytest.approx(1 / 3)  # weights 0, 1, 0: (1)^2 / (3 * 1)

    _, plain = policy_loss(lp.detach(), mu, adv, mask, proximal_logprobs=prox, is_cap=2.0)
    w = torch.tensor([0.3, 1.0, 2.0])  # truncated at the cap, none dropped
    assert plain["is_masked_fraction"] == 0.0
    assert plain["is_ess"] == pytest.approx((w.sum() ** 2 / (3 * (w**2).sum())).item())


def test_is_mask_must_keep_on_policy_tokens():
    from asyncflow.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"0 <= low < 1 < high"):
        load_config("examples/sort.yaml", ["trainer.is_mask=[1.2, 5]"])
