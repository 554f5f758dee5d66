"""PromptSource: feeds the task's prompts into the store, never further ahead than allowed.

Admission control (asyncflow.versioning.admission_limit): prompt i may enter only once
the trainer has published version i // batch_prompts - k, so at most (k + 1) x batch
prompts are in flight and no sample is generated more than k versions before it trains.
Each admitted prompt becomes a group of `n` rows. The cursor (next prompt index) is the
source's whole state: a resumed run starts from it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from asyncflow.tracing import tracer
from asyncflow.versioning import admission_limit
from workers.samples import PARTITION

if TYPE_CHECKING:  # the seams' protocols and classes, for the type checker
    from dataplane.client import StoreClient
    from workers.kinds import Kind
    from workers.weights import WeightClient


class PromptSource:
    def __init__(
        self,
        task: Any,
        kind: Kind,
        store: StoreClient,
        weights: WeightClient,
        *,
        n: int,
        batch_prompts: int,
        staleness: int,
        cursor: int = 0,
        prompts_per_put: int = 8,
    ):
        self.task, self.kind, self.store, self.weights = task, kind, store, weights
        self.n, self.batch_prompts, self.staleness = n, batch_prompts, staleness
        self.cursor, self.prompts_per_put = cursor, prompts_per_put
        self._running = asyncio.Event()
        self._running.set()
        self._idle = asyncio.Event()  # set while no put is in progress: a checkpoint may be taken
        self._idle.set()

    async def admit(self, count: int, version: int) -> int:
        """Put the next `count` prompts (stamped with the trainer's `version`); returns the cursor."""
        while count > 0:
            take = min(count, self.prompts_per_put)
            examples = [self.task.example(i) for i in range(self.cursor, self.cursor + take)]
            prompts = self.kind.prompts(examples)  # {field: one value per example}
            rows = [k for k in range(take) for _ in range(self.n)]  # each example n times
            # the span maps store rows to samples: row ids[k * n + j] is sample j of prompt cursor + k
            with tracer.span("admit", prompt=self.cursor, prompts=take, n=self.n, version=version) as span:
                sent = self.store.stats.bytes_put
                span["row_ids"] = await self.store.put(
                    PARTITION,
                    {
                        **{field: [values[k] for k in rows] for field, values in prompts.items()},
                        "prompt_index": [self.cursor + k for k in rows],
                        "sample_index": [j % self.n for j in range(len(rows))],
                        "answer": [examples[k].answer for k in rows],
                        "info": [getattr(examples[k], "info", "") for k in rows],
                        "admit_version": [version] * len(rows),
                    },
                    group_size=self.n,
                )
                span["bytes"] = self.store.stats.bytes_put - sent
            self.cursor += take
            count -= take
        return self.cursor

    async def run(self) -> None:
        """Admit prompts whenever the bound allows, forever (the workflow cancels it)."""
        version = await self.weights.latest()
        while True:
            await self._running.wait()
            allowed = admission_limit(max(version, 0), self.staleness, self.batch_prompts) - self.cursor
            if allowed > 0:  # one put at a time, so a pause takes effect between puts
                self._idle.clear()
                try:
                    await self.admit(min(allowed, self.prompts_per_put), max(version, 0))
                finally:
                    self._idle.set()
                continue
            version = await self.weights.wait_version(version + 1)

    async def pause(self) -> int:
        """Stop admitting after the put in progress; returns the cursor (for a checkpoint)."""
        self._running.clear()
        await self._idle.wait()
        return self.cursor

    def resume(self) -> None:
        self._running.set()

    def set_staleness(self, k: int) -> None:
        """A new bound k (a steered run): admission follows it from the next put on."""
        self.staleness = k
