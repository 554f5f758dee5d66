"""Per-token log-probabilities and entropies from a model's logits.

The trainer turns its forward pass into the per-token log-probs that the losses compare
against the rollout engine's. These are the log-probs of the temperature-scaled distribution
softmax(logits / temperature), which is exactly what the rollout engine samples from when
top_p = 1 and top_k = 0; with nucleus or top-k sampling the engine samples from a truncated,
renormalised distribution and its log-probs differ from these (peers' issue
verl-project/verl#2996).

This module knows nothing about models, tokenizers or where the logits came from: tensors in,
tensors out, in float32 whatever the logits' dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["entropy", "token_logprobs"]


def _scaled(logits: Tensor, temperature: float, fn: str) -> Tensor:
    if logits.dim() != 3:
        raise ValueError(
            f"{fn}: logits must be (B, T, V), got shape {tuple(logits.shape)}; "
            "add a batch dimension with logits.unsqueeze(0) for a single sequence"
        )
    if not temperature > 0:
        raise ValueError(f"{fn}: temperature must be > 0, got {temperature}; use the rollout's temperature")
    scaled = logits.float()  # (B, T, V); a copy only when logits are not float32 already
    return scaled if temperature == 1.0 else scaled / temperature


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) at each target token, in float32: (B, T, V), (B, T) -> (B, T).

    log π(y_t | y_<t) = z[y_t] - logsumexp(z), with z = logits / temperature: the per-token
    log-probability in the policy-gradient objectives (PPO, Schulman et al. 2017, arXiv
    1707.06347, eq. 7; GRPO, Shao et al. 2024, arXiv 2402.03300, eq. 3). Computed as a gather
    minus a logsumexp, so no (B, T, V) log-softmax is built beside the scaled logits.
    `targets[:, t]` is the token that logits[:, t] predicts (the caller shifts by one).
    """
    z = _scaled(logits, temperature, "token_logprobs")  # (B, T, V)
    if targets.dim() != 2 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"token_logprobs: targets must be (B, T) = {tuple(logits.shape[:2])} to match logits "
            f"{tuple(logits.shape)}, got {tuple(targets.shape)}; shift targets so that targets[:, t] "
            "is the token logits[:, t] predicts"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token_logprobs: targets must be token ids (int64), got dtype {targets.dtype}")
    picked = z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(z, dim=-1)  # (B, T)


def entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) at each position, in float32: (B, T, V) -> (B, T).

    H = -Σ_v p_v log p_v = logsumexp(z) - Σ_v p_v z_v with p = softmax(z), z = logits / temperature;
    the entropy bonus of PPO (Schulman et al. 2017, arXiv 1707.06347, eq. 9) and the entropy
    logged by DAPO (Yu et al. 2025, arXiv 2503.14476, §3.1) to watch for entropy collapse.
    """
    z = _scaled(logits, temperature, "entropy")  # (B, T, V)
    p = torch.softmax(z, dim=-1)  # (B, T, V)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)  # (B, T)
