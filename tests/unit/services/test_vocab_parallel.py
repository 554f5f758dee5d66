"""Vocab-parallel log-probs and entropy equal the dense computation, forward and backward: float64
gradcheck, float32 against log_softmax at atol 1e-5, two real gloo ranks, and the trainer's
TokenKind with the vocabulary in pieces."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.parallelism.vocab import vocab_parallel_logprobs

ATOL = 1e-5  # float32: log-probs of ~|7| and their gradients, summed over <= 1003 vocabulary rows


def dense(hidden, weight, targets, temperature=1.0, bias=None):
    """The reference: the whole (N, V) logits, log_softmax, and H = -Σ p log p."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
    logp = logits.log_softmax(-1)  # (N, V)
    return logp.gather(1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def inputs(n, v, h, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype) * scale
    bias = torch.randn(v, generator=g, dtype=dtype)
    return hidden, weight, bias


def boundary_targets(n, v, shards):
    """Targets on each piece's first and last row (pieces of ceil(v / shards) rows), then random."""
    step = -(-v // shards)
    edges = sorted({i for s in range(0, v, step) for i in (s, min(s + step, v) - 1)})
    picks = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1))
    picks[: len(edges)] = torch.tensor(edges)
    return picks


@pytest.mark.parametrize("shards,chunk,temperature", [(1, 0, 1.0), (4, 2, 0.7), (3, 0, 1.3)])
def test_float64_gradcheck_of_logp_and_entropy(shards, chunk, temperature):
    hidden, weight, bias = (x.requires_grad_() for x in inputs(5, 37, 8, torch.float64))
    targets = torch.tensor([0, 36, 9, 10, 27])  # piece edges when V=37 is cut 10/10/10/7

    def fn(hidden, weight, bias):
        return vocab_parallel_logprobs(
            hidden, weight, targets, temperature=temperature, chunk_tokens=chunk, shards=shards, bias=bias
        )

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


@pytest.mark.parametrize("shards,chunk,temperature", [(1, 0, 1.0), (1, 16, 0.6), (3, 7, 0.6), (8, 0, 1.7)])
def test_float32_matches_dense_log_softmax_forward_and_backward(shards, chunk, temperature):
    hidden, weight, bias = inputs(64, 1003, 32, torch.float32, scale=0.5)
    targets = boundary_targets(64, 1003, shards)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(64, generator=g), torch.randn(64, generator=g)  # upstream grads of log p, H
    results = []
    for fn in (dense, None):
        x = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        if fn is None:
            out = vocab_parallel_logprobs(
                x[0], x[1], targets, temperature=temperature, chunk_tokens=chunk, shards=shards, bias=x[2]
            )
        else:
            out = dense(x[0], x[1], targets, temperature, x[2])
        (out[0] * a + out[1] * b).sum().backward()
        results.append([*out, *(t.grad for t in x)])
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


def test_an_unused_entropy_gives_the_cross_entropy_gradient():
    hidden, weight, _ = inputs(20, 101, 16, torch.float32)
    targets = boundary_targets(20, 101, 4)
    grads = []
    for sharded in (False, True):
        h = hidden.clone().requires_grad_()
        lp = (
            vocab_parallel_logprobs(h, weight, targets, shards=4)[0]
            if sharded
            else dense(h, weight, targets)[0]
        )
        lp.sum().backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=ATOL, rtol=ATOL)


def test_no_grad_and_empty_inputs():
    hidden, weight, _ = inputs(6, 37, 8, torch.float32)
    with torch.no_grad():
        lp, ent = vocab_parallel_logprobs(hidden, weight, torch.arange(6), shards=2)
    torch.testing.assert_close(lp, dense(hidden, weight, torch.arange(6))[0], atol=ATOL, rtol=0)
    lp, ent = vocab_parallel_logprobs(hidden[:0], weight, torch.arange(0), shards=2, chunk_tokens=4)
    assert lp.shape == ent.shape == (0,)


def test_bad_inputs_name_the_value_and_the_fix():
    hidden, weight, _ = inputs(4, 10, 8, torch.float32)
    with pytest.raises(ValueError, match="target id 10 at position 2 is not in this weight's rows"):
        vocab_parallel_logprobs(hidden, weight, torch.tensor([0, 1, 10, 3]), shards=3)
    with pytest.raises(ValueError, match=r"hidden must be \(N, H\) and weight \(V_local, H\)"):
        vocab_parallel_logprobs(hidden, weight.T, torch.arange(4))
    with pytest.raises(ValueError, match="targets must be .* token ids"):
        vocab_parallel_logprobs(hidden, weight, torch.arange(4.0))
    with pytest.raises(ValueError, match="share one floating dtype"):
        vocab_parallel_logprobs(hidden.double(), weight, torch.arange(4))
    with pytest.raises(ValueError, match="temperature must be finite and > 0, got 0"):
        vocab_parallel_logprobs(hidden, weight, torch.arange(4), temperature=0)
    with pytest.raises(ValueError, match="shards >= 1, got chunk_tokens=0, shards=0"):
        vocab_parallel_logprobs(hidden, weight, torch.arange(4), shards=0)
    with pytest.raises(ValueError, match=r"bias must be \(V_local,\)"):
        vocab_parallel_logprobs(hidden, weight, torch.arange(4), bias=torch.zeros(3))


# --- two gloo ranks, each holding an uneven slice of the vocabulary --------------------------------

SPLIT = (0, 20, 37)  # rank r holds rows [SPLIT[r], SPLIT[r + 1]) of a 37-token vocabulary


def _count(name: str, calls: dict) -> None:
    """Count the calls of dist.<name> in this process."""
    original = getattr(dist, name)

    def counted(*args, **kwargs):
        calls[name] += 1
        return original(*args, **kwargs)

    setattr(dist, name, counted)


def _rank(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    calls = {"all_gather": 0, "all_reduce": 0}
    for name in calls:
        _count(name, calls)
    try:
        hidden, weight, bias = inputs(9, 37, 8, torch.float32)
        targets = torch.tensor([0, 19, 20, 36, 5, 25, 19, 20, 11])  # both sides of the cut
        a = torch.randn(9, generator=torch.Generator().manual_seed(3))
        b = torch.randn(9, generator=torch.Generator().manual_seed(4))
        lo, hi = SPLIT[rank], SPLIT[rank + 1]
        h, w, bb = (
            hidden.clone().requires_grad_(),
            weight[lo:hi].clone().requires_grad_(),
            bias[lo:hi].clone(),
        )
        lp, ent = vocab_parallel_logprobs(
            h,
            w,
            targets,
            vocab_start=lo,
            temperature=0.8,
            chunk_tokens=4,
            shards=2,
            group=dist.group.WORLD,
            bias=bb.requires_grad_(),
        )
        (lp * a + ent * b).sum().backward()
        assert calls == {"all_gather": 1, "all_reduce": 1}, calls  # one (N, 4) forward, one (N, H) backward
        ref = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        want = dense(ref[0], ref[1], targets, 0.8, ref[2])
        (want[0] * a + want[1] * b).sum().backward()
        for got, exp in [(lp, want[0]), (ent, want[1]), (h.grad, ref[0].grad), (w.grad, ref[1].grad[lo:hi]),
                         (bb.grad, ref[2].grad[lo:hi])]:  # fmt: skip
            torch.testing.assert_close(got, exp, atol=ATOL, rtol=ATOL)
        if rank == 0:  # a target outside every slice fails on every rank, with the same message
            with pytest.raises(ValueError, match="target id 40 at position 0 is not in one rank's rows"):
                vocab_parallel_logprobs(h, w, torch.full((9,), 40), vocab_start=lo, group=dist.group.WORLD)
        else:
            with pytest.raises(ValueError, match="this rank's: \\[20, 37\\)"):
                vocab_parallel_logprobs(h, w, torch.full((9,), 40), vocab_start=lo, group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_dense_with_one_collective_each_way():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port,), nprocs=2, join=True)


# --- the trainer's log-probs through TokenKind ----------------------------------------------------


def test_token_kind_with_vocab_shards_gives_the_dense_logprobs_and_gradients():
    from asyncflow.config import ModelConfig, RolloutConfig
    from asyncflow.tasks.sorting import SortDigits
    from services.models import build_model
    from workers.kinds import TokenKind, TokenSample
    from workers.policy import make_tokenizer

    tokenizer = make_tokenizer(SortDigits())
    rollout = RolloutConfig(temperature=0.7)
    rows = [
        TokenSample([1, 5, 6], [8, 2], [], [], 0.0, None),
        TokenSample([1, 7], [9, 9, 2], [], [], 0.0, None),
    ]
    for tied in (False, True):
        model = build_model(len(tokenizer), tie_embeddings=tied, seed=0)
        results = []
        for shards, chunk in ((1, 0), (4, 0), (4, 2)):
            model.zero_grad()
            kind = TokenKind(tokenizer, ModelConfig(), rollout, chunk_tokens=chunk, vocab_shards=shards)
            lp, mask = kind.logprobs(model, rows)
            (lp[mask] * torch.arange(1.0, 6.0)).sum().backward()
            results.append((lp[mask].detach(), [p.grad.clone() for p in model.parameters()]))
        for lp, grads in results[1:]:
            torch.testing.assert_close(lp, results[0][0], atol=ATOL, rtol=0)
            for got, want in zip(grads, results[0][1]):
                torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
