"""A 2-D point robot that must reach a goal under a drift its planner does not model.

The control task of Action Flow Matching (services.flow.afm). State: the robot's position
and the goal's, `[x, y, gx, gy]`; action: a commanded velocity in [-1, 1]^2. The planner
believes the nominal model `p' = p + dt * a` (`nominal_step`); the true dynamics

    p' = p + dt * (gain * R(angle) @ clip(a) + wind(p)),   wind(p) = wind * (sin(pi y / 2), cos(pi x / 2))

add what the nominal model does not know: an actuator bias (the command is turned by `angle`
radians and scaled by `gain`) and a position-dependent wind. An episode succeeds when the
robot comes within `tolerance` of the goal, and is truncated after `max_steps`.

`PointRobotEnv` is a `gymnasium.Env`: `reset(seed=...)` draws start and goal from the seed
alone, so an episode replays exactly. Knows nothing about planners, flows or the data store.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = ["PointRobotEnv", "PointRobotTask", "nominal_inverse", "nominal_step"]


def nominal_step(position: np.ndarray, action: np.ndarray, dt: float) -> np.ndarray:
    """The planner's model: p' = p + dt * a, for positions (..., 2) and actions (..., 2)."""
    return position + dt * action


def nominal_inverse(position: np.ndarray, next_position: np.ndarray, dt: float) -> np.ndarray:
    """The action the nominal model says moves `position` to `next_position`: (p' - p) / dt."""
    return (next_position - position) / dt


class PointRobotEnv(gym.Env):
    """Reach the goal; the drift (gain, angle, wind) is unknown to the planner."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self, *, dt: float = 0.1, gain: float = 0.7, angle: float = 1.2, wind: float = 0.3,
        arena: float = 2.0, min_distance: float = 2.0, tolerance: float = 0.15, max_steps: int = 80,
    ):  # fmt: skip
        if not (dt > 0 and gain > 0 and wind >= 0 and arena > 0 and tolerance > 0 and max_steps >= 1):
            raise ValueError(
                f"PointRobotEnv: need dt > 0, gain > 0, wind >= 0, arena > 0, tolerance > 0, max_steps >= 1; "
                f"got dt={dt}, gain={gain}, wind={wind}, arena={arena}, tolerance={tolerance}, "
                f"max_steps={max_steps}"
            )
        if not 0 <= min_distance < 2 * math.sqrt(2) * arena:
            raise ValueError(
                f"PointRobotEnv: min_distance={min_distance} cannot be met in a box of half-width {arena}; "
                f"use 0 <= min_distance < {2 * math.sqrt(2) * arena:.2f}"
            )
        self.dt, self.gain, self.angle, self.wind = dt, gain, angle, wind
        self.arena, self.min_distance, self.tolerance, self.max_steps = (
            arena,
            min_distance,
            tolerance,
            max_steps,
        )
        c, s = math.cos(angle), math.sin(angle)
        self._turn = np.array([[c, -s], [s, c]], np.float64)
        high = np.full(4, 2 * arena, np.float32)
        self.observation_space = spaces.Box(-high, high, dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.position = np.zeros(2)
        self.goal = np.zeros(2)
        self.steps = 0

    def drift(self, position: np.ndarray) -> np.ndarray:
        """The wind at `position` (..., 2)."""
        x, y = position[..., 0], position[..., 1]
        return self.wind * np.stack([np.sin(math.pi * y / 2), np.cos(math.pi * x / 2)], axis=-1)

    def true_step(self, position: np.ndarray, action: np.ndarray) -> np.ndarray:
        """The real dynamics for positions (..., 2) and actions (..., 2)."""
        applied = self.gain * np.clip(action, -1.0, 1.0) @ self._turn.T
        return position + self.dt * (applied + self.drift(position))

    def _observation(self) -> np.ndarray:
        return np.concatenate([self.position, self.goal]).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        while True:
            start, goal = self.np_random.uniform(-self.arena, self.arena, size=(2, 2))
            if np.linalg.norm(goal - start) >= self.min_distance:
                break
        self.position, self.goal, self.steps = start, goal, 0
        return self._observation(), {"distance": float(np.linalg.norm(goal - start))}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        action = np.asarray(action, np.float64).reshape(2)
        self.position = self.true_step(self.position, action)
        self.steps += 1
        distance = float(np.linalg.norm(self.goal - self.position))
        terminated = distance < self.tolerance
        truncated = not terminated and self.steps >= self.max_steps
        return self._observation(), -distance, terminated, truncated, {"distance": distance}


class PointRobotTask:
    """The robot as a flow task (`task.source` of examples/flow-robot.yaml, with `flow.afm` set):
    the flow maps a planned action (dim 2) to the intended one, conditioned on [position, a0,
    previous error] (6). `data` gives hindsight pairs of random actions from random positions
    under the default drift, for an offline warm-start; AFM itself learns online."""

    dim, condition_dim = 2, 6

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.env = PointRobotEnv()

    def example(self, index: int) -> Any:
        from asyncflow.tasks import FlowExample

        return FlowExample(condition=(0.0,) * self.condition_dim, answer=str(self.seed * 1_000_003 + index))

    def eval_example(self, index: int) -> Any:
        return self.example(-1 - index)

    def data(self, index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, index])
        position = rng.uniform(-self.env.arena, self.env.arena, (count, 2))
        executed = rng.uniform(-1.0, 1.0, (count, 2))
        a0 = nominal_inverse(position, self.env.true_step(position, executed), self.env.dt)
        cond = np.concatenate([position, a0, np.zeros((count, 2))], axis=1)
        return executed.astype(np.float32), cond.astype(np.float32)
