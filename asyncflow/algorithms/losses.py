"""Policy-gradient losses with off-policy correction, token aggregation and KL penalties.

Three policies meet here, each as per-token log-probs of the sampled tokens (B, T):
  behaviour μ   the weights that generated the sample, as the rollout engine reported them;
  proximal      the trainer's own log-probs of the sample before this update (the anchor the
                trust region clips around); with a separate proximal policy it is that policy;
  current π_θ   the trainer's log-probs now, the only one that carries a gradient.
In asynchronous RL μ lags π_θ by up to k versions and differs from it even at lag 0 through
kernel and precision mismatch, so the losses correct for μ ≠ proximal with a truncated
importance weight and keep PPO's clip around the proximal policy.

This module knows nothing about versions, models, optimizers or the data store: tensors in,
a scalar loss and a few float metrics out. The trainer picks the mode; `versioning` decides
which samples reach it.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

__all__ = [
    "AGGREGATIONS",
    "Aggregation",
    "CORRECTIONS",
    "Correction",
    "KLKind",
    "KL_KINDS",
    "OBJECTIVES",
    "Objective",
    "aggregate",
    "importance_ratios",
    "kl_penalty",
    "policy_loss",
]

Aggregation = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
Correction = Literal["none", "decoupled", "tis"]
CORRECTIONS: tuple[str, ...] = get_args(Correction)
KLKind = Literal["k1", "k2", "k3"]
KL_KINDS: tuple[str, ...] = get_args(KLKind)
Objective = Literal["ppo", "gspo", "cispo"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)


def _check_choice(fn: str, what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{fn}: unknown {what} {value!r}; expected one of {choices}")


def _check_shapes(fn: str, ref_name: str, ref: Tensor, **others: Tensor | None) -> None:
    """Every named tensor must be (B, T) like `ref`; the message names both shapes and the fix."""
    if ref.dim() != 2:
        raise ValueError(f"{fn}: {ref_name} must be (B, T), got shape {tuple(ref.shape)}")
    for name, t in others.items():
        if t is not None and t.shape != ref.shape:
            raise ValueError(
                f"{fn}: {name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}; all "
                "per-token inputs must be (B, T) over the same response tokens: pad them to the same "
                "length T and mark padding with mask = 0"
            )


def aggregate(values: Tensor, mask: Tensor, mode: Aggregation, max_tokens: int | None = None) -> Tensor:
    """Reduce per-token values (B, T) to a scalar over the tokens where `mask` is nonzero.

    - "token-mean": Σ values / number of tokens, every token weighted alike whatever its
      sequence's length (DAPO, Yu et al. 2025, arXiv 2503.14476, §3.3 "token-level loss").
    - "seq-mean-token-mean": the mean over each sequence's tokens, then the mean over
      sequences, GRPO's 1/G Σ_i 1/|o_i| Σ_t (Shao et al. 2024, arXiv 2402.03300, eq. 3).
    - "seq-mean-token-sum": each sequence's token sum divided by the constant `max_tokens`
      (the generation budget), then the mean over sequences; Dr. GRPO's fix for the length
      bias of 1/|o_i| (Liu et al. 2025, arXiv 2503.20783, §3.1). Needs `max_tokens`; the
      other modes ignore it.

    Padding (mask 0) contributes nothing whatever it holds, even NaN; sequences with no
    tokens are left out of the sequence means; an all-padding batch gives 0.
    """
    _check_choice("aggregate", "aggregation mode", mode, AGGREGATIONS)
    _check_shapes("aggregate", "values", values, mask=mask)
    if mode == "seq-mean-token-sum" and (max_tokens is None or max_tokens < 1):
        raise ValueError(
            f"aggregate: mode 'seq-mean-token-sum' divides by a constant max_tokens >= 1, got "
            f"{max_tokens}; pass the generation budget (max_new_tokens)"
        )
    m = mask.bool()  # (B, T)
    v = torch.where(m, values, 0.0)  # (B, T); where, not a product, so NaN padding stays out
    if mode == "token-mean":
        return v.sum() / m.sum().clamp(min=1)
    tokens = m.sum(dim=-1)  # (B,)
    rows = (tokens > 0).sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        per_row = v.sum(dim=-1) / tokens.clamp(min=1)  # (B,)
    else:
        assert max_tokens is not None  # checked above
        per_row = v.sum(dim=-1) / max_tokens  # (B,)
    return per_row.sum() / rows


def importance_ratios(
    logprobs: Tensor,
    behavior_logprobs: Tensor,
    proximal_logprobs: Tensor | None = None,
    *,
    correction: Correction = "decoupled",
    is_cap: float | None = 2.0,
) -> tuple[Tensor, Tensor]:
    """The PPO ratio to clip and the detached importance weight, elementwise: (B, T) -> (B, T), (B, T).

    - "none": ratio = π_θ / μ, weight = 1; PPO with the behaviour policy as π_old
      (Schulman et al. 2017, arXiv 1707.06347, eq. 6).
    - "decoupled": ratio = π_θ / π_prox, weight = min(π_prox / μ, is_cap); decoupled PPO
      (Hilton et al. 2022, arXiv 2110.00987; AReaL, Fu et al. 2025, arXiv 2505.24298,
      eq. 5). Needs `proximal_logprobs`. AReaL drops tokens whose weight exceeds the cap;
      here the weight is truncated at the cap instead, as TIS does.
    - "tis": the same with π_prox defaulting to π_θ.detach() when `proximal_logprobs` is None
      (truncated importance sampling, Yao et al. 2025, "Your Efficient RL Framework Secretly
      Brings You Off-Policy RL Training", fengyao.notion.site/off-policy-rl; verl, slime).

    `is_cap=None` leaves the weight untruncated. Only `ratio` carries a gradient. When
    π_θ = π_prox = μ exactly, both are exactly 1 (exp(0)).
    """
    _check_choice("importance_ratios", "correction", correction, CORRECTIONS)
    _check_shapes(
        "importance_ratios", "logprobs", logprobs,
        behavior_logprobs=behavior_logprobs, proximal_logprobs=proximal_logprobs,
    )  # fmt: skip
    if is_cap is not None and not is_cap >= 1.0:
        raise ValueError(
            f"importance_ratios: is_cap must be >= 1 or None, got {is_cap}; a cap below 1 would "
            "down-weight on-policy tokens (peers use 2-5)"
        )
    lp = logprobs.float()  # (B, T)
    behavior = behavior_logprobs.detach().float()  # (B, T)
    if correction == "none":
        return torch.exp(lp - behavior), torch.ones_like(lp)
    if proximal_logprobs is None:
        if correction == "decoupled":
            raise ValueError(
                "importance_ratios: correction 'decoupled' needs proximal_logprobs; without a separate "
                "proximal policy pass the trainer's log-probs recomputed before the update "
                "(logprobs.detach()), or use correction 'tis', which does that for you"
            )
        proximal = lp.detach()
    else:
        proximal = proximal_logprobs.detach().float()  # (B, T)
    weight = torch.exp(proximal - behavior)  # (B, T), no gradient
    if is_cap is not None:
        weight = weight.clamp(max=is_cap)
    return torch.exp(lp - proximal), weight


def policy_loss(
    logprobs: Tensor,
    behavior_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    proximal_logprobs: Tensor | None = None,
    correction: Correction = "decoupled",
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    is_cap: float | None = 2.0,
    agg: Aggregation = "token-mean",
    max_tokens: int | None = None,
    objective: Objective = "ppo",
    is_mask: tuple[float, float] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped policy-gradient loss with off-policy correction: a scalar to minimise, and metrics.

    Per token, L = -w · min(ρ·A, clip(ρ, 1 - clip_eps, 1 + clip_eps_high)·A), the PPO-clip
    surrogate (Schulman et al. 2017, arXiv 1707.06347, eq. 7) times the importance weight
    w; ρ and w come from `importance_ratios` for the chosen `correction` (decoupled PPO is
    AReaL's eq. 5, Fu et al. 2025, arXiv 2505.24298). `clip_eps_high` (default `clip_eps`)
    is DAPO's clip-higher (Yu et al. 2025, arXiv 2503.14476, §3.1). Tokens are reduced with
    `aggregate(…, agg, max_tokens)`.

    `objective` picks what is clipped:
      "ppo"    the per-token ratio, as above.
      "gspo"   the sequence's ratio s_i = exp(mean_t log ρ_i,t), the geometric mean of its token
               ratios, clipped as a whole (GSPO, Zheng et al. 2025, arXiv 2507.18071, eq. 5-7),
               written per token as GSPO-token (eq. 13): ρ_i,t = sg[s_i] · π_θ(y_t) / sg[π_θ(y_t)],
               whose gradient with "seq-mean-token-mean" is GSPO's s_i·A_i·∇log s_i. The
               behaviour weight is taken per sequence the same way. GSPO clips tightly
               (clip_eps 3e-4, clip_eps_high 4e-4 in the paper).
      "cispo"  no term is dropped: every token keeps the gradient A·∇log π_θ, scaled by its
               ratio clipped and detached, L = -w · sg[clip(ρ, 1 - clip_eps, 1 + clip_eps_high)]
               · A · log π_θ (CISPO, MiniMax-M1, arXiv 2506.13585, eq. 4-5). Its value is not
               PPO's surrogate; its gradient is the clipped-IS-weight policy gradient.

    `is_mask = (low, high)` drops, instead of truncating, every token whose behaviour weight
    π_prox/μ (before the cap) lies outside [low, high]: its term gets weight 0, while the
    aggregation still counts it (IcePop, Ling Team 2025, arXiv 2510.18855, §2.2; OpenRLHF's
    and SkyRL's "icepop" masks use [0.5, 5]). Such tokens are where the sampler and the
    trainer disagree most: stale ones, or a kernel mismatch.

    Shapes: logprobs, behavior_logprobs, proximal_logprobs, mask (B, T); advantages (B,)
    per sample, broadcast over tokens, or (B, T) per token. Only `logprobs` needs a gradient.
    Padding (mask 0) changes neither the loss nor the gradient, whatever it holds.

    At lag 0 (π_θ = π_prox = μ) ρ and w are exactly 1 and the gradient is the vanilla policy
    gradient -A·∇log π_θ, aggregated.

    Metrics, masked means over tokens unless said otherwise:
      clip_fraction    share of tokens whose clipped term is active (zero gradient);
      ratio_mean       mean ρ;
      is_weight_mean   mean w after truncation; is_weight_max: its maximum;
      is_truncated_fraction  share of tokens whose weight hit is_cap;
      is_masked_fraction     share of tokens is_mask dropped;
      is_ess           effective sample size of the weights, (Σw)² / (N·Σw²) over the N tokens
                       (1: all weights equal; small: a few tokens carry the gradient);
      approx_kl        k3 estimate of KL(μ ‖ π_θ): how far training has moved from the sampler;
      mismatch_kl      k3 estimate of KL(μ ‖ π_prox), π_prox defaulting to π_θ: the
                       train/inference mismatch that the weight corrects (prime-rl's mismatch_kl).
    """
    _check_choice("policy_loss", "objective", objective, OBJECTIVES)
    high = _check_policy_args(
        logprobs, behavior_logprobs, proximal_logprobs, advantages, mask, clip_eps, clip_eps_high
    )
    m = mask.bool()  # (B, T)
    # Zero the padding first: an inf or NaN there would otherwise leak into the gradient as NaN.
    lp = torch.where(m, logprobs.float(), 0.0)  # (B, T)
    behavior = torch.where(m, behavior_logprobs.detach().float(), 0.0)  # (B, T)
    proximal = None
    if proximal_logprobs is not None:
        proximal = torch.where(m, proximal_logprobs.detach().float(), 0.0)  # (B, T)
    adv = advantages.detach().float()
    adv = torch.where(m, adv.unsqueeze(-1) if adv.dim() == 1 else adv, 0.0)  # (B, T)

    per_token_cap = None if objective == "gspo" else is_cap  # GSPO truncates the sequence's weight
    ratio, weight = importance_ratios(lp, behavior, proximal, correction=correction, is_cap=per_token_cap)
    if objective == "gspo":
        ratio, weight = _per_sequence(ratio, weight, m, is_cap)
    dropped = torch.zeros_like(m)
    if is_mask is not None:
        anchor = lp.detach() if proximal is None or correction == "none" else proximal
        raw = torch.exp(anchor - behavior)  # (B, T): the weight before any cap
        dropped = m & ((raw < is_mask[0]) | (raw > is_mask[1]))
        weight = torch.where(dropped, 0.0, weight)
    if objective == "cispo":
        kept = ratio.detach().clamp(1 - clip_eps, 1 + high)  # (B, T), no gradient
        per_token = -weight * kept * adv * lp  # (B, T)
        clipping = kept != ratio.detach()
    else:
        unclipped = ratio * adv  # (B, T)
        clipped = ratio.clamp(1 - clip_eps, 1 + high) * adv  # (B, T)
        per_token = -weight * torch.minimum(unclipped, clipped)  # (B, T)
        clipping = clipped < unclipped
    loss = aggregate(per_token, m, agg, max_tokens)

    metrics = _policy_metrics(m, lp, behavior, proximal, ratio, weight, clipping, is_cap, dropped)
    return loss, metrics


def _per_sequence(ratio: Tensor, weight: Tensor, m: Tensor, is_cap: float | None) -> tuple[Tensor, Tensor]:
    """GSPO-token's ratio and the behaviour weight, each the geometric mean over its sequence's
    tokens, broadcast back to them: (B, T) -> (B, T). The ratio keeps each token's own gradient
    (value s_i, gradient s_i·∇log π_θ(y_t)); the weight is truncated at is_cap per sequence."""
    tokens = m.sum(dim=-1, keepdim=True).clamp(min=1)  # (B, 1)

    def seq_mean(x: Tensor) -> Tensor:  # (B, T) -> (B, 1): masked mean per row
        return torch.where(m, x, 0.0).sum(dim=-1, keepdim=True) / tokens

    log_ratio = torch.log(ratio)  # (B, T); ratio = exp(·) > 0
    seq_ratio = torch.exp(seq_mean(log_ratio).detach() + log_ratio - log_ratio.detach())  # (B, T)
    seq_weight = torch.exp(seq_mean(torch.log(weight)))  # (B, 1)
    if is_cap is not None:
        seq_weight = seq_weight.clamp(max=is_cap)
    return seq_ratio, seq_weight.expand_as(ratio)


def _check_policy_args(
    logprobs: Tensor, behavior_logprobs: Tensor, proximal_logprobs: Tensor | None, advantages: Tensor,
    mask: Tensor, clip_eps: float, clip_eps_high: float | None,
) -> float:  # fmt: skip
    """ValueError naming the problem unless policy_loss's arguments fit; returns the upper clip."""
    _check_shapes(
        "policy_loss", "logprobs", logprobs,
        behavior_logprobs=behavior_logprobs, proximal_logprobs=proximal_logprobs, mask=mask,
    )  # fmt: skip
    if advantages.shape not in (logprobs.shape, logprobs.shape[:1]):
        raise ValueError(
            f"policy_loss: advantages must be (B,) = {tuple(logprobs.shape[:1])} per sample or (B, T) = "
            f"{tuple(logprobs.shape)} per token, got {tuple(advantages.shape)}; flatten group advantages "
            "(G, n) to (G * n,) in the order of the rows"
        )
    high = clip_eps if clip_eps_high is None else clip_eps_high
    if not (0 < clip_eps < 1 and high > 0):
        raise ValueError(
            f"policy_loss: need 0 < clip_eps < 1 and clip_eps_high > 0, got clip_eps={clip_eps}, "
            f"clip_eps_high={clip_eps_high}; PPO uses 0.2, DAPO's clip-higher 0.28"
        )
    return high


def _policy_metrics(
    m: Tensor, lp: Tensor, behavior: Tensor, proximal: Tensor | None, ratio: Tensor, weight: Tensor,
    clipping: Tensor, is_cap: float | None, dropped: Tensor,
) -> dict[str, float]:  # fmt: skip
    """policy_loss's metrics (see there), masked means over tokens, with one device sync."""
    with torch.no_grad():
        tokens = m.sum().clamp(min=1)

        def masked_mean(x: Tensor) -> Tensor:
            return torch.where(m, x.float(), 0.0).sum() / tokens

        trainer_lp = lp.detach() if proximal is None else proximal
        truncated = weight >= is_cap if is_cap is not None else torch.zeros_like(m)
        w = torch.where(m, weight.float(), 0.0)
        ess = w.sum() ** 2 / (tokens * (w**2).sum()).clamp(min=1e-12)
        values = torch.stack(
            [
                masked_mean(clipping),
                masked_mean(ratio),
                masked_mean(weight),
                torch.where(m, weight, 0.0).max() if m.numel() else weight.new_zeros(()),
                masked_mean(truncated),
                masked_mean(kl_penalty(behavior, lp.detach())),
                masked_mean(kl_penalty(behavior, trainer_lp)),
                masked_mean(dropped),
                ess,
            ]
        ).tolist()  # one device sync for all metrics
    names = (
        "clip_fraction", "ratio_mean", "is_weight_mean", "is_weight_max",
        "is_truncated_fraction", "approx_kl", "mismatch_kl", "is_masked_fraction", "is_ess",
    )  # fmt: skip
    return dict(zip(names, values))


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: KLKind = "k3") -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π, in float32: (B, T) -> (B, T).

    With log r = log π_ref - log π (Schulman 2020, "Approximating KL Divergence",
    joschu.net/blog/kl-approx.html):
      k1 = -log r                unbiased, high variance, can be negative;
      k2 = (log r)^2 / 2         biased, low variance, always >= 0;
      k3 = (r - 1) - log r       unbiased, low variance, always >= 0; GRPO's KL term
                                 (Shao et al. 2024, arXiv 2402.03300, eq. 4).
    Used as `loss + beta * aggregate(kl_penalty(...), mask, mode)`. The gradient flows through
    `logprobs`; padding positions must hold finite values (the mask is applied by `aggregate`).
    """
    _check_choice("kl_penalty", "KL estimator", kind, KL_KINDS)
    _check_shapes("kl_penalty", "logprobs", logprobs, ref_logprobs=ref_logprobs)
    log_r = ref_logprobs.float() - logprobs.float()  # (B, T)
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r.square()
    return torch.expm1(log_r) - log_r
