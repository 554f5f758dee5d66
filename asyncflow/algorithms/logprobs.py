"""Per-token log-probabilities and entropies from a model's logits.

The trainer turns its forward pass into the per-token log-probs that the losses compare
against the rollout engine's. These are the log-probs of the distribution the engine samples
from: softmax(logits / temperature), truncated to the top-k tokens and then to the top-p
nucleus of what top-k kept, and renormalised (`truncate`; the order vLLM and transformers
apply). Recomputing over the full softmax instead would make the importance ratio differ from
1 even on-policy whenever top-k or top-p is on (peers' issue verl-project/verl#2996).

`chunked_token_logprobs` computes the same from hidden states and the LM head, a chunk of
positions at a time, so the (tokens, vocab) logits never exist whole, neither in the forward nor
in the backward.

This module knows nothing about models, tokenizers or where the logits came from: tensors in,
tensors out, in float32 whatever the logits' dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["chunked_token_logprobs", "entropy", "token_logprobs", "truncate"]


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


def truncate(scores: Tensor, top_k: Tensor | int = 0, top_p: Tensor | float = 1.0) -> Tensor:
    """`scores` (..., V) with every token outside the top-k, then outside the top-p nucleus of what
    top-k kept, set to -inf. `top_k` (0: off) and `top_p` (1: off) are one value, or one per row.

    Top-k keeps the k highest scores; top-p then keeps the smallest set of most likely tokens
    whose mass reaches p (Holtzman et al. 2020, arXiv 1904.09751, §3.1), the mass measured after
    top-k. The kept set is chosen without gradient; kept scores keep theirs.
    """
    rows = scores.shape[:-1]
    k = torch.as_tensor(top_k, device=scores.device).expand(rows)  # (...)
    p = torch.as_tensor(top_p, dtype=torch.float32, device=scores.device).expand(rows)  # (...)
    use_k, use_p = k > 0, p < 1
    if not bool(use_k.any() or use_p.any()):
        return scores
    with torch.no_grad():
        sorted_scores, order = scores.sort(-1, descending=True)  # (..., V)
        rank = torch.arange(scores.shape[-1], device=scores.device)
        drop = use_k[..., None] & (rank >= k[..., None])  # (..., V), in sorted order
        probs = torch.softmax(sorted_scores.masked_fill(drop, float("-inf")), -1)
        mass_before = probs.cumsum(-1) - probs
        # Rows with top_p == 1 skip the filter: the rounded cumulative sum can reach 1 early.
        drop |= use_p[..., None] & (mass_before >= p[..., None])
        drop = torch.zeros_like(drop).scatter(-1, order, drop)  # back to vocabulary order
    return scores.masked_fill(drop, float("-inf"))


# A token outside the kept set has probability 0 under the sampler; its log-prob is clamped here
# (e^-100 is below float32's smallest normal number), so that ratios are 0, not NaN.
_FLOOR = -100.0


def token_logprobs(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Tensor:
    """log softmax(truncate(logits / temperature)) at each target token, in float32.

    Shapes: logits (B, T, V), targets (B, T) -> (B, T).

    log π(y_t | y_<t) = z[y_t] - logsumexp(z), with z = logits / temperature: the per-token
    log-probability in the policy-gradient objectives (PPO, Schulman et al. 2017, arXiv
    1707.06347, eq. 7; GRPO, Shao et al. 2024, arXiv 2402.03300, eq. 3). Computed as a gather
    minus a logsumexp, so no (B, T, V) log-softmax is built beside the scaled logits.
    `targets[:, t]` is the token that logits[:, t] predicts (the caller shifts by one). With
    `top_k` / `top_p` on, the distribution is the truncated one the engine sampled from.
    """
    z = truncate(_scaled(logits, temperature, "token_logprobs"), top_k, top_p)  # (B, T, V)
    if targets.dim() != 2 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"token_logprobs: targets must be (B, T) = {tuple(logits.shape[:2])} to match logits "
            f"{tuple(logits.shape)}, got {tuple(targets.shape)}; shift targets so that targets[:, t] "
            "is the token logits[:, t] predicts"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token_logprobs: targets must be token ids (int64), got dtype {targets.dtype}")
    picked = z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # (B, T)
    logprobs = picked - torch.logsumexp(z, dim=-1)  # (B, T)
    return logprobs if top_k == 0 and top_p == 1.0 else logprobs.clamp_min(_FLOOR)


def chunked_token_logprobs(
    hidden: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor, chunk_tokens: int,
    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
) -> Tensor:  # fmt: skip
    """`token_logprobs(head(hidden), targets, ...)` computed `chunk_tokens` positions at a time:
    hidden (N, H), targets (N,) -> (N,), in float32.

    Only one chunk's logits (chunk_tokens, V) exist at once. With gradient, each chunk runs under
    activation checkpointing (Chen et al. 2016, arXiv 1604.06174): the forward keeps the chunk's
    hidden states alone and the backward recomputes its logits, so the backward holds one chunk's
    logits and their gradient at a time too, at the price of a second pass through the head.
    """
    if chunk_tokens < 1:
        raise ValueError(
            f"chunked_token_logprobs: chunk_tokens={chunk_tokens}, expected >= 1 positions per chunk; "
            "call token_logprobs on the whole logits instead to turn chunking off"
        )
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"chunked_token_logprobs: hidden must be (N, H) and targets (N,), got {tuple(hidden.shape)}"
            f" and {tuple(targets.shape)}; select the positions to score first: hidden[mask], targets[mask]"
        )

    def chunk(h: Tensor, t: Tensor) -> Tensor:  # (n, H), (n,) -> (n,)
        return token_logprobs(head(h)[None], t[None], temperature, top_k, top_p)[0]

    parts = [
        checkpoint(chunk, h, t, use_reentrant=False) if torch.is_grad_enabled() else chunk(h, t)
        for h, t in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens))
    ]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) at each position, in float32: (B, T, V) -> (B, T).

    H = -Σ_v p_v log p_v = logsumexp(z) - Σ_v p_v z_v with p = softmax(z), z = logits / temperature;
    the entropy bonus of PPO (Schulman et al. 2017, arXiv 1707.06347, eq. 9) and the entropy
    logged by DAPO (Yu et al. 2025, arXiv 2503.14476, §3.1) to watch for entropy collapse.
    """
    z = _scaled(logits, temperature, "entropy")  # (B, T, V)
    p = torch.softmax(z, dim=-1)  # (B, T, V)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)  # (B, T)
