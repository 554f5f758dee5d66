"""The rollout scheduler's settings (rollout.scheduler); imports no torch, ray or vllm."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asyncflow.config._base import Section


class SchedulerConfig(Section):
    """The rollout scheduler (services.serving.scheduler): which sequences decode each step."""

    policy: Literal["off", "fcfs", "rl"] = Field(
        "off",
        description="off: the plain torch engine (static batches; vLLM keeps its default FCFS). fcfs or "
        "rl: the torch engine becomes the scheduled one (continuous batching in kv_budget_tokens, the "
        "lowest priority preempted), ordered first come first served, or by the RL priority (groups "
        "with the fewest unfinished samples, then the oldest version, then arrival); with vLLM, rl runs "
        "vLLM's priority scheduler with prefix caching.",
    )
    kv_budget_tokens: int = Field(
        65536, ge=1, le=1 << 30, description="Scheduled torch engine: KV-cached tokens held at once, at most."
    )
    max_batch_size: int = Field(
        256, ge=1, le=65536, description="Scheduled torch engine: sequences decoded per step, at most."
    )
    keep_kv: bool = Field(
        True,
        description="Scheduled torch engine: keep a preempted sequence's KV on the host and restore it "
        "(true), or drop it and recompute its prefix when it resumes (false).",
    )
    turn_cache_tokens: int = Field(
        0,
        ge=0,
        le=1 << 30,
        description="Scheduled torch engine: host tokens of finished sequences' KV kept for a next turn "
        "whose prompt extends them (multi-turn episodes prefill only the new tokens); 0 turns it off.",
    )
