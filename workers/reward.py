"""RewardWorker: scores responses with the task's reward function, one call per sample.

Each call runs in a thread with a deadline: a reward that raises, hangs or is not a finite
number (NaN, inf) is recorded as a failure (its error text in `reward_error`,
`failure_reward` as the reward), never a dead run. A hung call's thread cannot be killed
from Python; it is abandoned and counted, and the pool has spare threads so that the next
calls still run.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.samples import PARTITION, REWARD, REWARD_FIELDS, idle, serve, take, work_through

if TYPE_CHECKING:  # the seams' protocols and classes, for the type checker
    from dataplane.client import StoreClient
    from workers.kinds import Kind

WRITES = REWARD_FIELDS


class RewardWorker:
    def __init__(
        self,
        reward_fn: Any,
        kind: Kind,
        store: StoreClient,
        *,
        timeout_s: float,
        failure_reward: float,
        batch_rows: int,
        get_timeout_s: float | None = None,
        threads: int = 8,
    ):
        self.reward_fn, self.kind, self.store = reward_fn, kind, store
        self.timeout_s, self.failure_reward, self.batch_rows = timeout_s, failure_reward, batch_rows
        self.get_timeout_s = get_timeout_s
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="reward")
        self.stats: dict[str, float] = {
            "samples": 0,
            "failures": 0,
            "timeouts": 0,
            "busy_s": 0.0,
            "idle_s": 0.0,
        }

    async def _score(self, *args: Any) -> tuple[float, str]:
        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(self._pool, self.reward_fn, *args)
        done, _ = await asyncio.wait([call], timeout=self.timeout_s)  # wait_for would cancel-and-hang
        if not done:
            self.stats["timeouts"] += 1
            self.stats["failures"] += 1
            return self.failure_reward, f"timed out after {self.timeout_s:g} s"
        try:
            value = float(call.result())
        except Exception as e:  # the user's reward function failed: record it, keep the run going
            self.stats["failures"] += 1
            return self.failure_reward, f"{type(e).__name__}: {e}"[:500]
        if not math.isfinite(value):  # a NaN would poison the group's advantages and the loss
            self.stats["failures"] += 1
            return self.failure_reward, f"the reward function returned {value}, not a finite number"
        return value, ""

    async def step(self, max_rows: int | None = None) -> int:
        """Score up to `max_rows` ready rows (sync mode); returns how many (0: the stream ended)."""
        start = time.perf_counter()
        size = max_rows or self.batch_rows
        batch = await take(self.store, self.fields, size, REWARD, writes=WRITES, timeout_s=self.get_timeout_s)
        self.stats["idle_s"] += time.perf_counter() - start
        if not len(batch):
            return 0
        await self.process(batch)
        await self.store.ack(batch)
        return len(batch)

    async def process(self, batch: Any) -> None:
        """Score a batch and write its reward fields (the caller acks it)."""
        start = time.perf_counter()
        scored = await asyncio.gather(
            *(self._score(*self.kind.reward_args(*row)) for row in zip(*(batch[f] for f in self.fields)))
        )
        await self.store.put(
            PARTITION,
            # One float32 array: a list of Python floats would have to be exact in float32 (-0.1 is not).
            {
                "reward": np.asarray([s for s, _ in scored], np.float32),
                "reward_error": [e for _, e in scored],
            },
            rows=batch,
        )
        self.stats["samples"] += len(batch)
        self.stats["busy_s"] += time.perf_counter() - start

    @property
    def fields(self) -> list[str]:
        return [self.kind.prompt_field, self.kind.response_field, "answer"]

    async def work(self, rows: int) -> int:
        """Process exactly `rows` rows (sync mode)."""
        return await work_through(self.step, rows)

    async def run(self) -> None:
        """Score rows as they become ready until the stream ends (async mode)."""
        await serve(
            self.store, self.fields, self.batch_rows, REWARD, idle(self.stats, self.process), writes=WRITES,
            timeout_s=self.get_timeout_s,
        )  # fmt: skip

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
