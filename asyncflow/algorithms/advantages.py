"""Advantages: group-relative (one scalar per sample from the rewards of its group), or per token
from a learned critic's values (GAE).

A group is the `n` samples drawn for one prompt; each sample's advantage is its reward
against a baseline built from the other samples of the same group, so no value network is
needed. The estimators differ only in the baseline and the scale.

This module knows nothing about prompts, rewards' origin, tokens or versions: a (G, n) tensor
of rewards in, a (G, n) tensor of advantages out, broadcast over tokens by the loss. `gae` takes
a (B, T) grid of per-token rewards and values instead and returns per-token advantages.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

__all__ = ["ESTIMATORS", "Estimator", "gae", "group_advantages", "whiten"]

Estimator = Literal["grpo", "drgrpo", "rloo", "reinforce++"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)


def group_advantages(rewards: Tensor, estimator: Estimator = "grpo", eps: float = 1e-6) -> Tensor:
    """Advantages of each sample within its group, in float32: (G, n) -> (G, n).

    Row g holds the rewards of the n samples of prompt g.

    - "grpo": A_i = (r_i - mean(r)) / (std(r) + eps), the outcome-supervision advantage of
      GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, §4.1.2). std is the *sample*
      standard deviation (Bessel's correction, divisor n - 1), as in TRL, verl and OpenRLHF,
      so results match theirs. A group whose rewards are all equal gets 0.
    - "drgrpo": A_i = r_i - mean(r), no division by std, which Liu et al. 2025 ("Understanding
      R1-Zero-Like Training", Dr. GRPO, arXiv 2503.20783, §3.1 and Fig. 1) show biases the
      update toward prompts that are too easy or too hard.
    - "rloo": A_i = r_i - mean_{j != i}(r_j) = n / (n - 1) * (r_i - mean(r)), the REINFORCE
      leave-one-out baseline (Ahmadian et al. 2024, "Back to Basics", arXiv 2402.14740, the
      RLOO estimator; after Kool et al. 2019). It needs n >= 2.
    - "reinforce++": A_i = (r_i - mean(r)) / (std_batch + eps), the group mean as baseline and
      one scale for the whole batch: the standard deviation of every centred reward of all G
      groups (REINFORCE++-baseline, Hu et al. 2025, arXiv 2501.03262, §3: global advantage
      normalisation, which a group's own std would make a per-prompt reweighting). Pass the
      whole batch's rewards at once.

    A group of one sample has no baseline but itself: "grpo" and "drgrpo" give 0 (no signal),
    "rloo" raises because its estimator is undefined.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {ESTIMATORS}")
    if rewards.dim() != 2:
        raise ValueError(
            f"group_advantages: rewards must be (G, n) = (prompts, samples per prompt), got shape "
            f"{tuple(rewards.shape)}; reshape a flat batch with rewards.view(-1, n)"
        )
    r = rewards.float()  # (G, n)
    if not bool(torch.isfinite(r).all()):
        raise ValueError("group_advantages: rewards contain NaN or inf; check the reward function's output")
    n = r.shape[1]
    if estimator == "rloo" and n < 2:
        raise ValueError(
            f"group_advantages: 'rloo' needs at least 2 samples per group to form a leave-one-out "
            f"baseline, got n={n}; sample n >= 2 per prompt or use 'grpo' / 'drgrpo'"
        )
    mean = r.mean(dim=1, keepdim=True)  # (G, 1)
    if estimator == "rloo":
        baseline = (r.sum(dim=1, keepdim=True) - r) / (n - 1)  # (G, n): mean of the other n-1
        return r - baseline
    centred = r - mean  # (G, n)
    if estimator == "drgrpo" or n == 1:
        return centred
    if estimator == "reinforce++":
        return centred / (centred.std(correction=0) + eps) if centred.numel() > 1 else centred
    std = r.std(dim=1, keepdim=True, correction=1)  # (G, 1)
    return centred / (std + eps)


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation per token: (advantages, returns), each (B, T) in float32.

    With δ_t = r_t + γ·V(s_{t+1}) - V(s_t), the advantage is Â_t = Σ_l (γλ)^l δ_{t+l}, computed
    backwards as Â_t = δ_t + γλ·Â_{t+1} (Schulman et al. 2016, "High-Dimensional Continuous Control
    Using Generalized Advantage Estimation", arXiv 1506.02438, eq. 16), and the critic's target is
    the λ-return R_t = Â_t + V(s_t). Row b's actions are the positions where `mask` is true, in
    order (padding may sit between or around them: it is skipped); the state after its last action
    is terminal (V = 0). λ = 1 gives Monte-Carlo returns minus the values; λ = 0 one-step TD errors.

    Shapes: rewards, values, mask (B, T). Padding positions hold anything finite; they come out 0.
    """
    if rewards.dim() != 2 or rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(
            f"gae: rewards, values and mask must all be (B, T), got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)} and {tuple(mask.shape)}; put each sample's actions on one row"
        )
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise ValueError(f"gae: need 0 <= gamma <= 1 and 0 <= lam <= 1, got gamma={gamma}, lam={lam}")
    m = mask.bool()
    r = torch.where(m, rewards.float(), 0.0)  # (B, T)
    v = torch.where(m, values.detach().float(), 0.0)  # (B, T)
    advantages = torch.zeros_like(r)
    next_value = r.new_zeros(r.shape[0])  # (B,): V of the state after the action at t (0: terminal)
    next_adv = r.new_zeros(r.shape[0])  # (B,)
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(m[:, t], adv, 0.0)
        next_value = torch.where(m[:, t], v[:, t], next_value)  # padding carries the next action's
        next_adv = torch.where(m[:, t], adv, next_adv)
    return advantages, torch.where(m, advantages + v, 0.0)


def whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / (std + eps) over the masked positions of a (B, T) grid; padding comes out 0.
    PPO's per-batch advantage normalisation (as in OpenAI baselines' ppo2, and RLHF's PPO since
    Ziegler et al. 2019, arXiv 1909.08593). The std is the population one; one position gives 0."""
    m = mask.bool()
    x = values.float()[m]  # (N,)
    if x.numel() < 2:
        return torch.zeros_like(values, dtype=torch.float32)
    out = (values.float() - x.mean()) / (x.std(correction=0) + eps)
    return torch.where(m, out, 0.0)
