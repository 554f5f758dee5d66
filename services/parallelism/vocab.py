"""Per-token log-probs and entropies from an LM head split over its vocabulary.

The trainer needs log p(y_t) and the entropy H_t at each response token, never the (tokens,
vocab) logits, which are its largest activation (16k tokens x a 152k vocabulary is 10 GB in
float32). Each vocabulary slice s (this rank's rows of the head when a process group splits
it, or one of `shards` pieces of them) reduces its logits z = (hidden @ W_s^T + b_s) / T to
four numbers per token, computed without knowing the other slices:

    m_s = max z,  S_s = Σ e^(z - m_s),  Z_s = Σ e^(z - m_s)(z - m_s),  y_s = z[target] (NaN: not in s)

and the slices merge by online-softmax rescaling (Milakov & Gimelshein 2018, arXiv 1805.02867;
the vocabulary-parallel form is Yeung et al. 2024, arXiv 2411.05288, §4):

    M = max_s m_s,  S = Σ_s e^(m_s - M) S_s,  lse = M + log S,  log p(y) = y - lse
    H = lse - E_p[z] = log S - Σ_s e^(m_s - M)(Z_s + (m_s - M) S_s) / S

Across ranks that is one all_gather of (tokens, 4) per forward. The backward recomputes the
logits from the saved hidden states and (tokens, 2) statistics (lse, H), a slice at a time:

    dz_i = a (1[i = y] - p_i) - b p_i (log p_i + H)      (a, b: upstream grads of log p and H)

each rank's weight gradient dz^T hidden stays local, and d(hidden) = Σ_s dz_s W_s takes one
all_reduce of (tokens, hidden). Only (chunk_tokens, V_local / shards) logits exist at once.

This module knows nothing about models or the sampler's top-k and top-p (they need the whole
vocabulary row): hidden states and a weight slice in, two vectors out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["vocab_parallel_logprobs"]


@dataclass(frozen=True)
class _Plan:
    vocab_start: int
    temperature: float
    chunk_tokens: int
    shards: int
    group: Any

    def token_chunks(self, n: int) -> list[slice]:
        step = self.chunk_tokens or max(n, 1)
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def pieces(self, v: int) -> list[slice]:
        """This rank's vocabulary in `shards` pieces of ceil(v / shards) rows (the last shorter)."""
        step = math.ceil(v / self.shards)
        return [slice(i, min(i + step, v)) for i in range(0, v, step)]


def vocab_parallel_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    vocab_start: int = 0,
    temperature: float = 1.0,
    chunk_tokens: int = 0,
    shards: int = 1,
    group: Any = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """log softmax(z)[targets] and the entropy of softmax(z), z = (hidden @ W^T + bias) / temperature
    over the whole vocabulary: hidden (N, H), weight (V_local, H), targets (N,) -> (N,), (N,).

    `weight` holds vocabulary rows [vocab_start, vocab_start + V_local); `targets` are ids in the
    whole vocabulary. With `group` (torch.distributed), every rank passes the same hidden states
    and targets and its own slice; the ranks' slices must cover the vocabulary once, unevenly if
    need be. `shards` splits this rank's slice further and `chunk_tokens` (0: all) the tokens, so
    at most (chunk_tokens, V_local / shards) logits exist at once. `temperature` is the sampler's,
    applied as it applies it: logits in float32, then divided. The results are float32 (float64
    for float64 inputs) and differentiable w.r.t. hidden, weight and bias; with a group the
    losses after this call must be the same on every rank (as under tensor parallelism).
    """
    _check(hidden, weight, targets, bias, vocab_start, temperature, chunk_tokens, shards)
    plan = _Plan(vocab_start, float(temperature), chunk_tokens, shards, group)
    logp, entropy = _VocabParallel.apply(hidden, weight, bias, targets, plan)
    return logp, entropy


class _VocabParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, plan: _Plan):
        local = hidden.new_empty((hidden.shape[0], 4), dtype=_compute_dtype(hidden))  # (N, 4)
        for rows in plan.token_chunks(hidden.shape[0]):
            h, t = hidden[rows], targets[rows] - plan.vocab_start
            parts = [_slice_stats(h, weight[p], _rows(bias, p), t - p.start, plan.temperature)
                     for p in plan.pieces(weight.shape[0])]  # fmt: skip
            local[rows] = _merge(torch.stack(parts))
        stats = _merge(_gather(local, plan.group))  # (N, 4): M, S, Z, y
        _check_owned(stats, targets, plan, weight.shape[0])
        m, s, z, y = stats.unbind(1)
        lse = m + s.log()  # (N,)
        logp, entropy = y - lse, s.log() - z / s
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.plan = plan
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_logp: Tensor, d_entropy: Tensor):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        plan: _Plan = ctx.plan
        acc = torch.promote_types(weight.dtype, torch.float32)  # gradients sum in float32 at least
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = hidden.new_zeros(hidden.shape, dtype=acc) if need_h else None  # (N, H)
        dw = weight.new_zeros(weight.shape, dtype=acc) if need_w else None  # (V_local, H)
        db = weight.new_zeros(weight.shape[0], dtype=acc) if need_b else None  # (V_local,)
        for rows in plan.token_chunks(hidden.shape[0]):
            h, t = hidden[rows], targets[rows] - plan.vocab_start
            upstream = (lse[rows], entropy[rows], d_logp[rows], d_entropy[rows])
            for p in plan.pieces(weight.shape[0]):
                dz = _slice_grad(h, weight[p], _rows(bias, p), t - p.start, plan.temperature, *upstream)
                dz = dz.to(weight.dtype)  # (n, v)
                if dh is not None:
                    _add_matmul(dh[rows], dz, weight[p])
                if dw is not None:
                    _add_matmul(dw[p], dz.T, h)
                if db is not None:
                    db[p] += dz.sum(0)
                del dz  # before the next slice's logits exist, or it doubles what is in flight
        if dh is not None and plan.group is not None:
            dist.all_reduce(dh, group=plan.group)  # each rank holds Σ over its slice; the sum is all
        cast = [
            g.to(x.dtype) if g is not None else None for g, x in ((dh, hidden), (dw, weight), (db, weight))
        ]
        return *cast, None, None


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _rows(bias: Tensor | None, p: slice) -> Tensor | None:
    return None if bias is None else bias[p]


def _logits(h: Tensor, w: Tensor, b: Tensor | None, temperature: float) -> Tensor:
    """(n, v) scaled logits, as the sampler makes them: the head's output in float32, divided."""
    z = torch.nn.functional.linear(h, w, b).to(_compute_dtype(h))  # (n, v), a fresh tensor
    return z if temperature == 1.0 else z.div_(temperature)


def _slice_stats(h: Tensor, w: Tensor, b: Tensor | None, t: Tensor, temperature: float) -> Tensor:
    """(n, 4): m, S, Z, y of one vocabulary slice; `t` are the targets relative to its first row."""
    z = _logits(h, w, b, temperature)  # (n, v)
    m = z.amax(1, keepdim=True)  # (n, 1)
    z.sub_(m)
    e = z.exp()  # (n, v)
    s = e.sum(1)
    zs = e.mul_(z).sum(1)
    owned = (t >= 0) & (t < w.shape[0])
    y = z.gather(1, t.clamp(0, w.shape[0] - 1)[:, None])[:, 0] + m[:, 0]
    return torch.stack([m[:, 0], s, zs, y.masked_fill(~owned, math.nan)], 1)


def _merge(stats: Tensor) -> Tensor:
    """(K, n, 4) statistics of K disjoint slices -> (n, 4) of their union (y NaN unless one owns it)."""
    m, s, z, y = stats.unbind(-1)  # (K, n) each
    big = m.amax(0)  # (n,)
    shift = m - big
    scale = shift.exp()
    owners = (~y.isnan()).sum(0)
    y = torch.where(owners == 1, y.nan_to_num(0.0).sum(0), math.nan)
    return torch.stack([big, (scale * s).sum(0), (scale * (z + shift * s)).sum(0), y], 1)


def _gather(local: Tensor, group: Any) -> Tensor:
    """(N, 4) of this rank -> (ranks, N, 4): the forward's one collective."""
    if group is None:
        return local[None]
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return torch.stack(parts)


def _slice_grad(
    h: Tensor, w: Tensor, b: Tensor | None, t: Tensor, temperature: float,
    lse: Tensor, entropy: Tensor, a: Tensor, g: Tensor,
) -> Tensor:  # fmt: skip
    """(n, v) gradient w.r.t. the slice's unscaled logits, given the upstream grads a of log p and
    g of H: dz = a (1[i = y] - p) - g p (log p + H), divided by the temperature."""
    logp = _logits(h, w, b, temperature).sub_(lse[:, None])  # (n, v)
    p = logp.exp()
    dz = logp.add_(entropy[:, None]).mul_(g[:, None]).add_(a[:, None]).mul_(p).neg_()
    owned = ((t >= 0) & (t < w.shape[0])).nonzero()[:, 0]
    dz.index_put_((owned, t[owned]), a[owned].to(dz.dtype), accumulate=True)
    return dz if temperature == 1.0 else dz.div_(temperature)


def _add_matmul(out: Tensor, x: Tensor, y: Tensor) -> None:
    """out += x @ y, in place when the dtypes agree (no temporary the size of out)."""
    if out.dtype == x.dtype:
        out.addmm_(x, y)
    else:
        out += (x @ y).to(out.dtype)


def _check_owned(stats: Tensor, targets: Tensor, plan: _Plan, v: int) -> None:
    """Every target lies in exactly one slice (y is NaN otherwise, while the logits are finite)."""
    bad = (stats[:, 3].isnan() & ~stats[:, 0].isnan()).nonzero()
    if len(bad):
        i, span = int(bad[0, 0]), f"[{plan.vocab_start}, {plan.vocab_start + v})"
        scope = (
            f"this weight's rows {span}" if plan.group is None else f"one rank's rows (this rank's: {span})"
        )
        raise ValueError(
            f"vocab_parallel_logprobs: target id {int(targets[i])} at position {i} is not in {scope}; "
            "targets must be ids of the whole vocabulary, each in one slice: check them and vocab_start"
        )


def _check(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None,
    vocab_start: int, temperature: float, chunk_tokens: int, shards: int,
) -> None:  # fmt: skip
    fn = "vocab_parallel_logprobs"
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{fn}: hidden must be (N, H) and weight (V_local, H), got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}; pass the LM head's weight (its nn.Linear.weight) and hidden[mask]"
        )
    if targets.shape != hidden.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"{fn}: targets must be (N,) = ({hidden.shape[0]},) token ids (int64), got shape "
            f"{tuple(targets.shape)} dtype {targets.dtype}; select the scored positions: targets[mask]"
        )
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(
            f"{fn}: hidden and weight must share one floating dtype, got {hidden.dtype} and {weight.dtype}; "
            "cast hidden to the head's dtype"
        )
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != weight.dtype):
        raise ValueError(
            f"{fn}: bias must be (V_local,) = ({weight.shape[0]},) of dtype {weight.dtype}, got "
            f"{tuple(bias.shape)} {bias.dtype}; pass the head's own bias, sliced like its weight"
        )
    if weight.shape[0] < 1 or vocab_start < 0:
        raise ValueError(
            f"{fn}: the weight slice must have >= 1 row and vocab_start >= 0, got {weight.shape[0]} rows "
            f"at vocab_start={vocab_start}; split the vocabulary so that every rank holds some of it"
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{fn}: temperature must be finite and > 0, got {temperature}; use the sampler's")
    if chunk_tokens < 0 or shards < 1:
        raise ValueError(
            f"{fn}: chunk_tokens must be >= 0 (0: all tokens at once) and shards >= 1, got "
            f"chunk_tokens={chunk_tokens}, shards={shards}"
        )
