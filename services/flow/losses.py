"""Pre-training losses of a flow-matching policy, all in the convention of services.flow.model
(t = 1 source, t = 0 data, x_t = (1 - t) x_data + t x_source, velocity x_source - x_data).

- "icfm":   conditional flow matching with independent pairs (Lipman et al. 2023, arXiv
            2210.02747; Tong et al. 2024, arXiv 2302.00482, I-CFM with sigma = 0).
- "otcfm":  the pairs of each minibatch re-matched by exact optimal transport under the
            squared Euclidean cost (Tong et al. 2024, OT-CFM; Pooladian et al. 2023).
- "wcfm":   independent pairs weighted by the Gibbs kernel w = exp(-|x_data - x_source|^2 / eps)
            (Calvo-Ordonez et al. 2025, arXiv 2507.22270, W-CFM): the entropic-OT coupling up to
            its potentials, at I-CFM's cost. Here the weights are normalised within the batch
            (sum w * err / sum w), so eps changes the coupling, not the step size.
- "splitmeanflow": an average-velocity model u(z_t, r, t) trained on the interval-splitting
            identity u(z_t, r, t) = lam u(z_t, s, t) + (1 - lam) u(z_s, r, s), s = (1 - lam) t + lam r,
            z_s = z_t - (t - s) u(z_t, s, t), with the right side under stop-gradient, and on the
            flow-matching target where r = t (Guo et al. 2025, arXiv 2507.16884, Alg. 1).

Every loss is `loss(model, x_data, x_source, cond, generator) -> scalar`. Exact OT needs scipy
(`pip install scipy`, in the `bench` and `dev` extras). Knows nothing about RL or engines.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor

from services.flow.model import VelocityMLP

__all__ = ["LOSSES", "PretrainLoss", "fit", "make_loss", "ot_match"]

PretrainLoss = Literal["icfm", "otcfm", "wcfm", "splitmeanflow"]
LOSSES: tuple[str, ...] = get_args(PretrainLoss)
Loss = Callable[[VelocityMLP, Tensor, Tensor, Tensor | None, torch.Generator | None], Tensor]


def _times(batch: int, generator: torch.Generator | None) -> Tensor:
    return torch.rand(batch, generator=generator)


def _cfm(model: VelocityMLP, x_data: Tensor, x_source: Tensor, cond: Tensor | None,
         generator: torch.Generator | None, weights: Tensor | None = None) -> Tensor:  # fmt: skip
    t = _times(x_data.shape[0], generator)  # (B,)
    xt = (1 - t[:, None]) * x_data + t[:, None] * x_source  # (B, D)
    err = (model(xt, t, cond) - (x_source - x_data)).square().sum(-1)  # (B,)
    return err.mean() if weights is None else (weights * err).sum() / weights.sum()


def icfm_loss(model, x_data, x_source, cond=None, generator=None) -> Tensor:
    return _cfm(model, x_data, x_source, cond, generator)


def ot_match(x_data: Tensor, x_source: Tensor) -> Tensor:
    """x_source reordered so that row i is the exact-OT partner of x_data[i] (squared cost)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise ImportError(
            "OT-CFM solves an exact assignment per batch with scipy, which is not installed; "
            "pip install scipy (or pip install -e '.[bench]' in an AsyncFlow checkout), or use the icfm / "
            "wcfm loss"
        ) from None
    cost = torch.cdist(x_data.double(), x_source.double()).square()  # (B, B)
    rows, cols = linear_sum_assignment(cost.numpy())
    return x_source[torch.as_tensor(cols[rows.argsort()])]


def otcfm_loss(model, x_data, x_source, cond=None, generator=None) -> Tensor:
    return _cfm(model, x_data, ot_match(x_data, x_source), cond, generator)


def wcfm_loss(model, x_data, x_source, cond=None, generator=None, *, eps: float = 10.0) -> Tensor:
    cost = (x_data - x_source).square().sum(-1)  # (B,)
    # Shifting the exponent by its maximum leaves the normalised weights unchanged and avoids underflow.
    weights = torch.exp(-(cost - cost.min()) / eps)
    return _cfm(model, x_data, x_source, cond, generator, weights)


def splitmeanflow_loss(
    model, x_data, x_source, cond=None, generator=None, *, boundary: float = 0.5
) -> Tensor:
    if not model.mean_flow:
        raise ValueError("splitmeanflow needs a mean-flow model: VelocityMLP(..., mean_flow=True)")
    batch = x_data.shape[0]
    a, b = _times(batch, generator), _times(batch, generator)
    t, r = torch.maximum(a, b), torch.minimum(a, b)  # (B,): r <= t, uniform on the triangle
    on_boundary = torch.rand(batch, generator=generator) < boundary
    r = torch.where(on_boundary, t, r)
    lam = _times(batch, generator)
    s = (1 - lam) * t + lam * r
    zt = (1 - t[:, None]) * x_data + t[:, None] * x_source
    with torch.no_grad():  # the target: two shorter averages, chained
        u_right = model(zt, t, cond, r=s)
        zs = zt - (t - s)[:, None] * u_right
        u_left = model(zs, s, cond, r=r)
        target = lam[:, None] * u_right + (1 - lam[:, None]) * u_left
        target = torch.where(on_boundary[:, None], x_source - x_data, target)
    return (model(zt, t, cond, r=r) - target).square().sum(-1).mean()


def make_loss(name: str, *, wcfm_eps: float = 10.0, boundary: float = 0.5) -> Loss:
    """The loss called `name` (one of LOSSES) with its knob bound."""
    if name == "icfm":
        return icfm_loss
    if name == "otcfm":
        return otcfm_loss
    if name == "wcfm":
        if not wcfm_eps > 0:
            raise ValueError(f"wcfm: eps={wcfm_eps}, expected > 0 (larger: closer to I-CFM)")
        return functools.partial(wcfm_loss, eps=wcfm_eps)
    if name == "splitmeanflow":
        return functools.partial(splitmeanflow_loss, boundary=boundary)
    raise ValueError(f"unknown pre-training loss {name!r}; expected one of {LOSSES}")


def fit(
    model: VelocityMLP, loss: Loss, data: Callable[[int, int], tuple[Tensor, Tensor | None]], *,
    steps: int, batch_size: int, lr: float, source: Callable[[int, int], Tensor] | None = None, seed: int = 0,
) -> float:  # fmt: skip
    """Adam steps on `loss`; `data(step, batch_size)` gives (x_data, cond), `source(step, batch_size)`
    the source samples (standard normal by default). Returns the mean loss of the last tenth
    of the steps."""
    generator = torch.Generator().manual_seed(seed)

    def step_loss(step: int) -> Tensor:
        x_data, cond = data(step, batch_size)
        if source is None:
            x_source = torch.randn(x_data.shape, generator=generator)
        else:
            x_source = source(step, batch_size)
        return loss(model, x_data, x_source, cond, generator)

    return adam(model, step_loss, steps=steps, lr=lr)


def adam(model: torch.nn.Module, step_loss: Callable[[int], Tensor], *, steps: int, lr: float) -> float:
    """`steps` Adam steps on `step_loss(step)`; the mean loss of the last tenth of the steps."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    tail: list[float] = []
    for step in range(steps):
        value = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        if step >= steps - max(1, steps // 10):
            tail.append(value.item())
    return sum(tail) / len(tail) if tail else math.nan
