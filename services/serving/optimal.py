"""NanoFlow's yardstick: rollout throughput as a fraction of what this machine could do at best.

At useful batch sizes decoding is compute-bound, so a model of P parameters costs about
2·P FLOPs per token and the best a device can do is `Compute / (2·P)` tokens/s (NanoFlow,
arXiv 2408.12757, Eq. 5), whatever the sequence lengths. Compute is measured here, not
taken from a data sheet: the best of a few square matmuls in the model's dtype on its
device, with the threads the process has. "% of optimal" is then measured tokens/s over
that bound; on a CPU the bound is as honest as on a GPU, only smaller.
"""

from __future__ import annotations

import functools
import time

import torch

__all__ = ["matmul_flops", "optimal_tokens_per_s", "percent_of_optimal"]


@functools.cache
def matmul_flops(device: str = "cpu", dtype: torch.dtype = torch.float32, size: int = 1024) -> float:
    """Measured FLOP/s of a (size × size) @ (size × size) matmul: the best of 5 after a warm-up.

    Cached per process and setting: the first engine of a process pays ~0.1-0.5 s on a CPU. The
    global random state is left as it was.
    """
    # Its own generator: the global RNG is the engine's (vLLM seeds it and samples from it), and a
    # measurement must not move the samples a seeded run draws.
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=g).to(dtype)
    b = torch.randn(size, size, device=device, generator=g).to(dtype)
    best = float("inf")
    for attempt in range(6):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        torch.matmul(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if attempt:  # the first is the warm-up
            best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def optimal_tokens_per_s(model: torch.nn.Module) -> float:
    """This machine's bound for `model`: measured matmul FLOP/s ÷ (2 · parameters)."""
    first = next(model.parameters())
    params = sum(p.numel() for p in model.parameters())
    return matmul_flops(str(first.device), first.dtype) / (2 * params)


def percent_of_optimal(tokens: float, seconds: float, bound_tokens_per_s: float) -> float:
    """tokens/s over the bound, in percent (0 when nothing ran or no bound is known)."""
    if seconds <= 0 or bound_tokens_per_s <= 0:
        return 0.0
    return 100.0 * tokens / seconds / bound_tokens_per_s
