"""PMRF, posterior-mean rectified flow: restore x from a degraded y by a posterior-mean
predictor and a flow that carries its (noised) output to the data distribution.

Ohayon, Michaeli, Elad 2025, "Posterior-Mean Rectified Flow: Towards Minimum MSE
Photo-Realistic Image Restoration" (ICLR 2025, arXiv 2410.00418; repo ohayonguy/PMRF,
lightning_models/mmse_rectified_flow.py):

- stage 1: f(y) ~ E[x | y], trained by min E |x - f(y)|^2 (`MeanMLP`, `fit_mean`);
- stage 2: a rectified flow from Z_0 = f(y) + sigma_s eps to x, Z_s = s x + (1 - s) Z_0, loss
  E |v(Z_s, s) - (x - Z_0)|^2, with the flow unconditional (it sees y only through Z_0).
  In services.flow's convention (t = 1 source, t = 0 data, t = 1 - s) that is x_t =
  (1 - t) x + t Z_0 and velocity Z_0 - x (`stage2_loss`); inference integrates K Euler
  steps from f(y) + sigma_s eps (`restore`).

Why: at perfect perceptual quality the least MSE is MMSE + W2^2(p_f(y), p_x), reached by
the optimal transport of the posterior mean to the data (Freirich et al. 2021), which the
rectified flow approximates; posterior sampling costs 2 MMSE.

As a policy ("mean head + flow refiner"). With sigma_s > 0 the flow's source is Gaussian
around f(y), so in residual coordinates z = (x - f(y)) / sigma_s it is a flow from N(0, I)
and the Flow-GRPO SDE step applies unchanged: `PMRFPolicy` is a velocity model over z with
the degraded y as its condition (v_z(z, t; y) = v(f(y) + sigma_s z, t) / sigma_s), so the
FlowEngine serves it and `step_logprobs` scores it. A step's Gaussian in x is the affine
image of the one in z: mean f(y) + sigma_s mean_z, std sigma_s std_z, so its log-prob is the
z one minus N log sigma_s per step (a constant: ratios are unchanged). sigma_s doubles as
the exploration knob.

Knows nothing about engines, rewards, the data store or the degradations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from services.flow.losses import adam
from services.flow.model import BLOCK, VelocityMLP
from services.flow.sampling import euler

__all__ = ["MeanMLP", "PMRFPolicy", "fit_mean", "pmrf_source", "restore", "stage2_loss"]


class MeanMLP(nn.Module):
    """The posterior-mean predictor f(y): an MLP (in_dim) -> (out_dim), rows evaluated in BLOCKs
    of services.flow.model (so a row's output does not depend on its batch, as there)."""

    def __init__(self, in_dim: int, out_dim: int, *, hidden_size: int = 256, num_layers: int = 3):
        super().__init__()
        if in_dim < 1 or out_dim < 1 or hidden_size < 1 or num_layers < 1:
            raise ValueError(
                f"MeanMLP: every size must be >= 1; got in_dim={in_dim}, out_dim={out_dim}, "
                f"hidden_size={hidden_size}, num_layers={num_layers}"
            )
        self.in_dim, self.out_dim = in_dim, out_dim
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_size), nn.SiLU()]
            width = hidden_size
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, y: Tensor) -> Tensor:
        """(B, in_dim) -> (B, out_dim)."""
        if y.dim() != 2 or y.shape[1] != self.in_dim:
            raise ValueError(f"MeanMLP: y must be (B, {self.in_dim}), got {tuple(y.shape)}")
        batch, pad = y.shape[0], -y.shape[0] % BLOCK
        if pad:
            y = torch.cat([y, y.new_zeros(pad, self.in_dim)])
        return torch.cat([self.net(y[i : i + BLOCK]) for i in range(0, batch + pad, BLOCK)])[:batch]


def fit_mean(
    model: MeanMLP, pairs: Callable[[int, int], tuple[Tensor, Tensor]], *, steps: int, batch_size: int,
    lr: float,
) -> float:  # fmt: skip
    """Stage 1: Adam on E |x - f(y)|^2 (per-dimension mean); `pairs(step, batch_size)` gives
    (x, y). Returns the mean loss of the last tenth of the steps."""

    def step_loss(step: int) -> Tensor:
        x, y = pairs(step, batch_size)
        return (model(y) - x).square().mean()

    return adam(model, step_loss, steps=steps, lr=lr)


@torch.no_grad()
def pmrf_source(mean: MeanMLP, y: Tensor, sigma_s: float, generator: torch.Generator | None = None) -> Tensor:
    """Stage 2's source Z_0 = f(y) + sigma_s eps, eps ~ N(0, I): (B, in_dim) -> (B, out_dim)."""
    if not sigma_s >= 0:
        raise ValueError(f"PMRF: sigma_s={sigma_s}, expected >= 0 (the paper uses 0.025 to 0.1)")
    f = mean(y)
    return f + sigma_s * torch.randn(f.shape, generator=generator)


def stage2_loss(
    flow: VelocityMLP, mean: MeanMLP, x: Tensor, y: Tensor, sigma_s: float,
    generator: torch.Generator | None = None,
) -> Tensor:  # fmt: skip
    """Stage 2's rectified-flow loss on one batch (summed over dimensions, mean over rows):
    Z_0 = f(y) + sigma_s eps, x_t = (1 - t) x + t Z_0 with t ~ U(0, 1), target Z_0 - x."""
    source = pmrf_source(mean, y, sigma_s, generator)  # (B, D)
    t = torch.rand(x.shape[0], generator=generator)  # (B,)
    xt = (1 - t[:, None]) * x + t[:, None] * source
    return (flow(xt, t) - (source - x)).square().sum(-1).mean()


@torch.no_grad()
def restore(
    mean: MeanMLP, flow: VelocityMLP, y: Tensor, grid: Tensor, sigma_s: float,
    generator: torch.Generator | None = None,
) -> Tensor:  # fmt: skip
    """PMRF's estimate of x: Euler along `grid` from f(y) + sigma_s eps. (B, in_dim) -> (B, out_dim)."""
    return euler(flow, pmrf_source(mean, y, sigma_s, generator), grid)


class PMRFPolicy(nn.Module):
    """PMRF as a flow policy over residuals z = (x - f(y)) / sigma_s, conditioned on y.

    Has VelocityMLP's interface (dim, condition_dim, mean_flow, forward(z, t, cond)), so the
    samplers, the Flow-GRPO step and FlowEngine take it as it is; `to_data` maps a latent back."""

    mean_flow = False

    def __init__(self, mean: MeanMLP, flow: VelocityMLP, sigma_s: float):
        super().__init__()
        if not sigma_s > 0:
            raise ValueError(
                f"PMRFPolicy: sigma_s={sigma_s}; a policy needs sigma_s > 0 (a Gaussian source around f(y))"
            )
        if flow.condition_dim or flow.mean_flow or flow.dim != mean.out_dim:
            raise ValueError(
                f"PMRFPolicy: the flow must be an unconditional velocity model of f's output dimension "
                f"{mean.out_dim}; got dim={flow.dim}, condition_dim={flow.condition_dim}, "
                f"mean_flow={flow.mean_flow}"
            )
        self.mean, self.flow, self.sigma_s = mean, flow, sigma_s
        self.dim, self.condition_dim = flow.dim, mean.in_dim

    def to_data(self, z: Tensor, y: Tensor) -> Tensor:
        """x = f(y) + sigma_s z: (B, D), (B, C) -> (B, D)."""
        return self.mean(y) + self.sigma_s * z

    def forward(self, z: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            raise ValueError(f"PMRFPolicy: cond must be the degraded input y, (B, {self.condition_dim})")
        return self.flow(self.to_data(z, cond), t) / self.sigma_s
