"""BOSS: the K-step time grid that best follows a trained flow's own fine trajectories.

Stage 1 of Nguyen et al. 2023 ("Bellman Optimal Step-size Straightening of Flow-Matching
Models", arXiv 2312.16414; repo nguyenngocbaocmt02/BOSS, ImageGeneration/sampling.py,
get_bellman_disc): simulate fine Euler trajectories on N + 1 uniform points tau_0 = 1 > ... >
tau_N = 0; the cost of jumping from tau_i to tau_j in one Euler step is

    c(i, j) = E |x_{tau_i} + (tau_j - tau_i) v(x_{tau_i}, tau_i) - x_{tau_j}|^2,

and dynamic programming finds the K jumps from 0 to N of least total cost:
V_1(i) = c(i, N), V_k(i) = min_{j > i} c(i, j) + V_{k-1}(j), O(K N^2) (`jump_costs`,
`bellman_grid`).

Stage 2, "redress" (the repo's losses.py, get_redress_loss_fn, and scripts/boss.sh): fine-tune
the model so that one Euler step spans each chosen interval. The frozen pre-trained model (the
teacher) simulates fine trajectories from source samples; at each chosen time tau_k the
student regresses onto the secant of the teacher's trajectory to the next chosen time,

    L = E_k E_x |v(x_{tau_k}, tau_k) - (x_{tau_{k+1}} - x_{tau_k}) / (tau_{k+1} - tau_k)|^2,

so a K-step Euler sample on the grid lands where the fine trajectory does (`redress_pairs`,
`redress_loss`, `redress`). The trajectories are simulated once, as a pool (the repo also
generates its data first), and the steps draw minibatches from it.

The grid decreases from 1 to 0 like every grid of services.flow.sampling; the Flow-GRPO SDE
step takes it as it is (its log-prob allows uneven steps).
"""

from __future__ import annotations

import torch
from torch import Tensor

from services.flow.losses import adam
from services.flow.model import VelocityMLP
from services.flow.sampling import check_grid, uniform_grid

__all__ = ["bellman_grid", "jump_costs", "redress", "redress_loss", "redress_pairs"]


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


@torch.no_grad()
def redress_pairs(
    teacher: VelocityMLP, x: Tensor, grid: Tensor, fine_steps: int, cond: Tensor | None = None
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The teacher's fine Euler trajectories from x (t = 1) on `fine_steps` uniform steps, read at
    the K + 1 times of `grid` (each must be a point of the fine grid, as bellman_grid's are):
    the states at tau_0..tau_{K-1} and the secant velocities to the next chosen time,
    (K, M, D) and (K, M, D)."""
    times = check_grid(grid)
    index = [round((1.0 - t) * fine_steps) for t in times]
    if any(abs(i / fine_steps - (1.0 - t)) > 1e-6 for i, t in zip(index, times)):
        raise ValueError(
            f"redress_pairs: the grid {times} is not on the {fine_steps}-step uniform grid; use a grid from "
            f"bellman_grid(jump_costs(..., fine_steps={fine_steps}), K) or uniform_grid(K) with K dividing it"
        )
    fine, states, path = uniform_grid(fine_steps), {0: x}, x
    for i in range(index[-1]):
        path = path + float(fine[i + 1] - fine[i]) * teacher(
            path, x.new_full((x.shape[0],), float(fine[i])), cond
        )
        states[i + 1] = path
    xs = torch.stack([states[i] for i in index])  # (K+1, M, D)
    jumps = torch.tensor([b - a for a, b in zip(times, times[1:])], dtype=x.dtype)  # (K,), negative
    return xs[:-1], (xs[1:] - xs[:-1]) / jumps[:, None, None]


def redress_loss(
    model: VelocityMLP, states: Tensor, targets: Tensor, grid: Tensor, cond: Tensor | None = None
) -> Tensor:
    """Stage 2's loss on pairs from `redress_pairs`: sum over dimensions, mean over rows and steps."""
    times = check_grid(grid)
    steps, rows = states.shape[0], states.shape[1]
    if steps != len(times) - 1 or targets.shape != states.shape:
        raise ValueError(
            f"redress_loss: states {tuple(states.shape)} and targets {tuple(targets.shape)} must both be "
            f"(K, M, D) with K = {len(times) - 1} steps of the grid"
        )
    t = torch.tensor(times[:-1], dtype=states.dtype).repeat_interleave(rows)  # (K*M,)
    flat_cond = None if cond is None else cond.repeat(steps, 1)
    v = model(states.reshape(steps * rows, -1), t, flat_cond)
    return (v - targets.reshape(steps * rows, -1)).square().sum(-1).mean()


def redress(
    model: VelocityMLP, teacher: VelocityMLP, noise: Tensor, grid: Tensor, *, fine_steps: int, steps: int,
    batch_size: int, lr: float, seed: int = 0,
) -> float:  # fmt: skip
    """Stage 2: `steps` Adam steps of `redress_loss` on minibatches of a pool of the teacher's
    trajectories from `noise` (M, D); fine-tunes `model` in place (unconditional models).
    Returns the mean loss of the last tenth of the steps."""
    states, targets = redress_pairs(teacher, noise, grid, fine_steps)
    generator = torch.Generator().manual_seed(seed)

    def step_loss(step: int) -> Tensor:
        rows = torch.randint(0, noise.shape[0], (batch_size,), generator=generator)
        return redress_loss(model, states[:, rows], targets[:, rows], grid)

    return adam(model, step_loss, steps=steps, lr=lr)
