"""The watchdog's section: when a stage counts as stalled, and what the run does then.

A stage (trainer, rollout, reward, reference, store) that has work waiting and makes no
progress for its deadline is stalled. The deadline is a factor over the longest wait
between progress the run has measured for that stage, never below a floor; or set per
stage. Imports nothing but pydantic.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from asyncflow.config._base import Section

Stage = Literal["trainer", "rollout", "reward", "reference", "store"]
Policy = Literal["restart", "stop"]
Seconds = Annotated[float, Field(gt=0, le=7 * 86_400)]

DEFAULT_POLICY: dict[Stage, Policy] = {
    "trainer": "restart", "rollout": "restart", "reward": "restart", "reference": "restart", "store": "stop",
}  # fmt: skip


class WatchdogConfig(Section):
    """Stall detection: deadlines, the policy per stage, bounds on restarts and on every remote call."""

    enabled: bool = Field(
        True,
        description="Watch every stage of an async run for stalls; each stall writes a diagnosis (stacks, "
        "calls and samples in flight, the store's queues) to <run_dir>/stalls/ and applies its policy.",
    )
    check_every_s: float = Field(1.0, gt=0, le=600, description="How often the watchdog reads progress.")
    factor: float = Field(
        10.0,
        ge=1,
        le=10_000,
        description="A stage's deadline is this many times the longest wait between its progress measured "
        "so far in the run (at least floor_s).",
    )
    floor_s: float = Field(120.0, gt=0, le=86_400, description="The shortest deadline a measured stage gets.")
    first_deadline_s: float = Field(
        900.0,
        gt=0,
        le=86_400,
        description="The deadline of a stage before any of its progress was measured (the first step "
        "includes building engines and compiling kernels).",
    )
    deadline_s: dict[Stage, Seconds] = Field(
        default_factory=dict,
        description="A fixed deadline (seconds) per stage, e.g. {trainer: 600}; it replaces the "
        "measured one.",
    )
    policy: dict[Stage, Policy] = Field(
        default_factory=lambda: dict(DEFAULT_POLICY),
        description="What a stall of each stage does: restart (its stuck actors are killed and restarted; "
        "rows they held are redelivered; a stuck trainer restarts the run from its last checkpoint) or "
        "stop (the run ends with the diagnosis). Stages not named keep their default (store: stop, "
        "others: restart).",
    )
    max_restarts: int = Field(
        3,
        ge=0,
        le=1000,
        description="Restarts the watchdog makes in one pipeline's life (a trainer restart counts against "
        "trainer.max_restarts instead); past them a stall stops the run.",
    )
    probe_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="How long a progress probe waits for an actor's or the store's answer; an actor that "
        "does not answer in time counts as making no progress.",
    )
    call_timeout_s: float = Field(
        3600.0,
        gt=0,
        le=7 * 86_400,
        description="The longest the run waits for any one call to an actor (a step, a checkpoint, an "
        "evaluation); past it the actor is reported stuck (a trainer rank: the run restarts it).",
    )

    @model_validator(mode="after")
    def _store_cannot_restart(self) -> WatchdogConfig:
        if self.policy.get("store") == "restart":
            raise ValueError(
                "watchdog.policy.store = 'restart': the store holds the run's rows and cannot be restarted "
                "under it; set watchdog.policy.store: stop (a durable Redis store resumes with --resume)"
            )
        return self

    def policy_of(self, stage: str) -> str:
        return self.policy.get(stage, DEFAULT_POLICY[stage])  # type: ignore[call-overload,index]
