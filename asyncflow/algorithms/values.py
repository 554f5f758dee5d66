"""The critic's loss: clipped value regression toward the GAE returns, and its figures.

Tensors in, a scalar loss and float metrics out; nothing here knows about models or the store.
The advantages and returns come from `advantages.gae`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from asyncflow.algorithms.losses import Aggregation, aggregate

__all__ = ["explained_variance", "value_loss"]


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip: float | None = 0.2,
    agg: Aggregation = "token-mean",
    max_tokens: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped value loss, a scalar to minimise, and metrics.

    Per token, L_V = ½ · max((V - R)², (V_old + clip(V - V_old, -c, c) - R)²): the critic may not
    move its prediction more than c from the values the advantages were computed with, unless that
    brings it closer to the return R (the value clipping of OpenAI baselines' ppo2, as used by
    Schulman et al. 2017's PPO implementation, arXiv 1707.06347; Ouyang et al. 2022's InstructGPT
    PPO; verl's and OpenRLHF's `cliprange_value`). `clip=None` is the plain ½(V - R)². Tokens are
    reduced with `aggregate(…, agg, max_tokens)`, like the policy loss.

    Shapes: values (with gradient), old_values, returns, mask (B, T). Padding changes nothing.

    Metrics: value_loss (the loss), value_clip_fraction (share of tokens where the clipped term is
    the larger, so its gradient is 0), value_mean (mean V), return_mean (mean R).
    """
    if not (values.shape == old_values.shape == returns.shape == mask.shape) or values.dim() != 2:
        raise ValueError(
            f"value_loss: values, old_values, returns and mask must all be (B, T), got "
            f"{tuple(values.shape)}, {tuple(old_values.shape)}, {tuple(returns.shape)}, {tuple(mask.shape)}"
        )
    if clip is not None and not clip > 0:
        raise ValueError(f"value_loss: clip must be > 0 or None (off), got {clip}; PPO uses 0.2")
    m = mask.bool()
    v = torch.where(m, values.float(), 0.0)  # (B, T)
    old = torch.where(m, old_values.detach().float(), 0.0)
    ret = torch.where(m, returns.detach().float(), 0.0)
    unclipped = (v - ret).square()  # (B, T)
    if clip is None:
        per_token, clipping = 0.5 * unclipped, torch.zeros_like(m)
    else:
        clipped = (old + (v - old).clamp(-clip, clip) - ret).square()
        per_token, clipping = 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped
    loss = aggregate(per_token, m, agg, max_tokens)
    with torch.no_grad():
        tokens = m.sum().clamp(min=1)
        figures = torch.stack(
            [loss.detach(), (clipping & m).sum() / tokens, v.sum() / tokens, ret.sum() / tokens]
        )
        names = ("value_loss", "value_clip_fraction", "value_mean", "return_mean")
        metrics = dict(zip(names, figures.tolist()))
    return loss, metrics


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the masked positions: 1 when the critic predicts the returns
    exactly, 0 when it does no better than their mean, negative when worse (OpenAI baselines'
    `explained_variance`). NaN when the returns do not vary."""
    m = mask.bool()
    ret, v = returns.float()[m], values.float()[m]
    var = ret.var(correction=0) if ret.numel() else ret.new_zeros(())
    if not var > 0:
        return float("nan")
    return float(1 - (ret - v).var(correction=0) / var)
