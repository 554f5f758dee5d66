"""Samplers of a flow-matching policy: the Euler ODE, the Flow-GRPO SDE step, mean-flow steps.

A grid is a decreasing sequence of times from 1 (source) to 0 (data), (K+1,) float32; K is
the number of steps (function evaluations). `uniform_grid(K)` is the usual choice,
`services.flow.boss.bellman_grid` an optimised one.

`sde_step` is the one primitive RL needs: a Gaussian transition x_t -> x_{t_next} whose
log-prob the trainer recomputes from the stored (x_t, x_{t_next}) with the same function
(flow_grpo, diffusers_patch/sd3_sde_with_logprob.py; Liu et al. 2025, arXiv 2505.05470 §4):

    sigma_t = a * sqrt(t / (1 - t))                   (t = 1 uses t = grid[1] in the root)
    mean    = x - dt * [v + sigma_t^2 / (2t) * (x + (1 - t) * v)],   dt = t - t_next > 0
    std     = sigma_t * sqrt(dt)
    log p   = sum_d [-(x_next - mean)^2 / (2 std^2) - log std - log(2 pi) / 2]

With a = 0 the step is the Euler ODE step. Everything that depends on t alone is a Python
float, computed once per step, so a row's log-prob depends only on that row (exactly, bit
for bit) and never on the batch it was computed in.

Knows nothing about engines, rewards or the data store.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from services.flow.model import VelocityMLP

__all__ = ["euler", "mean_flow_sample", "sde_sample", "sde_step", "step_logprobs", "uniform_grid"]

Reduce = Literal["sum", "mean"]


def uniform_grid(steps: int) -> Tensor:
    """K + 1 evenly spaced times from 1 to 0, float32."""
    if steps < 1:
        raise ValueError(f"uniform_grid: steps={steps}, expected >= 1")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)


def check_grid(grid: Tensor) -> list[float]:
    """The grid as Python floats; raises unless it runs strictly down from 1 to 0."""
    times = [float(t) for t in grid]
    if len(times) < 2 or times[0] != 1.0 or times[-1] != 0.0 or any(a <= b for a, b in zip(times, times[1:])):
        raise ValueError(f"time grid {times}: expected K + 1 >= 2 strictly decreasing times from 1.0 to 0.0")
    return times


@torch.no_grad()
def euler(model: VelocityMLP, x: Tensor, grid: Tensor, cond: Tensor | None = None) -> Tensor:
    """Integrate the ODE from x at t = 1 along `grid` to t = 0: (B, D) -> (B, D)."""
    times = check_grid(grid)
    for t, t_next in zip(times, times[1:]):
        x = x + (t_next - t) * model(x, x.new_full((x.shape[0],), t), cond)
    return x


def sde_step(
    model: VelocityMLP, x: Tensor, t: float, t_next: float, cond: Tensor | None, noise_level: float, *,
    t_root: float, x_next: Tensor | None = None, generator: torch.Generator | None = None,
    reduce: Reduce = "sum",
) -> tuple[Tensor, Tensor, float, Tensor]:  # fmt: skip
    """One step from t to t_next < t: returns (x_next, mean, std, log-prob), (B, D), (B, D), float, (B,).

    Samples x_next unless it is given (the trainer's recomputation). `t_root` stands in for t
    inside sigma_t's square root when t = 1 (Flow-GRPO uses the grid's second point). The
    log-prob is summed over dimensions, or averaged with reduce="mean" (Flow-GRPO's choice for
    high-dimensional latents). With noise_level 0 the step is deterministic and its log-prob 0.
    """
    dt = t - t_next
    v = model(x, x.new_full((x.shape[0],), t), cond)  # (B, D)
    sigma = noise_level * math.sqrt((t_root if t >= 1.0 else t) / (1.0 - (t_root if t >= 1.0 else t)))
    mean = x - dt * (v + (sigma * sigma / (2.0 * t)) * (x + (1.0 - t) * v))  # (B, D)
    std = sigma * math.sqrt(dt)
    if std == 0.0:
        return (mean if x_next is None else x_next), mean, 0.0, x.new_zeros(x.shape[0])
    if x_next is None:
        x_next = mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    per_dim = -((x_next - mean) ** 2) / (2.0 * std * std) - (math.log(std) + 0.5 * math.log(2.0 * math.pi))
    logp = per_dim.sum(-1) if reduce == "sum" else per_dim.mean(-1)  # (B,)
    return x_next, mean, std, logp


@torch.no_grad()
def sde_sample(
    model: VelocityMLP, x: Tensor, grid: Tensor, cond: Tensor | None, noise_level: float, *,
    generator: torch.Generator | None = None, reduce: Reduce = "sum",
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Roll the SDE from x (t = 1) along `grid`: latents (K+1, B, D) and step log-probs (K, B)."""
    times = check_grid(grid)
    latents, logps = [x], []
    for t, t_next in zip(times, times[1:]):
        x, _, _, logp = sde_step(
            model, x, t, t_next, cond, noise_level, t_root=times[1], generator=generator, reduce=reduce
        )
        latents.append(x)
        logps.append(logp)
    return torch.stack(latents), torch.stack(logps)


def step_logprobs(
    model: VelocityMLP, latents: Tensor, grid: Tensor, cond: Tensor | None, noise_level: float, *,
    reduce: Reduce = "sum",
) -> Tensor:  # fmt: skip
    """Log-prob of every stored step under `model`: latents (B, K+1, D) -> (B, K), with gradient.

    The same `sde_step` as at rollout, one step at a time over the batch, so at equal weights
    the result equals the behaviour log-probs exactly."""
    times = check_grid(grid)
    if latents.dim() != 3 or latents.shape[1] != len(times):
        raise ValueError(
            f"step_logprobs: latents must be (B, K+1, D) with K+1 = {len(times)} grid points, "
            f"got {tuple(latents.shape)}"
        )
    out = [
        sde_step(
            model, latents[:, k], t, t_next, cond, noise_level, t_root=times[1], x_next=latents[:, k + 1],
            reduce=reduce,
        )[3]
        for k, (t, t_next) in enumerate(zip(times, times[1:]))
    ]  # fmt: skip
    return torch.stack(out, dim=1)  # (B, K)


@torch.no_grad()
def mean_flow_sample(model: VelocityMLP, x: Tensor, grid: Tensor, cond: Tensor | None = None) -> Tensor:
    """A mean-flow model's jumps along `grid`: z_r = z_t - (t - r) * u(z_t, r, t); (B, D) -> (B, D).

    One step (grid [1, 0]) is x_0 = x_1 - u(x_1, 0, 1)."""
    times = check_grid(grid)
    for t, r in zip(times, times[1:]):
        x = x - (t - r) * model(x, x.new_full((x.shape[0],), t), cond, r=x.new_full((x.shape[0],), r))
    return x
