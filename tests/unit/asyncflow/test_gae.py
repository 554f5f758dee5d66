"""GAE, the clipped value loss, whitening and explained variance, on hand-computed values; and at
lag 0 the policy ratio under per-token advantages is exactly 1."""

from __future__ import annotations

import math

import pytest
import torch

from asyncflow.algorithms import explained_variance, gae, policy_loss, value_loss, whiten

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gae_on_a_tiny_sequence_by_hand():
    # one row of 3 actions, reward 1 on the last; gamma 0.9, lam 0.8
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.4]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    d2 = 1.0 - 0.4  # terminal after the last action: V = 0
    d1 = 0.0 + 0.9 * 0.4 - 0.2
    d0 = 0.0 + 0.9 * 0.2 - 0.5
    a2 = d2
    a1 = d1 + 0.72 * a2
    a0 = d0 + 0.72 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.4]]))


def test_lambda_one_gamma_one_gives_monte_carlo_returns_minus_values():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    r = torch.where(mask, rewards, 0.0)
    to_go = r.flip(1).cumsum(1).flip(1)  # sum of the rewards from t to the end of the row
    torch.testing.assert_close(adv, torch.where(mask, to_go - values, 0.0))
    torch.testing.assert_close(ret, torch.where(mask, to_go, 0.0))


def test_padding_changes_nothing_and_lambda_zero_is_the_td_error():
    rewards = torch.tensor([[9.0, 0.0, 2.0, 9.0]])  # 9: padding
    values = torch.tensor([[9.0, 1.0, 0.5, 9.0]])
    mask = torch.tensor([[False, True, True, False]])
    adv, _ = gae(rewards, values, mask, gamma=0.5, lam=0.0)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.0 + 0.5 * 0.5 - 1.0, 2.0 - 0.5, 0.0]]))
    with pytest.raises(ValueError, match="gamma=1.5"):
        gae(rewards, values, mask, gamma=1.5)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        gae(rewards[0], values[0], mask[0])


def test_value_clipping_by_hand():
    # old value 0, return 1, clip 0.2: new 0.5 moves too far toward R -> the clipped term (0.2 - 1)^2
    # is larger and counts; new -0.5 moves away from R: the unclipped term (-0.5 - 1)^2 counts
    old, ret = torch.zeros(1, 2), torch.ones(1, 2)
    v = torch.tensor([[0.5, -0.5]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, m = value_loss(v, old, ret, mask, clip=0.2)
    expected = 0.5 * ((0.2 - 1) ** 2 + (-0.5 - 1) ** 2) / 2
    assert loss.item() == pytest.approx(expected)
    assert m["value_clip_fraction"] == pytest.approx(0.5) and m["value_mean"] == pytest.approx(0.0)
    loss.backward()
    assert v.grad is not None
    torch.testing.assert_close(v.grad, torch.tensor([[0.0, 0.5 * (-0.5 - 1)]]))  # clipped: no gradient
    unclipped, m = value_loss(v.detach(), old, ret, mask, clip=None)
    assert unclipped.item() == pytest.approx(0.5 * ((0.5 - 1) ** 2 + 2.25) / 2)
    assert m["value_clip_fraction"] == 0.0


def test_whiten_and_explained_variance():
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    w = whiten(x, mask)
    kept = w[mask]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert kept.std(correction=0).item() == pytest.approx(1.0, abs=1e-5)
    assert w[0, 2] == 0
    ret = torch.tensor([[1.0, 2.0, 3.0]])
    full = torch.ones(1, 3, dtype=torch.bool)
    assert explained_variance(ret, ret, full) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 3), 2.0), ret, full) == pytest.approx(0.0)
    assert math.isnan(explained_variance(ret, torch.ones(1, 3), full))


def test_at_lag_zero_the_ratio_is_exactly_one_with_per_token_advantages():
    g = torch.Generator().manual_seed(1)
    base = -torch.rand(3, 4, generator=g)
    adv = torch.randn(3, 4, generator=g)
    mask = torch.ones(3, 4, dtype=torch.bool)
    lp = base.clone().requires_grad_(True)
    loss, m = policy_loss(lp, base.clone(), adv, mask, proximal_logprobs=base.clone())
    assert m["ratio_mean"] == 1.0 and m["is_weight_max"] == 1.0 and m["clip_fraction"] == 0.0
    loss.backward()
    assert lp.grad is not None
    torch.testing.assert_close(lp.grad, -adv / mask.sum())  # token-mean of -A·∇log π
