"""Config of the worker pools' self-healing and elasticity: engine health probes and the
autoscale bounds of the rollout and reward pools. Nothing here imports torch or ray."""

from __future__ import annotations

from pydantic import Field, model_validator

from asyncflow.config._base import Section


class AutoscaleConfig(Section):
    """`autoscale: {min, max}`: the pool's size moves between min and max, one worker at a time,
    decided between trainer steps. It grows while the trainer waits for data and rows queue up in
    front of the pool; it shrinks while it would still sit idle with one worker fewer."""

    min: int = Field(1, ge=1, le=1024, description="Fewest workers.")
    max: int = Field(4, ge=1, le=1024, description="Most workers.")
    grow_queue_rows: int = Field(
        0,
        ge=0,
        le=10_000_000,
        description="Rows ready for the pool (waiting for it) from which on it may grow, when the trainer "
        "also waited for its batch (0: half a trainer batch, trainer.batch_prompts x rollout.n / 2 rows).",
    )
    trainer_wait_frac: float = Field(
        0.2,
        ge=0,
        le=1,
        description="The trainer waits for data when this fraction of its step time, or more, was spent "
        "waiting for its batch.",
    )
    shrink_idle_frac: float = Field(
        0.6,
        gt=0,
        le=1,
        description="The pool shrinks when its workers would still be idle (waiting for rows) this "
        "fraction of the time, or more, with one worker fewer doing the same work.",
    )
    every_steps: int = Field(5, ge=1, le=1_000_000, description="Trainer steps between two decisions.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleConfig:
        if self.min > self.max:
            raise ValueError(f"autoscale.min = {self.min} exceeds autoscale.max = {self.max}; set min <= max")
        return self


class HealthConfig(Section):
    """Health probes of the rollout engines (async mode): every `every_s` each rollout worker runs a
    tiny generation; one that gets no answer within the deadline has its actor restarted (its leased
    rows return to the store once their lease expires, and another worker generates them). A worker
    whose engine has not answered yet (starting, or restarted) has `start_timeout_s` instead."""

    every_s: float = Field(10.0, ge=0, le=86_400, description="Seconds between two probes (0: no probes).")
    timeout_s: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="The least deadline of a probe. The deadline is the larger of this and "
        "`slowdown` x the longest engine call the worker reported (a probe waits behind a call in flight).",
    )
    slowdown: float = Field(
        4.0,
        ge=1,
        le=1000,
        description="How many times its longest call an engine may take before it is dead.",
    )
