"""BOSS: the K-step time grid that best follows a trained flow's own fine trajectories.

Stage 1 of Nguyen et al. 2023 ("Bellman Optimal Step-size Straightening of Flow-Matching
Models", arXiv 2312.16414; repo nguyenngocbaocmt02/BOSS, ImageGeneration/sampling.py,
get_bellman_disc): simulate fine Euler trajectories on N + 1 uniform points tau_0 = 1 > ... >
tau_N = 0; the cost of jumping from tau_i to tau_j in one Euler step is

    c(i, j) = E |x_{tau_i} + (tau_j - tau_i) v(x_{tau_i}, tau_i) - x_{tau_j}|^2,

and dynamic programming finds the K jumps from 0 to N of least total cost:
V_1(i) = c(i, N), V_k(i) = min_{j > i} c(i, j) + V_{k-1}(j), O(K N^2). Stage 2 (fine-tuning the
model on the chosen intervals) is not done here: the grid alone is the sampler option.

The grid decreases from 1 to 0 like every grid of services.flow.sampling; the Flow-GRPO SDE
step takes it as it is (its log-prob allows uneven steps).
"""

from __future__ import annotations

import torch
from torch import Tensor

from services.flow.model import VelocityMLP
from services.flow.sampling import uniform_grid

__all__ = ["bellman_grid", "jump_costs"]


@torch.no_grad()
def jump_costs(model: VelocityMLP, x: Tensor, fine_steps: int, cond: Tensor | None = None) -> Tensor:
    """c(i, j) for i < j on the fine grid (inf elsewhere), from source samples x at t = 1: (N+1, N+1)."""
    grid = uniform_grid(fine_steps)
    path, velocities = [x], []
    for i in range(fine_steps):
        v = model(path[-1], x.new_full((x.shape[0],), float(grid[i])), cond)
        velocities.append(v)
        path.append(path[-1] + float(grid[i + 1] - grid[i]) * v)
    xs, vs = torch.stack(path).double(), torch.stack(velocities).double()  # (N+1, M, D), (N, M, D)
    cost = torch.full((fine_steps + 1, fine_steps + 1), float("inf"), dtype=torch.float64)
    times = grid.double()
    for i in range(fine_steps):
        jumps = times[i + 1 :, None, None] - times[i]  # (N-i, 1, 1), negative
        landed = xs[i] + jumps * vs[i]  # (N-i, M, D): one Euler step from tau_i to each later tau_j
        cost[i, i + 1 :] = (landed - xs[i + 1 :]).square().sum(-1).mean(-1)
    return cost


def bellman_grid(costs: Tensor, steps: int) -> Tensor:
    """The K-step grid of least total jump cost (costs from `jump_costs`): (K+1,) float32 from 1 to 0."""
    n = costs.shape[0] - 1
    if not 1 <= steps <= n:
        raise ValueError(f"bellman_grid: steps={steps}, expected 1 <= steps <= {n} (the fine grid's steps)")
    value = costs[:, n].clone()  # V_1(i): one jump from i to the end
    choices = []
    for _ in range(steps - 1):
        total = costs + value[None, :]  # (N+1, N+1): c(i, j) + V_{k-1}(j)
        best, arg = total.min(dim=1)
        choices.append(arg)
        value = best
    path, i = [0], 0
    for arg in reversed(choices):
        i = int(arg[i])
        path.append(i)
    path.append(n)
    return uniform_grid(n)[torch.tensor(path)]
