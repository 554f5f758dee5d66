"""PromptSource: feeds the task's prompts into the store, never further ahead than allowed.

Admission control (asyncflow.versioning.admission_limit): prompt i may enter only once
the trainer has published version i // batch_prompts - k, so at most (k + 1) x batch
prompts are in flight and no sample is generated more than k versions before it trains.
Each admitted prompt becomes a group of `n` rows. The cursor (next prompt index) is the
source's whole state: a resumed run starts from it.

Admission on demand (`admit_ahead`, async): within the bound, the source admits only while
rollout is short of work (fewer rows queued than its workers' next calls take) and the
trainer has fewer than `admit_ahead` batches waiting (rows it has not read whose every field
is ready). A trainer-bound run then trains samples about admit_ahead + 1 versions old
instead of k, at the same throughput (running further ahead only fills the queue); a
rollout-bound run never fills the queue, so k still governs. The source reads the store's
counts every 50 ms while it holds back (store_stats: cheap on the memory store; on Redis a
snapshot of the partition, so a partition of many thousand live rows makes each look cost more).

Dynamic sampling (trainer.dynamic_sampling): the trainer drops groups whose rewards are all
equal and notes each in the store's DROPPED partition; the source reads those notes and admits
one more prompt per dropped group (`freed`, kept with the cursor in a checkpoint). The bound
still holds: prompt i enters once `i < admission_limit(v, k, batch) + freed`, and the trainer
has consumed `v * batch + (groups it dropped)` groups by version v, so prompt i is trained at
a version no more than k above the one it was admitted at.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from asyncflow.errors import StoreTimeout
from asyncflow.tracing import tracer
from asyncflow.versioning import admission_limit
from workers.samples import ADMISSION, DROPPED, PARTITION, ROLLOUT, TRAINER

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
        dynamic_sampling: bool = False,
        freed: int = 0,
        admit_ahead: int | None = None,
        backlog_rows: int = 0,  # 0: one batch
    ):
        self.task, self.kind, self.store, self.weights = task, kind, store, weights
        self.n, self.batch_prompts, self.staleness = n, batch_prompts, staleness
        self.cursor, self.prompts_per_put = cursor, prompts_per_put
        self.dynamic_sampling = dynamic_sampling
        self.freed = freed  # admission slots freed by dropped groups (dynamic sampling), ever
        self.admit_ahead = admit_ahead  # batches the trainer may have waiting before admission pauses
        self.backlog_rows = backlog_rows  # with admit_ahead: rows queued for rollout that keep it busy
        self._running = asyncio.Event()
        self._running.set()
        self._idle = asyncio.Event()  # set while no put is in progress: a checkpoint may be taken
        self._idle.set()
        self._noting = asyncio.Event()  # set while no dropped-group note is being acked and counted
        self._noting.set()
        self._changed = asyncio.Event()  # a new version, or freed slots: admission looks again
        self.version = 0

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
        self.version = max(await self.weights.latest(), 0)
        watchers = [asyncio.ensure_future(self._watch_versions())]
        if self.dynamic_sampling:
            watchers.append(asyncio.ensure_future(self._watch_dropped()))
        try:
            while True:
                await self._running.wait()
                self._changed.clear()  # before looking: a change from here on wakes the wait below
                limit = admission_limit(self.version, self.staleness, self.batch_prompts) + self.freed
                if limit > self.cursor and not await self._wanted():  # on demand: look again shortly
                    await self._wait_changed(watchers, timeout_s=0.05)
                    continue
                if limit > self.cursor:  # one put at a time, so a pause takes effect between puts
                    self._idle.clear()
                    try:
                        await self.admit(min(limit - self.cursor, self.prompts_per_put), self.version)
                    finally:
                        self._idle.set()
                    continue
                await self._wait_changed(watchers)
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)

    async def _wanted(self) -> bool:
        """With admit_ahead: whether rollout is short of work (fewer than backlog_rows untaken)
        and the trainer has fewer than admit_ahead batches waiting (rows it has not read whose
        every field is ready)."""
        admit_ahead = self.admit_ahead  # read once: it may be changed while the stats are awaited
        if admit_ahead is None:
            return True
        stats = await self.store.store_stats()
        consumers = stats["partitions"].get(PARTITION, {}).get("consumers", {})
        queued = consumers.get(ROLLOUT, {}).get("pending", 0)  # admitted, not yet taken by a worker
        waiting = consumers.get(TRAINER, {}).get("ready", 0)
        batch = self.batch_prompts * self.n
        return queued < (self.backlog_rows or batch) and waiting < admit_ahead * batch

    async def _wait_changed(self, watchers: Sequence[asyncio.Future], timeout_s: float | None = None) -> None:
        """Until the version or the freed slots change (or timeout_s); a watcher's error is raised here."""
        changed = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait([changed, *watchers], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
        for task in watchers:
            if task.done():
                task.result()

    async def _watch_versions(self) -> None:
        while True:
            self.version = max(await self.weights.wait_version(self.version + 1), 0)
            self._changed.set()

    async def _watch_dropped(self) -> None:
        while True:
            await self.take_freed()
            self._changed.set()

    async def take_freed(self) -> int:
        """Wait for the trainer's notes of dropped groups (dynamic sampling), count each as a freed
        admission slot and return how many. Paused, it hands back what it read (a checkpoint then
        holds those notes unread, and `freed` without them)."""
        while True:
            await self._running.wait()
            try:
                batch = await self.store.get(DROPPED, ["prompt_index"], 1024, ADMISSION, min_rows=1)
            except StoreTimeout:  # nothing dropped for a while: keep waiting
                continue
            if self._running.is_set():
                break
            await self.store.release(batch)  # paused meanwhile: unread, for the checkpoint
        self._noting.clear()
        try:
            await self.store.ack(batch)
            self.freed += len(batch)
        finally:
            self._noting.set()
        return len(batch)

    async def pause(self) -> int:
        """Stop admitting after the put in progress; returns the cursor (for a checkpoint)."""
        self._running.clear()
        await self._idle.wait()
        await self._noting.wait()
        return self.cursor

    def resume(self) -> None:
        self._running.set()

    def set_staleness(self, k: int) -> None:
        """A new bound k (a steered run): admission follows it from the next put on."""
        self.staleness = k
        self._changed.set()  # a wider bound admits at once, not at the next version
