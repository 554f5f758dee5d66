"""Log-probs, advantages, aggregation, policy losses and KL penalties, on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

import asyncflow.algorithms as alg
from asyncflow.algorithms import (
    aggregate,
    chunked_token_logprobs,
    entropy,
    group_advantages,
    importance_ratios,
    kl_penalty,
    policy_loss,
    token_logprobs,
)

METRICS = {
    "clip_fraction", "ratio_mean", "is_weight_mean", "is_weight_max",
    "is_truncated_fraction", "approx_kl", "mismatch_kl", "is_masked_fraction", "is_ess",
}  # fmt: skip


def test_public_names_are_pinned():
    assert sorted(alg.__all__) == [
        "AGGREGATIONS", "Aggregation", "CORRECTIONS", "Correction", "ESTIMATORS", "Estimator", "KLKind",
        "KL_KINDS", "OBJECTIVES", "Objective", "aggregate", "chunked_token_logprobs", "entropy",
        "explained_variance", "gae", "group_advantages", "importance_ratios", "kl_penalty", "on_grid",
        "pack", "policy_loss", "token_logprobs", "truncate", "value_loss", "whiten",
    ]  # fmt: skip
    assert alg.ESTIMATORS == ("grpo", "drgrpo", "rloo", "reinforce++")
    assert alg.OBJECTIVES == ("ppo", "gspo", "cispo")
    assert alg.AGGREGATIONS == ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
    assert alg.CORRECTIONS == ("none", "decoupled", "tis")
    assert alg.KL_KINDS == ("k1", "k2", "k3")


# --- token_logprobs and entropy -------------------------------------------------------------


def test_token_logprobs_hand_values():
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])  # (1, 2, 2)
    targets = torch.tensor([[1, 1]])
    out = token_logprobs(logits, targets)
    assert out.shape == (1, 2) and out.dtype == torch.float32
    assert out[0, 0].item() == pytest.approx(math.log(0.5))
    assert out[0, 1].item() == pytest.approx(-math.log(1 + math.e**2))


def test_token_logprobs_temperature_scales_the_logits():
    logits = torch.tensor([[[2.0, 0.0]]])
    out = token_logprobs(logits, torch.tensor([[1]]), temperature=2.0)  # z = [1, 0]
    assert out.item() == pytest.approx(-math.log(1 + math.e))


def test_token_logprobs_matches_log_softmax_and_is_float32_from_bf16():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11).to(torch.bfloat16)
    targets = torch.randint(0, 11, (3, 5))
    out = token_logprobs(logits, targets, temperature=0.7)
    ref = torch.log_softmax(logits.float() / 0.7, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 6, 0.9)])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 13, 100])
def test_chunked_logprobs_equal_the_whole_logits_values_and_gradients(
    chunk_tokens, temperature, top_k, top_p
):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 8, generator=g, requires_grad=True)  # (N, H)
    head = torch.nn.Linear(8, 50)
    targets = torch.randint(0, 50, (13,), generator=g)
    weights = torch.randn(13, generator=g)  # a loss that weighs every position differently
    whole = token_logprobs(head(hidden)[None], targets[None], temperature, top_k, top_p)[0]  # (N,)
    chunked = chunked_token_logprobs(hidden, head, targets, chunk_tokens, temperature, top_k, top_p)
    wrt = [hidden, head.weight, head.bias]
    for got, want in zip(torch.autograd.grad((chunked * weights).sum(), wrt),
                         torch.autograd.grad((whole * weights).sum(), wrt)):  # fmt: skip
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # no checkpointing without gradient, the same values
        torch.testing.assert_close(
            chunked_token_logprobs(hidden, head, targets, chunk_tokens, temperature, top_k, top_p), whole
        )


def test_chunked_logprobs_refuse_a_bad_chunk_or_shape():
    hidden, head, targets = torch.zeros(4, 8), torch.nn.Linear(8, 5), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="chunk_tokens=0, expected >= 1"):
        chunked_token_logprobs(hidden, head, targets, 0)
    with pytest.raises(ValueError, match=r"hidden must be \(N, H\) and targets \(N,\), got \(1, 4, 8\)"):
        chunked_token_logprobs(hidden[None], head, targets, 2)
    assert chunked_token_logprobs(hidden[:0], head, targets[:0], 2).shape == (0,)


def test_token_logprobs_is_stable_for_large_logits():
    out = token_logprobs(torch.tensor([[[1000.0, 0.0]]]), torch.tensor([[0]]))
    assert out.item() == 0.0


def test_token_logprobs_gradient_is_onehot_minus_softmax():
    logits = torch.tensor([[[1.0, 2.0, 3.0]]], requires_grad=True)
    token_logprobs(logits, torch.tensor([[0]])).sum().backward()
    expected = torch.tensor([1.0, 0.0, 0.0]) - torch.softmax(torch.tensor([1.0, 2.0, 3.0]), -1)
    torch.testing.assert_close(logits.grad[0, 0], expected)


def test_token_logprobs_bad_input():
    logits = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"targets must be \(B, T\) = \(2, 3\).*got \(2, 4\)"):
        token_logprobs(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        token_logprobs(logits, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"logits must be \(B, T, V\), got shape \(3, 4\)"):
        token_logprobs(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long).view(3))
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), temperature=0)


def test_entropy_hand_values():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    h = entropy(logits)
    assert h.shape == (1, 2) and h.dtype == torch.float32
    assert h[0, 0].item() == pytest.approx(math.log(4))
    assert h[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_with_temperature_matches_definition():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 7)
    p = torch.softmax(logits / 1.5, dim=-1)
    torch.testing.assert_close(entropy(logits, 1.5), -(p * p.log()).sum(-1))


def test_entropy_bad_temperature():
    with pytest.raises(ValueError, match="temperature must be > 0, got -1"):
        entropy(torch.zeros(1, 1, 2), -1.0)


# --- group_advantages -------------------------------------------------------------------------


def test_grpo_hand_values_use_the_sample_std():
    adv = group_advantages(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), "grpo")
    # mean 0.75, sample std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, 0.5, -1.5]]), atol=1e-5, rtol=0)
    adv = group_advantages(torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    s = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(adv, torch.tensor([[s, -s, s, -s]]), atol=1e-5, rtol=0)


def test_drgrpo_hand_values():
    adv = group_advantages(torch.tensor([[1.0, 1.0, 1.0, 0.0], [2.0, 0.0, 0.0, 2.0]]), "drgrpo")
    torch.testing.assert_close(adv, torch.tensor([[0.25, 0.25, 0.25, -0.75], [1.0, -1.0, -1.0, 1.0]]))


def test_rloo_hand_values_and_identity():
    r = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv = group_advantages(r, "rloo")
    torch.testing.assert_close(adv, torch.tensor([[1 / 3, 1 / 3, 1 / 3, -1.0]]))
    torch.manual_seed(2)
    r = torch.randn(5, 6)
    torch.testing.assert_close(group_advantages(r, "rloo"), 6 / 5 * group_advantages(r, "drgrpo"))


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
def test_equal_rewards_give_zero_advantage(estimator):
    adv = group_advantages(torch.full((2, 4), 0.7), estimator)
    assert torch.equal(adv, torch.zeros(2, 4))


def test_groups_are_independent_and_ints_become_float32():
    a = group_advantages(torch.tensor([[1, 0, 0, 0]]))
    b = group_advantages(torch.tensor([[5, 3, 3, 1]]))
    both = group_advantages(torch.tensor([[1, 0, 0, 0], [5, 3, 3, 1]]))
    assert both.dtype == torch.float32
    torch.testing.assert_close(both, torch.cat([a, b]))


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo"])
def test_groups_of_one_get_zero(estimator):
    assert torch.equal(group_advantages(torch.tensor([[3.0], [-1.0]]), estimator), torch.zeros(2, 1))


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError, match=r"'rloo' needs at least 2 samples per group.*got n=1"):
        group_advantages(torch.tensor([[1.0]]), "rloo")


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'gpro'; expected one of"):
        group_advantages(torch.zeros(1, 2), "gpro")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(G, n\).*got shape \(8,\).*view\(-1, n\)"):
        group_advantages(torch.zeros(8))
    with pytest.raises(ValueError, match="NaN or inf"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))


# --- aggregate --------------------------------------------------------------------------------

NAN = float("nan")
VALUES = torch.tensor([[1.0, 2.0, 3.0, NAN], [4.0, NAN, 9.0, -7.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", (1 + 2 + 3 + 4) / 4),
        ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + 4 / 1) / 2),
        ("seq-mean-token-sum", ((1 + 2 + 3) / 4 + 4 / 4) / 2),
    ],
)
def test_aggregate_hand_values_ignore_padding(mode, expected):
    assert aggregate(VALUES, MASK, mode, max_tokens=4).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_aggregate_leaves_out_empty_rows(mode):
    padded = torch.cat([VALUES, torch.full((1, 4), 123.0)])
    mask = torch.cat([MASK, torch.zeros(1, 4, dtype=MASK.dtype)])
    assert aggregate(padded, mask, mode, max_tokens=4).item() == pytest.approx(
        aggregate(VALUES, MASK, mode, max_tokens=4).item()
    )
    assert aggregate(padded, torch.zeros_like(mask), mode, max_tokens=4).item() == 0.0


def test_aggregate_bool_and_float_masks_agree():
    a = aggregate(VALUES, MASK.bool(), "seq-mean-token-mean")
    b = aggregate(VALUES, MASK.float(), "seq-mean-token-mean")
    assert a.item() == b.item() == pytest.approx(3.0)


def test_aggregate_bad_input():
    with pytest.raises(ValueError, match=r"unknown aggregation mode 'mean'; expected one of"):
        aggregate(VALUES, MASK, "mean")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"'seq-mean-token-sum' divides by a constant max_tokens >= 1, got None"
    ):
        aggregate(VALUES, MASK, "seq-mean-token-sum")
    with pytest.raises(ValueError, match=r"mask has shape \(2, 3\) but values has \(2, 4\).*pad them"):
        aggregate(VALUES, MASK[:, :3], "token-mean")


# --- policy_loss --------------------------------------------------------------------------------


def _inputs(seed=0, b=3, t=5):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=g) * 3
    adv = torch.randn(b, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1:] = False
    return lp, adv, mask


@pytest.mark.parametrize("correction", ["none", "decoupled", "tis"])
def test_lag_zero_ratios_are_exactly_one(correction):
    lp, _, _ = _inputs()
    ratio, weight = importance_ratios(lp, lp.clone(), lp.clone(), correction=correction)
    assert torch.equal(ratio, torch.ones_like(lp))
    assert torch.equal(weight, torch.ones_like(lp))


@pytest.mark.parametrize("correction", ["none", "decoupled", "tis"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_lag_zero_gradient_is_the_vanilla_policy_gradient(correction, agg):
    base, adv, mask = _inputs()
    lp = base.clone().requires_grad_(True)
    loss, metrics = policy_loss(
        lp,
        base.clone(),
        adv,
        mask,
        proximal_logprobs=base.clone(),
        correction=correction,
        agg=agg,
        max_tokens=8,
    )
    loss.backward()
    ref = base.clone().requires_grad_(True)
    vanilla = aggregate(-adv.unsqueeze(-1) * ref, mask, agg, max_tokens=8)  # -A log pi
    vanilla.backward()
    torch.testing.assert_close(lp.grad, ref.grad)
    # The value is the surrogate -A * rho with rho = 1, not -A log pi; only the gradients agree.
    torch.testing.assert_close(loss, aggregate(-adv.unsqueeze(-1).expand_as(base), mask, agg, max_tokens=8))
    assert set(metrics) == METRICS
    assert metrics["clip_fraction"] == 0.0
    assert metrics["ratio_mean"] == metrics["is_weight_mean"] == metrics["is_weight_max"] == 1.0
    assert metrics["approx_kl"] == metrics["mismatch_kl"] == metrics["is_truncated_fraction"] == 0.0


def _one_token_each(ratios, advantages, correction="none", **kw):
    """Rows of one token with behaviour log-prob 0 and current log-prob log(ratio)."""
    lp = torch.tensor(ratios).log().unsqueeze(-1).requires_grad_(True)  # (B, 1)
    behavior = torch.zeros_like(lp)
    mask = torch.ones_like(behavior, dtype=torch.bool)
    loss, metrics = policy_loss(lp, behavior, torch.tensor(advantages), mask, correction=correction, **kw)
    loss.backward()
    return loss, lp.grad.squeeze(-1), metrics


def test_clipping_zeroes_the_gradient_only_on_the_side_the_advantage_pushes():
    # rho = 1.5 or 0.5 against eps 0.2: A > 0 above 1+eps and A < 0 below 1-eps are clipped.
    loss, grad, metrics = _one_token_each([1.5, 1.5, 0.5, 0.5], [1.0, -1.0, 1.0, -1.0])
    # d/dlp of -rho*A is -rho*A; token-mean over 4 tokens.
    torch.testing.assert_close(grad, torch.tensor([0.0, 1.5, -0.5, 0.0]) / 4)
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4)
    assert metrics["clip_fraction"] == 0.5
    assert metrics["ratio_mean"] == pytest.approx(1.0)


def test_clip_eps_high_widens_only_the_upper_bound():
    _, grad, _ = _one_token_each([1.25, 0.75], [1.0, -1.0])
    assert grad.tolist() == [0.0, 0.0]
    _, grad, _ = _one_token_each([1.25, 0.75], [1.0, -1.0], clip_eps_high=0.28)
    torch.testing.assert_close(grad, torch.tensor([-1.25, 0.0]) / 2)


@pytest.mark.parametrize(
    ("is_cap", "weight", "truncated"), [(2.0, 2.0, 1.0), (None, 3.0, 0.0), (5.0, 3.0, 0.0)]
)
def test_decoupled_weight_is_truncated_at_is_cap(is_cap, weight, truncated):
    # current = proximal (ratio 1), proximal / behaviour = 3.
    prox = torch.full((2, 1), math.log(0.6))
    lp = prox.clone().requires_grad_(True)
    behavior = prox - math.log(3.0)
    mask = torch.ones(2, 1)
    loss, m = policy_loss(
        lp, behavior, torch.tensor([1.0, -2.0]), mask, proximal_logprobs=prox, is_cap=is_cap
    )
    loss.backward()
    torch.testing.assert_close(lp.grad.squeeze(-1), torch.tensor([-1.0, 2.0]) * weight / 2)
    assert loss.item() == pytest.approx(weight * (-1.0 + 2.0) / 2)
    assert m["is_weight_mean"] == pytest.approx(weight) and m["is_weight_max"] == pytest.approx(weight)
    assert m["is_truncated_fraction"] == truncated
    assert m["mismatch_kl"] == pytest.approx(m["approx_kl"]) == pytest.approx((3 - 1) - math.log(3))


def test_decoupled_clips_around_the_proximal_policy_not_the_behaviour():
    behavior = torch.zeros(1, 1)
    prox = torch.full((1, 1), math.log(1.5))  # behaviour is far, but the anchor is the proximal policy
    lp = prox.clone().requires_grad_(True)
    loss, m = policy_loss(lp, behavior, torch.ones(1), torch.ones(1, 1), proximal_logprobs=prox, is_cap=None)
    loss.backward()
    assert lp.grad.item() == pytest.approx(-1.5)  # weight 1.5 times the unclipped gradient
    assert m["clip_fraction"] == 0.0
    _, grad, _ = _one_token_each([1.5], [1.0], correction="none")  # against behaviour: clipped
    assert grad.item() == 0.0


def test_tis_without_proximal_anchors_on_the_current_policy():
    lp = torch.log(torch.tensor([[0.5, 0.2]])).requires_grad_(True)
    behavior = torch.log(torch.tensor([[0.25, 0.2]]))
    ratio, weight = importance_ratios(lp, behavior, correction="tis", is_cap=1.5)
    assert torch.equal(ratio, torch.ones_like(ratio))
    torch.testing.assert_close(weight, torch.tensor([[1.5, 1.0]]))
    assert weight.grad_fn is None and ratio.grad_fn is not None


def test_tis_with_proximal_equals_decoupled():
    base, adv, mask = _inputs(seed=3)
    lp = base + 0.1 * torch.randn_like(base)
    prox, behavior = base, base - 0.5 * torch.rand_like(base)
    a, ma = policy_loss(lp, behavior, adv, mask, proximal_logprobs=prox, correction="tis")
    b, mb = policy_loss(lp, behavior, adv, mask, proximal_logprobs=prox, correction="decoupled")
    assert torch.equal(a, b) and ma == mb


def test_decoupled_needs_proximal_logprobs():
    lp, adv, mask = _inputs()
    with pytest.raises(ValueError, match=r"'decoupled' needs proximal_logprobs.*logprobs.detach\(\)"):
        policy_loss(lp, lp, adv, mask)


@pytest.mark.parametrize("correction", ["none", "decoupled", "tis"])
def test_padding_changes_neither_loss_nor_gradient(correction):
    base, _, mask = _inputs(seed=4)
    adv = torch.randn(base.shape)  # per-token advantages, so padding advantages can be garbage too
    behavior = base - 0.3 * torch.rand_like(base)
    prox = base - 0.1 * torch.rand_like(base)

    def run(fill):
        garbage = lambda x: torch.where(mask, x, fill)  # noqa: E731
        lp = garbage(base + 0.05).requires_grad_(True)
        loss, metrics = policy_loss(
            lp, garbage(behavior), garbage(adv), mask, proximal_logprobs=garbage(prox), correction=correction
        )
        loss.backward()
        return loss, lp.grad, metrics

    clean, dirty_inf, dirty_nan = run(0.0), run(float("inf")), run(float("nan"))
    for loss, grad, metrics in (dirty_inf, dirty_nan):
        assert torch.equal(loss, clean[0])
        assert torch.equal(grad, clean[1])
        assert metrics == clean[2]
    assert torch.equal(clean[1][~mask], torch.zeros(int((~mask).sum())))


def test_per_sample_advantages_broadcast_over_tokens():
    lp, adv, mask = _inputs(seed=5)
    behavior = lp - 0.2
    a, _ = policy_loss(lp, behavior, adv, mask, correction="none")
    b, _ = policy_loss(lp, behavior, adv.unsqueeze(-1).expand_as(lp), mask, correction="none")
    assert torch.equal(a, b)


def test_gradient_flows_only_into_current_logprobs_and_loss_is_float32():
    lp, adv, mask = _inputs(seed=6)
    cur = lp.to(torch.bfloat16).requires_grad_(True)
    behavior = lp.clone().requires_grad_(True)
    prox = lp.clone().requires_grad_(True)
    loss, _ = policy_loss(cur, behavior, adv.requires_grad_(True), mask, proximal_logprobs=prox)
    assert loss.dtype == torch.float32
    loss.backward()
    assert cur.grad is not None and behavior.grad is None and prox.grad is None and adv.grad is None


def test_approx_kl_is_k3_from_behaviour_to_current():
    _, _, m = _one_token_each([2.0, 2.0], [0.0, 0.0])
    # KL(mu || pi) from tokens drawn from mu: k3 with r = pi / mu = 2.
    assert m["approx_kl"] == pytest.approx((2 - 1) - math.log(2))
    assert m["mismatch_kl"] == pytest.approx(m["approx_kl"])  # no proximal: the trainer's view is pi


def test_policy_loss_bad_input():
    lp, adv, mask = _inputs()
    with pytest.raises(ValueError, match=r"behavior_logprobs has shape \(3, 4\) but logprobs has \(3, 5\)"):
        policy_loss(lp, lp[:, :4], adv, mask, correction="none")
    with pytest.raises(ValueError, match=r"mask has shape \(3, 4\) but logprobs has \(3, 5\).*mask = 0"):
        policy_loss(lp, lp, adv, mask[:, :4], correction="none")
    with pytest.raises(
        ValueError, match=r"advantages must be \(B,\) = \(3,\).*\(B, T\) = \(3, 5\).*got \(6,\)"
    ):
        policy_loss(lp, lp, torch.zeros(6), mask, correction="none")
    with pytest.raises(
        ValueError, match=r"unknown correction 'ppo'; expected one of \('none', 'decoupled', 'tis'\)"
    ):
        policy_loss(lp, lp, adv, mask, correction="ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"0 < clip_eps < 1.*got clip_eps=1.5"):
        policy_loss(lp, lp, adv, mask, correction="none", clip_eps=1.5)
    with pytest.raises(ValueError, match=r"is_cap must be >= 1 or None, got 0.5"):
        policy_loss(lp, lp, adv, mask, correction="tis", is_cap=0.5)
    with pytest.raises(ValueError, match=r"unknown aggregation mode 'sum'"):
        policy_loss(lp, lp, adv, mask, correction="none", agg="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"max_tokens >= 1, got None"):
        policy_loss(lp, lp, adv, mask, correction="none", agg="seq-mean-token-sum")
    with pytest.raises(ValueError, match=r"logprobs must be \(B, T\), got shape \(15,\)"):
        policy_loss(lp.flatten(), lp.flatten(), adv, mask.flatten(), correction="none")


# --- kl_penalty -----------------------------------------------------------------------------------


def test_kl_estimators_hand_values():
    lp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])  # log r = log 0.5
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    assert kl_penalty(lp, ref).item() == kl_penalty(lp, ref, "k3").item()


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_is_zero_for_equal_policies(kind):
    lp = -torch.rand(2, 3)
    assert torch.equal(kl_penalty(lp, lp.clone(), kind), torch.zeros(2, 3))


def test_k1_and_k3_are_unbiased_and_k3_is_non_negative():
    torch.manual_seed(7)
    pi = torch.softmax(torch.randn(6), -1)
    ref = torch.softmax(torch.randn(6), -1)
    true_kl = (pi * (pi / ref).log()).sum().item()
    tokens = torch.multinomial(pi, 200_000, replacement=True).view(1, -1)
    lp, ref_lp = pi.log()[tokens], ref.log()[tokens]
    k3 = kl_penalty(lp, ref_lp, "k3")
    assert bool((k3 >= 0).all())
    assert k3.mean().item() == pytest.approx(true_kl, rel=0.05)
    assert kl_penalty(lp, ref_lp, "k1").mean().item() == pytest.approx(true_kl, rel=0.05)


def test_k3_gradient_is_one_minus_r():
    lp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    kl_penalty(lp, torch.tensor([[math.log(0.25)]])).sum().backward()
    assert lp.grad.item() == pytest.approx(1 - 0.5)


def test_kl_penalty_bad_input():
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ref_logprobs has shape \(1, 2\) but logprobs has \(1, 1\)"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 2))
