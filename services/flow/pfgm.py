"""PFGM++: the D-dimensional augmented perturbation kernel as the source of a flow.

Xu et al. 2023, "PFGM++: Unlocking the Potential of Physics-Inspired Generative Models"
(arXiv 2302.04265; repo Newbeeer/pfgmpp). Data y in R^N is augmented with z in R^D and only
r = |z| matters. The perturbation kernel is

    p_r(x | y)  proportional to  (|x - y|^2 + r^2)^(-(N + D) / 2),

sampled (paper §4, the repo's `training/loss.py`) as x = y + R u with

    R = r sqrt(B / (1 - B)),   B ~ Beta(N/2, D/2),   u uniform on the unit sphere of R^N.

With the alignment r = sigma sqrt(D), EDM's noise levels carry over, and as D -> infinity
R u -> sigma * N(0, I): diffusion (D = inf below). Small D gives heavier tails (the kernel
is a multivariate t with D degrees of freedom, scale sigma), which the paper finds more
robust to large steps and to errors in the sampler.

As a flow. In services.flow's convention (x_t = (1 - t) x_data + t x_source), taking x_source
= the kernel's noise at sigma = 1 makes x_t / (1 - t) = y + (t / (1 - t)) x_source, the PFGM++
perturbation at sigma = t / (1 - t): the flow's marginal velocity is PFGM++'s ODE
dx/dr = (x - E[y | x]) / r in rectified coordinates, exactly as EDM's ODE is the Gaussian
rectified flow. So PFGM++ trains with any pre-training loss of services.flow.losses by
passing `pfgm_source(N, D)` as `fit`'s source, and samples with `euler` from `pfgm_noise`.
The kernel is not Gaussian, so the Flow-GRPO SDE step (services.flow.sampling.sde_step)
does not apply to it; RL on a PFGM++ model needs another likelihood (or FPO).

Knows nothing about engines, rewards or the data store.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["pfgm_noise", "pfgm_radius", "pfgm_source"]


def _check(dim: int, aug_dim: float, sigma: float) -> None:
    if dim < 1 or not aug_dim > 0 or not sigma >= 0:
        raise ValueError(
            f"PFGM++ kernel: need the data dimension N >= 1, the augmented dimension D > 0 (math.inf for "
            f"diffusion) and sigma >= 0; got N={dim}, D={aug_dim}, sigma={sigma}"
        )


def pfgm_radius(sigma: float, aug_dim: float) -> float:
    """The augmented radius r = sigma sqrt(D) that aligns PFGM++ with noise level sigma."""
    _check(1, aug_dim, sigma)
    return sigma * math.sqrt(aug_dim)


def pfgm_noise(
    batch: int, dim: int, aug_dim: float, *, sigma: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """`batch` draws of R u from the kernel around 0 at noise level sigma: (B, N) float32.

    R = r sqrt(B / (1 - B)), r = sigma sqrt(D), B ~ Beta(N/2, D/2); u = g / |g|, g ~ N(0, I_N).
    D = math.inf gives sigma * N(0, I_N). B is drawn by numpy (torch's Beta takes no generator),
    from a seed taken from `generator`, so a seeded generator gives the same draws every time."""
    _check(dim, aug_dim, sigma)
    g = torch.randn(batch, dim, generator=generator)  # (B, N)
    if math.isinf(aug_dim):
        return sigma * g
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    beta = np.random.default_rng(seed).beta(dim / 2, aug_dim / 2, size=batch)  # (B,)
    # 1 - B can round to 0 in float64 only for B within 1e-16 of 1, vanishingly rare for D >= 1;
    # the clip keeps such a draw finite instead of inf.
    ratio = beta / np.maximum(1.0 - beta, np.finfo(np.float64).tiny)
    radius = torch.from_numpy(pfgm_radius(sigma, aug_dim) * np.sqrt(ratio)).float()  # (B,)
    return radius[:, None] * g / g.norm(dim=1, keepdim=True)


def pfgm_source(dim: int, aug_dim: float, *, seed: int = 0) -> Callable[[int, int], Tensor]:
    """A `source(step, batch_size)` for services.flow.losses.fit: the kernel's noise at sigma = 1,
    a fresh draw per step (seeded by (seed, step), so every run sees the same sources)."""
    _check(dim, aug_dim, 1.0)

    def source(step: int, size: int) -> Tensor:
        return pfgm_noise(
            size, dim, aug_dim, generator=torch.Generator().manual_seed(seed * 1_000_003 + step)
        )

    return source
