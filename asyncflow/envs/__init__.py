"""Environments: what answers a policy between its turns, for multi-turn (agentic) rollouts.

An environment is reset with one task example and returns the first observation (text that
follows the prompt; "" for none); then each `step(response)` takes the text of one model turn
and returns the next observation, or `done`, with the turn's reward parts and an info dict.
Tools are the common case (`asyncflow.envs.tools.ToolEnv`): a tool call is parsed from the
turn, executed, and its result is the next observation; a turn without a call ends the
episode.

An environment knows nothing about tokens, engines, Ray or the data store: text in, text out.
The rollout (workers.episodes) tokenizes every observation once, on its own, and appends its
ids to the trajectory beside the ids the engine sampled, so no text is ever re-tokenized; it
also enforces the episode's limits (turns, seconds, tokens). Environments are made by a
`"module:attr"` factory (`env.source`), called once per episode with `env.options`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from asyncflow.tasks import Example

__all__ = ["Environment", "Example", "Step", "episode_reward"]


@dataclass
class Step:
    """What an environment answers to one model turn."""

    observation: str = ""  # text appended after the turn (tokenized on its own); "" for none
    done: bool = False  # the episode is over: no observation follows, the model has no more turns
    reward: dict[str, float] = field(default_factory=dict)  # this turn's named reward parts
    info: dict[str, Any] = field(default_factory=dict)  # anything to record (JSON; other values as str)


@runtime_checkable
class Environment(Protocol):
    """One episode's environment (a fresh one per episode, made by the `env.source` factory)."""

    async def reset(self, example: Example) -> str:
        """Start an episode on `example`; returns the first observation ("" for none)."""
        ...

    async def step(self, response: str) -> Step:
        """The model's turn (its text, without the token that ended it) -> what follows."""
        ...

    async def close(self) -> None:
        """Free what the episode holds (processes, files); called once, however it ended."""
        ...


def episode_reward(prompt: str, response: str, answer: str, info: dict) -> dict[str, float] | float:
    """A reward function (`task.reward: asyncflow.envs:episode_reward`) that scores a row by its
    episode: the reward parts the environment gave over its turns (their sum is the reward), or 0
    for an episode that got none (it ended before the environment scored it)."""
    parts = info.get("episode", {}).get("reward", {})
    return {name: float(value) for name, value in parts.items()} if parts else 0.0
