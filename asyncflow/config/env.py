"""The environment section: multi-turn episodes, where the model's turns alternate with an
environment's observations (tools, games). Unset `source`: one turn, no environment."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from asyncflow.config.resources import RoleResources


class EnvConfig(RoleResources):
    """Environments of multi-turn rollouts (asyncflow.envs); they run in their own Ray actors."""

    source: str | None = Field(
        None,
        description="'module:attr' of the environment factory, called once per episode with `options` "
        "(e.g. asyncflow.envs.arithmetic:calculator_env); unset: single-turn rollouts.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the environment factory."
    )
    max_turns: int = Field(4, ge=1, le=1024, description="Model turns per episode, at most.")
    episode_timeout_s: float = Field(
        60.0, gt=0, le=86_400, description="Wall-clock limit of one episode; past it the episode ends "
        "with end='timeout' and keeps the turns it has.",
    )  # fmt: skip
    max_episode_tokens: int = Field(
        48, ge=1, le=1_000_000, description="Tokens after the prompt (model and environment tokens) per "
        "episode, at most; each turn samples at most min(rollout.max_new_tokens, what is left). The "
        "prompt plus this many tokens must fit the model's positions.",
    )  # fmt: skip
    num_workers: int = Field(
        1, ge=1, le=1024, description="Environment actors per rollout worker; episodes are dealt out to them."
    )
    num_cpus: float = Field(0.25, gt=0, le=1024, description="Ray CPUs reserved per environment actor.")

    @field_validator("source")
    @classmethod
    def _resolves(cls, spec: str | None) -> str | None:
        from asyncflow.config.rl import import_string

        if spec is not None and not callable(import_string(spec)):
            raise ValueError(f"env.source {spec!r} is not callable; name a class or factory function")
        return spec
