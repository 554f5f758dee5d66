"""The samples partition: one row per sample, its fields, and who fills which.

Rows of one prompt form a group of `n` (GRPO needs whole groups). The source writes the
prompt fields, rollout the response fields (with the policy version that made them),
reward the reward fields, the reference (when enabled) its log-probs. The trainer takes
whole groups whose fields are all ready. A flow-matching policy's rows (FLOW_SCHEMA) share
the bookkeeping, reward and reference fields and differ in what a prompt and a response are.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from asyncflow.errors import StoreTimeout

PARTITION = "samples"

SCHEMA = {
    # PromptSource
    "prompt_ids": "int64[*]",
    "prompt_index": "int64",  # position of the prompt in the task's stream: the resume cursor
    "sample_index": "int64",  # 0..n-1 within the group
    "answer": "str",
    "admit_version": "int64",  # trainer version when admitted: rollout generates with >= this
    # RolloutWorker
    "response_ids": "int64[*]",
    "behavior_logprobs": "float32[*]",
    "token_versions": "int64[*]",  # the policy version that produced each token
    "finish": "str",  # stop | length | abort
    # RewardWorker
    "reward": "float32",
    "reward_error": "str",  # "" when the reward function returned normally
    # ReferenceWorker
    "ref_logprobs": "float32[*]",
}

PROMPT_FIELDS = ["prompt_ids", "prompt_index", "sample_index", "answer", "admit_version"]
ROLLOUT_FIELDS = ["response_ids", "behavior_logprobs", "token_versions", "finish"]
REWARD_FIELDS = ["reward", "reward_error"]

# A flow-matching policy's rows: a condition instead of prompt ids, and instead of tokens the
# SDE trajectory, one "action" per denoising step (services.flow.engine).
FLOW_SCHEMA = {
    "condition": "float32[*]",  # PromptSource: what the policy is conditioned on (may be empty)
    **{k: SCHEMA[k] for k in ("prompt_index", "sample_index", "answer", "admit_version")},
    "latents": "float32[*,*]",  # RolloutWorker: x at each grid point (K+1, D), noise first, sample last
    "timesteps": "float32[*]",  # the grid (K+1,), from 1 to 0
    "behavior_logprobs": "float32[*]",  # log-prob of each step under the sampling weights (K,)
    "step_versions": "int64[*]",  # the policy version that took each step (K,)
    **{k: SCHEMA[k] for k in (*REWARD_FIELDS, "ref_logprobs")},
}
FLOW_PROMPT_FIELDS = ["condition", *PROMPT_FIELDS[1:]]
FLOW_ROLLOUT_FIELDS = ["latents", "timesteps", "behavior_logprobs", "step_versions"]


def schema(policy: str) -> dict[str, str]:
    """The samples partition's fields for a policy kind ("token" or "flow")."""
    return FLOW_SCHEMA if policy == "flow" else SCHEMA


# Consumers, named by role: every instance of a role shares one name, so each row goes to
# exactly one instance of it.
ROLLOUT, REWARD, REFERENCE, TRAINER = "rollout", "reward", "reference", "trainer"


def consumers(reference: bool) -> list[str]:
    return [ROLLOUT, REWARD, TRAINER] + ([REFERENCE] if reference else [])


def trainer_fields(reference: bool, policy: str = "token") -> list[str]:
    if policy == "flow":
        fields = ["condition", "prompt_index", "sample_index", *FLOW_ROLLOUT_FIELDS, "reward"]
    else:
        fields = ["prompt_ids", "prompt_index", "sample_index", *ROLLOUT_FIELDS[:3], "reward"]
    return fields + (["ref_logprobs"] if reference else [])


async def serve(step: Callable[[], Awaitable[int]]) -> None:
    """Call a worker's `step` until the stream ends (a step returns 0)."""
    while True:
        try:
            if not await step():
                return
        except StoreTimeout:
            continue  # nothing to do for a while (the trainer is slow or paused): keep waiting


async def work_through(step: Callable[[int], Awaitable[int]], rows: int) -> int:
    """Call `step(at_most)` until exactly `rows` rows are done (sync mode: a fixed share)."""
    done = 0
    while done < rows:
        done += await step(rows - done)
    return done


async def take(store: Any, fields: Sequence[str], size: int, consumer: str, *, unit: int = 1,
               sampler: str = "sequential", writes: Sequence[str] = (), wait: bool = True,
               timeout_s: float | None = None) -> Any:  # fmt: skip
    """Up to `size` rows that are ready now; if none, wait for `unit` rows (one group), then take
    what became ready with them. Producers put in bunches, so one wake-up fills a whole call."""
    kw = {"sampler": sampler, "writes": writes}
    batch = await store.get(PARTITION, fields, size, consumer, allow_partial=True, timeout_s=0, **kw)
    if len(batch) or batch.end or not wait:
        return batch
    batch = await store.get(PARTITION, fields, unit, consumer, timeout_s=timeout_s, **kw)
    if len(batch) and size > len(batch):
        batch = batch + await store.get(
            PARTITION, fields, size - len(batch), consumer, allow_partial=True, timeout_s=0, **kw
        )
    return batch
