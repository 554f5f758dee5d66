"""The velocity model of a flow-matching policy: a conditional MLP over (x, condition, time).

Time convention (Flow-GRPO's, used throughout services.flow): t = 1 is the source (noise),
t = 0 the data; x_t = (1 - t) * x_data + t * x_source and the model predicts the velocity
v = x_source - x_data, so samplers integrate dx/dt = v from t = 1 down to t = 0.

With `mean_flow=True` the model also takes a start time r <= t and predicts the average
velocity over [r, t] (SplitMeanFlow): z_r = z_t - (t - r) * u(z_t, r, t); u(z, t, t) is the
instantaneous velocity.

Rows are evaluated in fixed blocks of BLOCK rows (the last one zero-padded): CPU kernels
reduce in an order that depends on how many rows a call has, so without the blocks the
trainer, which recomputes a different batch, would get log-probs that differ from the
rollout's in the last bit. With them, a row's output does not depend on its batch.

The model knows nothing about sampling, rewards or the data store.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["BLOCK", "VelocityMLP"]

BLOCK = 64  # rows per forward block; a multiple of every SIMD width, so no row sits in a scalar tail


class VelocityMLP(nn.Module):
    def __init__(
        self, dim: int, condition_dim: int = 0, *, hidden_size: int = 128, num_layers: int = 3,
        time_features: int = 16, mean_flow: bool = False,
    ):  # fmt: skip
        super().__init__()
        if dim < 1 or condition_dim < 0 or hidden_size < 1 or num_layers < 1 or time_features < 1:
            raise ValueError(
                f"VelocityMLP: need dim >= 1, condition_dim >= 0 and the rest >= 1; got dim={dim}, "
                f"condition_dim={condition_dim}, hidden_size={hidden_size}, num_layers={num_layers}, "
                f"time_features={time_features}"
            )
        self.dim, self.condition_dim, self.mean_flow = dim, condition_dim, mean_flow
        # Fixed log-spaced frequencies: sin/cos of t at 1 .. 1000 rad per unit time.
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), time_features)))
        times = 2 if mean_flow else 1
        width = dim + condition_dim + 2 * time_features * times
        layers: list[nn.Module] = []
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_size), nn.SiLU()]
            width = hidden_size
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def _embed(self, t: Tensor) -> Tensor:
        angles = t[:, None] * self.get_buffer("freqs")  # (B, F)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (B, 2F)

    def _block(self, x: Tensor, t: Tensor, cond: Tensor, *r: Tensor) -> Tensor:
        return self.net(torch.cat([x, cond, self._embed(t), *(self._embed(s) for s in r)], dim=-1))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None, r: Tensor | None = None) -> Tensor:
        """Velocity at (x, t), or with `r` the average velocity over [r, t]: (B, D), (B,) -> (B, D).

        `cond` is (B, condition_dim); it may be omitted when condition_dim is 0."""
        batch = x.shape[0]
        if x.dim() != 2 or x.shape[1] != self.dim or t.shape != (batch,):
            raise ValueError(
                f"VelocityMLP: x must be (B, {self.dim}) and t (B,), got {tuple(x.shape)} and "
                f"{tuple(t.shape)}"
            )
        if cond is None and not self.condition_dim:
            cond = x.new_zeros(batch, 0)
        if cond is None or cond.shape != (batch, self.condition_dim):
            raise ValueError(
                f"VelocityMLP: cond must be (B, {self.condition_dim}) = {(batch, self.condition_dim)}, "
                f"got {None if cond is None else tuple(cond.shape)}; pass the task's condition vector for "
                "every row"
            )
        if (r is not None) != self.mean_flow:
            raise ValueError(
                "VelocityMLP: pass r (the start time) exactly when the model is a mean-flow model "
                f"(mean_flow={self.mean_flow}, r given: {r is not None})"
            )
        pad = -batch % BLOCK
        inputs = [x, t, cond] + ([r] if r is not None else [])
        if pad:
            inputs = [torch.cat([a, a.new_zeros((pad, *a.shape[1:]))]) for a in inputs]
        blocks = [self._block(*(a[i : i + BLOCK] for a in inputs)) for i in range(0, batch + pad, BLOCK)]
        return torch.cat(blocks)[:batch]
