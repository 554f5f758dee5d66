"""GymEnv: a `gymnasium` environment as a text environment.

Observations become text (a Text space as it is, a Discrete one as its integer, a Box or
MultiDiscrete as its numbers separated by spaces, rounded to `precision` places) and the
model's turn becomes an action (Discrete: the first integer in it; Box: its first `shape`
numbers; Text: the turn itself). Each step's gym reward is the reward part `env`; the
episode ends when gym says terminated or truncated. A turn that is no valid action answers
with `invalid` and costs the part `invalid` (-1 by default), without stepping the gym env.

The gym env is made by `gymnasium.make(env_id, **make_options)`; reset is seeded from the
example's prompt (crc32), so an episode replays exactly.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import numpy as np

from asyncflow.envs import Example, Step

__all__ = ["GymEnv", "parse_action", "render_observation"]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def render_observation(space: Any, observation: Any, precision: int = 3) -> str:
    """A gym observation as text."""
    from gymnasium import spaces

    if isinstance(space, spaces.Text):
        return str(observation)
    if isinstance(space, spaces.Discrete):
        return str(int(observation))
    values = np.asarray(observation).reshape(-1)
    if np.issubdtype(values.dtype, np.integer):
        return " ".join(str(int(v)) for v in values)
    return " ".join(f"{float(v):.{precision}f}" for v in values)


def parse_action(space: Any, text: str) -> Any:
    """The action `text` names in `space`; raises ValueError naming what was expected."""
    from gymnasium import spaces

    if isinstance(space, spaces.Text):
        return text
    numbers = _NUMBER.findall(text)
    action: Any
    if isinstance(space, spaces.Discrete):
        if not numbers or not numbers[0].lstrip("-").isdigit():
            raise ValueError(f"expected an integer action in {space}, got {text!r}")
        action = int(numbers[0])
    elif isinstance(space, spaces.Box):
        size = int(np.prod(space.shape))
        if len(numbers) < size:
            raise ValueError(f"expected {size} numbers for {space}, got {text!r}")
        action = np.asarray([float(x) for x in numbers[:size]], dtype=space.dtype).reshape(space.shape)
    else:
        raise ValueError(f"GymEnv cannot parse actions of {type(space).__name__}; use Discrete, Box or Text")
    if not space.contains(action):
        raise ValueError(f"action {action!r} is outside {space}")
    return action


class GymEnv:
    """A gymnasium environment, observed and acted on as text (see the module's docstring)."""

    def __init__(
        self, env_id: str, *, make_options: dict[str, Any] | None = None, precision: int = 3,
        invalid: str = "invalid", invalid_reward: float = -1.0, seed: int = 0,
    ):  # fmt: skip
        import gymnasium

        try:
            self.env = gymnasium.make(env_id, **(make_options or {}))
        except gymnasium.error.Error as e:
            raise ValueError(
                f"GymEnv: gymnasium cannot make {env_id!r} ({e}); check the id and options"
            ) from None
        self.precision, self.invalid, self.invalid_reward, self.seed = (
            precision,
            invalid,
            invalid_reward,
            seed,
        )

    async def reset(self, example: Example) -> str:
        seed = (zlib.crc32(str(example.prompt).encode()) + self.seed) % (1 << 31)
        observation, _ = self.env.reset(seed=seed)
        return render_observation(self.env.observation_space, observation, self.precision)

    async def step(self, response: str) -> Step:
        try:
            action = parse_action(self.env.action_space, response)
        except ValueError as e:
            return Step(
                self.invalid, reward={"invalid": self.invalid_reward}, info={"invalid_action": str(e)}
            )
        observation, reward, terminated, truncated, _ = self.env.step(action)
        done = bool(terminated or truncated)
        text = "" if done else render_observation(self.env.observation_space, observation, self.precision)
        return Step(text, done=done, reward={"env": float(reward)}, info={"truncated": bool(truncated)})

    async def close(self) -> None:
        self.env.close()
