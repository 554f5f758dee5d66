"""The samples partition: one row per sample, its fields, and who fills which.

Rows of one prompt form a group of `n` (GRPO needs whole groups). The source writes the
prompt fields, rollout the response fields (with the policy version that made them),
reward the reward fields, the reference (when enabled) its log-probs. The trainer takes
whole groups whose fields are all ready. A flow-matching policy's rows (FLOW_SCHEMA) share
the bookkeeping, reward and reference fields and differ in what a prompt and a response are.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from asyncflow.errors import SchemaError, StoreTimeout
from asyncflow.tracing import tracer

if TYPE_CHECKING:  # the seams' protocols and classes, for the type checker
    from dataplane.client import StoreClient

PARTITION = "samples"

SCHEMA = {
    # PromptSource
    "prompt_ids": "int64[*]",
    "prompt_index": "int64",  # position of the prompt in the task's stream: the resume cursor
    "sample_index": "int64",  # 0..n-1 within the group
    "answer": "str",
    "info": "str",  # more of the task's record for the reward (a JSON object, "" for none)
    "admit_version": "int64",  # trainer version when admitted: rollout generates with >= this
    # RolloutWorker
    "response_ids": "int64[*]",
    "behavior_logprobs": "float32[*]",
    "token_versions": "int64[*]",  # the policy version that produced each token
    "finish": "str",  # stop | length | abort
    # RolloutWorker, multi-turn episodes only (env.source): the response is the whole trajectory
    # after the prompt, model and environment tokens; behavior_logprobs and token_versions hold one
    # entry per model token
    "loss_mask": "uint8[*]",  # per response token: 1 sampled by the model (trained), 0 the environment's
    "episode": "str",  # JSON: turns, why it ended, the environment's reward parts and info per turn
    # RewardWorker
    "reward": "float32",
    "reward_error": "str",  # "" when the reward function returned normally
    "reward_parts": "str",  # the reward's named parts as a JSON object, "" when it is one number
    # ReferenceWorker
    "ref_logprobs": "float32[*]",
}

PROMPT_FIELDS = [
    "prompt_ids",
    "prompt_index",
    "sample_index",
    "answer",
    "admit_version",
]  # rollout reads them
# The source also writes "info" (metadata for the reward); rollout has no use for it, so does not read it.
ROLLOUT_FIELDS = ["response_ids", "behavior_logprobs", "token_versions", "finish"]
EPISODE_FIELDS = ["loss_mask", "episode"]  # what rollout also writes for multi-turn episodes
REWARD_FIELDS = ["reward", "reward_error", "reward_parts"]

# A flow-matching policy's rows: a condition instead of prompt ids, and instead of tokens the
# SDE trajectory, one "action" per denoising step (services.flow.engine).
FLOW_SCHEMA = {
    "condition": "float32[*]",  # PromptSource: what the policy is conditioned on (may be empty)
    **{k: SCHEMA[k] for k in ("prompt_index", "sample_index", "answer", "info", "admit_version")},
    "latents": "float32[*,*]",  # RolloutWorker: x at each grid point (K+1, D), noise first, sample last
    "timesteps": "float32[*]",  # the grid (K+1,), from 1 to 0
    "behavior_logprobs": "float32[*]",  # log-prob of each step under the sampling weights (K,)
    "step_versions": "int64[*]",  # the policy version that took each step (K,)
    "sample": "float32[*]",  # the generated point in data space (D,), what the reward judges
    **{k: SCHEMA[k] for k in (*REWARD_FIELDS, "ref_logprobs")},
}
FLOW_PROMPT_FIELDS = ["condition", *PROMPT_FIELDS[1:]]
FLOW_ROLLOUT_FIELDS = ["latents", "timesteps", "behavior_logprobs", "step_versions", "sample"]


def schema(policy: str) -> dict[str, str]:
    """The samples partition's fields for a policy kind ("token" or "flow")."""
    return FLOW_SCHEMA if policy == "flow" else SCHEMA


# Consumers, named by role: every instance of a role shares one name, so each row goes to
# exactly one instance of it.
ROLLOUT, REWARD, REFERENCE, TRAINER = "rollout", "reward", "reference", "trainer"


def consumers(reference: bool) -> list[str]:
    return [ROLLOUT, REWARD, TRAINER] + ([REFERENCE] if reference else [])


# Dynamic sampling (trainer.dynamic_sampling): one row per group the trainer dropped (consumed,
# not trained), read by the source, which admits a new prompt in its place (workers.screening).
DROPPED = "dropped"
DROPPED_SCHEMA = {"prompt_index": "int64", "version": "int64"}
ADMISSION = "admission"  # the source, as the consumer of DROPPED


async def serve(
    store: StoreClient, fields: Sequence[str], size: int, consumer: str,
    process: Callable[[Any], Awaitable[Any]], *, unit: int = 1, sampler: str = "sequential",
    writes: Sequence[str] = (), timeout_s: float | None = None,
) -> None:  # fmt: skip
    """Stream rows to `process(batch)` until the partition is sealed and drained (async mode).

    Each batch is up to `size` rows, at least `unit` (one group): a wake-up takes what became
    ready with it. This is the store's `stream()` as the README shows it, read ahead by nothing
    (a worker holds only the rows it works on) and acked when the next batch is asked for. A
    stretch with nothing to do (StoreTimeout: the trainer is slow or paused) just keeps waiting.
    """
    kw: dict[str, Any] = {"min_rows": unit, "sampler": sampler, "writes": writes, "timeout_s": timeout_s}
    while True:
        try:
            async for batch in store.stream(PARTITION, fields, size, consumer, prefetch=0, **kw):
                await process(batch)
            return
        except StoreTimeout:
            continue


def idle(
    stats: dict[str, float], process: Callable[[Any], Awaitable[Any]]
) -> Callable[[Any], Awaitable[None]]:
    """`process`, adding the time between its calls (waiting for rows) to stats["idle_s"], and
    tracing it as a `store.wait` span."""
    last, last_ns = time.perf_counter(), time.time_ns()

    async def timed(batch: Any) -> None:
        nonlocal last, last_ns
        stats["idle_s"] += time.perf_counter() - last
        tracer.complete("store.wait", last_ns, time.time_ns(), rows=len(batch))
        try:
            await process(batch)
        finally:
            last, last_ns = time.perf_counter(), time.time_ns()

    return timed


async def work_through(step: Callable[[int], Awaitable[int]], rows: int) -> int:
    """Call `step(at_most)` until exactly `rows` rows are done (sync mode: a fixed share)."""
    done = 0
    while done < rows:
        done += await step(rows - done)
    return done


async def take(
    store: StoreClient,
    fields: Sequence[str],
    size: int,
    consumer: str,
    *,
    unit: int = 1,
    sampler: str = "sequential",
    writes: Sequence[str] = (),
    timeout_s: float | None = None,
) -> Any:
    """Up to `size` rows: at least `unit` (one group), waiting for them, plus what became ready with
    them (sync mode). An empty batch means the stream ended."""
    with tracer.span("store.get") as span:
        got = store.stats.bytes_got
        batch = await store.get(
            PARTITION, fields, size, consumer, min_rows=unit, timeout_s=timeout_s, sampler=sampler,
            writes=writes,
        )  # fmt: skip
        span.update(rows=len(batch), bytes=store.stats.bytes_got - got)
    return batch


async def fill(store: StoreClient, data: dict[str, Any], batch: Any, **put: Any) -> None:
    """Write a consumer's fields into the rows of `batch` it leased (rollout, reward, reference).

    A worker writes, then acks; a checkpoint taken between the two holds rows with the fields
    written and the lease not yet acked, so after a resume the rows come back to the consumer
    with their fields already there, and the store refuses the whole put. Then each row is
    written alone and a row already written keeps the values the checkpoint holds: nothing is
    written twice, and the batch can be acked."""
    try:
        with tracer.span("store.put", rows=len(batch)) as span:
            sent = store.stats.bytes_put
            await store.put(PARTITION, data, rows=batch, **put)
            span["bytes"] = store.stats.bytes_put - sent
        return
    except SchemaError as e:
        if "already written" not in str(e):
            raise
    for i, row in enumerate(batch.rows):
        try:
            await store.put(PARTITION, {k: v[i : i + 1] for k, v in data.items()}, rows=[row], **put)
        except SchemaError as e:
            if "already written" not in str(e):
                raise
