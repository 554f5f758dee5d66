"""Action Flow Matching: a flow that carries a planner's action to the action it meant.

Murillo-Gonzalez & Liu 2025, "Action Flow Matching for Continual Robot Learning" (RSS 2025,
arXiv 2504.18471; repo AlejandroMllo/action_flow_matching, src/training/train_afm.py). A
planner with a misaligned dynamics model proposes a0; the robot should execute the intended
action a*, the one that under the true dynamics yields the transition the planner expected.
The flow's source is a0 itself (not noise) and it is conditioned on the state, a0 and the
observed transition error of the previous step, e = predicted next state - real next state.

In services.flow's convention (t = 1 source, t = 0 data):

    x_t = (1 - t) a* + t a0,   loss |v(x_t, t | s, a0, e) - (a0 - a*)|^2   (`interpolate`, `afm_loss`)

and `refine` integrates from x = a0 at t = 1 to t = 0 with midpoint steps, as the repo's
`ActionFlowMatching.step` does. The refinement applies only where the previous error exceeds
a threshold (the repo's `dynamics_misalignment_threshold`; the caller passes `active`).

Intended actions come from observed transitions by hindsight (`relabel`): the robot executed
a and went from s to s'; the planner would have proposed a0 = nominal_inverse(s, s') to get
there, so (a0 -> a) is a pair whose intended action is a, known without the true dynamics.
(The repo trains from recorded tensors `states, planned_actions, intended_actions, error`
whose making it does not include; the relabelling is ours. Its condition is a "dynamics
regime" (state, planned action, error) registered when the error crosses the threshold, and
it integrates 10 midpoint steps; here the condition is the previous step's, default 2 steps.)

`CEMPlanner` is the planner: the cross-entropy method over action sequences under the nominal
model, batched over robots. Knows nothing about the data store, Ray or weights.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from services.flow.model import VelocityMLP

__all__ = ["CEMPlanner", "afm_loss", "condition", "interpolate", "refine", "relabel"]


def condition(position: Tensor, a0: Tensor, error: Tensor) -> Tensor:
    """The flow's condition [s, a0, e]: (B, S), (B, A), (B, S) -> (B, 2S + A)."""
    return torch.cat([position, a0, error], dim=-1)


def interpolate(a0: Tensor, a_star: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) a* + t a0: the straight path from the planned action (t = 1) to the intended one."""
    return (1 - t[:, None]) * a_star + t[:, None] * a0


def afm_loss(
    model: VelocityMLP, a0: Tensor, a_star: Tensor, cond: Tensor, generator: torch.Generator | None = None,
    t: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """E |v(x_t, t | cond) - (a0 - a*)|^2, t ~ U(0, 1) unless given: (B, A), (B, A), (B, C) -> scalar."""
    if a0.shape != a_star.shape or a0.dim() != 2:
        raise ValueError(
            f"afm_loss: a0 and a_star must both be (B, A), got {tuple(a0.shape)} and {tuple(a_star.shape)}"
        )
    if t is None:
        t = torch.rand(a0.shape[0], generator=generator)
    return (model(interpolate(a0, a_star, t), t, cond) - (a0 - a_star)).square().sum(-1).mean()


@torch.no_grad()
def refine(
    model: VelocityMLP, a0: Tensor, cond: Tensor, steps: int = 2, active: Tensor | None = None
) -> Tensor:
    """Midpoint integration from a0 at t = 1 to t = 0: the intended action, (B, A). Rows where
    `active` (B,) is False keep a0."""
    if steps < 1:
        raise ValueError(f"refine: steps={steps}, expected >= 1 midpoint steps")
    x, dt = a0, 1.0 / steps
    for k in range(steps):
        t = 1.0 - k * dt
        half = x - 0.5 * dt * model(x, x.new_full((x.shape[0],), t), cond)
        x = x - dt * model(half, x.new_full((x.shape[0],), t - 0.5 * dt), cond)
    return x if active is None else torch.where(active[:, None], x, a0)


def relabel(
    position: np.ndarray, next_position: np.ndarray, executed: np.ndarray, dt: float
) -> tuple[np.ndarray, np.ndarray]:
    """Hindsight pairs (a0, a*) from transitions (..., 2): a0 = (s' - s) / dt, the action the
    nominal model says reaches s'; a* = the executed action, which did reach it."""
    return (next_position - position) / dt, executed


class CEMPlanner:
    """Cross-entropy method MPC under the nominal model p' = p + dt a, for N robots at once.

    Each call samples `population` action sequences of `horizon` steps per robot from a
    Gaussian, keeps the `elites` of least cost (sum over the horizon of the distance to the
    goal, plus `action_cost` |a|^2), refits the Gaussian to them, `iterations` times, and
    returns the mean's first action, in [-1, 1]^2."""

    def __init__(
        self, dt: float, *, horizon: int = 5, population: int = 64, elites: int = 8, iterations: int = 3,
        init_std: float = 0.5, action_cost: float = 0.01, seed: int = 0,
    ):  # fmt: skip
        if not (horizon >= 1 and iterations >= 1 and 1 <= elites <= population and init_std > 0):
            raise ValueError(
                f"CEMPlanner: need horizon >= 1, iterations >= 1, 1 <= elites <= population, init_std > 0; "
                f"got horizon={horizon}, iterations={iterations}, elites={elites}, population={population}, "
                f"init_std={init_std}"
            )
        self.dt, self.horizon, self.population, self.elites = dt, horizon, population, elites
        self.iterations, self.init_std, self.action_cost = iterations, init_std, action_cost
        self.rng = np.random.default_rng(seed)

    def plan(self, position: np.ndarray, goal: np.ndarray) -> np.ndarray:
        """First actions (N, 2) for robots at `position` (N, 2) heading for `goal` (N, 2)."""
        n = position.shape[0]
        mean = np.zeros((n, self.horizon, 2))
        std = np.full((n, self.horizon, 2), self.init_std)
        for _ in range(self.iterations):
            noise = self.rng.standard_normal((n, self.population, self.horizon, 2))
            actions = np.clip(mean[:, None] + std[:, None] * noise, -1.0, 1.0)  # (N, P, H, 2)
            path = position[:, None, None] + self.dt * np.cumsum(actions, axis=2)  # (N, P, H, 2)
            cost = np.linalg.norm(path - goal[:, None, None], axis=-1).sum(-1)  # (N, P)
            cost += self.action_cost * np.square(actions).sum((-1, -2))
            best = np.argsort(cost, axis=1)[:, : self.elites]  # (N, E)
            elite = np.take_along_axis(actions, best[:, :, None, None], axis=1)  # (N, E, H, 2)
            mean, std = elite.mean(1), elite.std(1) + 1e-3
        return mean[:, 0]
