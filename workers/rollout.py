"""RolloutWorker: takes prompt groups from the store, samples `n` responses per prompt with
its engine, writes them back with behaviour log-probs and the version of every token.

Weights are pulled at a safe point, between engine calls (deferred update): the worker
never waits for the trainer unless a prompt was admitted at a version newer than the
weights it holds, and the trainer never waits for it. With partial rollout on, a version
published while a call is generating is also loaded at once: the engine swaps the weights
under the samples in flight (and keeps them, or regenerates them, as it was built to), so
long responses do not hold old weights for the whole call. The worker knows nothing about
rewards or training; the engine knows nothing about the store.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from services.serving import Request, SamplingParams
from workers.samples import PARTITION, PROMPT_FIELDS, ROLLOUT, ROLLOUT_FIELDS, serve, take


class RolloutWorker:
    def __init__(
        self,
        engine: Any,
        store: Any,
        weights: Any,
        *,
        n: int,
        groups_per_call: int,
        params: SamplingParams,
        name: str = "rollout",
        get_timeout_s: float | None = None,
        partial_rollout: bool = False,
    ):
        self.engine, self.store, self.weights = engine, store, weights
        self.partial_rollout = partial_rollout
        self.n, self.groups_per_call, self.params, self.name = n, groups_per_call, params, name
        self.get_timeout_s = get_timeout_s
        self.stats = {
            "samples": 0,
            "tokens": 0,
            "busy_s": 0.0,
            "idle_s": 0.0,
            "weight_syncs": 0,
            "sync_s": 0.0,
            "mid_call_syncs": 0,  # versions loaded while a call was generating (partial rollout)
        }

    async def sync_weights(self, min_version: int = 0) -> int:
        """Load the newest published version (waiting for one >= min_version); returns it."""
        start = time.perf_counter()
        latest = await self.weights.wait_version(min_version)
        if latest > self.engine.version:
            version, tensors = await self.weights.pull(min_version)
            await self.engine.update_weights(version, tensors)
            self.stats["weight_syncs"] += 1
        self.stats["sync_s"] += time.perf_counter() - start
        return self.engine.version

    async def step(self, max_groups: int | None = None, *, wait: bool = True) -> int:
        """One engine call: take up to `max_groups` prompt groups, generate, write. Returns samples
        written (0 when the stream has ended, or, with wait=False, when nothing is ready)."""
        start = time.perf_counter()
        size = (max_groups or self.groups_per_call) * self.n
        batch = await take(
            self.store, PROMPT_FIELDS, size, ROLLOUT, unit=self.n, sampler="group", writes=ROLLOUT_FIELDS,
            wait=wait, timeout_s=self.get_timeout_s,
        )  # fmt: skip
        got = time.perf_counter()
        self.stats["idle_s"] += got - start
        if not len(batch):
            return 0
        # The safe point: weights at least as new as the version each prompt was admitted at.
        await self.sync_weights(max(int(v) for v in batch["admit_version"]))
        heads = range(0, len(batch), self.n)  # rows of a group are adjacent, in sample order
        requests = [
            Request(f"{batch['prompt_index'][i]}", batch["prompt_ids"][i].tolist(), self.n, self.params)
            for i in heads
        ]
        completions = await self._generate(requests)
        order = {(int(batch["prompt_index"][i]), int(batch["sample_index"][i])): i for i in range(len(batch))}
        rows: list[Any] = [None] * len(batch)
        for c in completions:
            rows[order[(int(c.request_id), c.index)]] = c
        await self.store.put(
            PARTITION,
            {
                "response_ids": [np.asarray(c.response_ids, dtype=np.int64) for c in rows],
                "behavior_logprobs": [np.asarray(c.logprobs, dtype=np.float32) for c in rows],
                "token_versions": [np.asarray(c.versions, dtype=np.int64) for c in rows],
                "finish": [c.finish_reason for c in rows],
            },
            rows=batch,
            version=min(min(c.versions, default=self.engine.version) for c in rows),
        )
        await self.store.ack(batch)
        self.stats["samples"] += len(rows)
        self.stats["tokens"] += sum(len(c.response_ids) for c in rows)
        self.stats["busy_s"] += time.perf_counter() - got
        return len(rows)

    async def _generate(self, requests: list[Request]) -> list:
        """engine.generate, loading each version published meanwhile when partial rollout is on."""
        call = asyncio.ensure_future(self.engine.generate(requests))
        newer: asyncio.Future | None = None
        try:
            while self.partial_rollout and not call.done():
                newer = asyncio.ensure_future(self.weights.wait_version(self.engine.version + 1))
                await asyncio.wait([call, newer], return_when=asyncio.FIRST_COMPLETED)
                if newer.done():
                    newer.result()  # a failed wait raises here
                    await self.sync_weights()
                    self.stats["mid_call_syncs"] += 1
            return await call
        finally:
            for task in (call, newer):  # a remote wait stays parked in the weight store until a publish
                if task is not None and not task.done():
                    task.cancel()

    async def work(self, groups: int) -> int:
        """Generate for exactly `groups` prompt groups (sync mode); returns samples written."""
        done = 0
        while done < groups * self.n:
            done += await self.step(groups - done // self.n)
        return done

    async def run(self) -> None:
        """Generate until the prompt stream ends (the workflow seals it) or the task is cancelled."""
        await serve(self.step)

    async def evaluate(self, examples: list[Any], tokenizer: Any, reward_fn: Any) -> float:
        """Mean reward of one sample per held-out prompt, with the current weights."""
        requests = [
            Request(f"eval{i}", [tokenizer.bos_token_id, *tokenizer.encode(e.prompt)], 1, self.params)
            for i, e in enumerate(examples)
        ]
        completions = await self.engine.generate(requests)
        rewards = [
            reward_fn(e.prompt, decode_response(tokenizer, c.response_ids), e.answer)
            for e, c in zip(examples, completions)
        ]
        return sum(rewards) / max(len(rewards), 1)


def decode_response(tokenizer: Any, ids: list[int]) -> str:
    """Response text without the end-of-sequence token."""
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)
