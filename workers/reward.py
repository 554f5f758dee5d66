"""RewardWorker: scores responses with the task's reward function, one call per sample (or, with
`reward.per_group`, one call per group of `n` responses to one prompt).

A reward function returns a number, or a dict of named parts whose sum is the reward (e.g.
`{"correct": 1.0, "format": 0.1}`): every part is stored with the sample and logged by the
trainer as `reward/<name>`. DAPO's overlong penalty (`reward.overlong_buffer`) is one more
part, added here from the response's length in tokens.

Each call has a deadline: a reward that raises, hangs, runs out of memory or is not a finite
number (NaN, inf) is recorded as a failure (its error text in `reward_error`, `failure_reward`
as the reward), never a dead run. The function runs either in reward processes
(workers/reward_pool.py: a hung call's process is killed and replaced, memory is capped) or,
given a plain callable, in a thread: a hung thread cannot be killed from Python, so it is
abandoned and counted, and the pool has spare threads so that the next calls still run.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from asyncflow.errors import WorkerError
from asyncflow.tracing import traced
from workers.reward_child import takes_info, with_info
from workers.reward_pool import RewardFailed, RewardProcesses
from workers.samples import REWARD, REWARD_FIELDS, fill, idle, serve, take, work_through

if TYPE_CHECKING:  # the seams' protocols and classes, for the type checker
    from dataplane.client import StoreClient
    from workers.kinds import Kind

WRITES = REWARD_FIELDS
Scored = tuple[float, str, dict[str, float]]  # (reward, error text or "", named parts)


def parts_of(value: Any) -> tuple[float, dict[str, float]]:
    """A reward function's result as (reward, parts): a number is itself, a dict is the sum of
    its named parts. Raises ValueError for anything else, or a part that is not a finite number."""
    if isinstance(value, dict):
        parts = {str(k): float(v) for k, v in value.items()}
        if not parts:
            raise ValueError("the reward function returned an empty dict; give at least one named part")
    else:
        parts = {}
        value = float(value)
    total = sum(parts.values()) if parts else float(value)
    if not math.isfinite(total):  # a NaN would poison the group's advantages and the loss
        raise ValueError(f"the reward function returned {value}, not a finite number")
    return total, parts


def with_episode(info: str, episode: str) -> str:
    """A row's info (a JSON object, "" for none) with its episode's record added as `episode`."""
    return json.dumps({**(json.loads(info) if info else {}), "episode": json.loads(episode)})


def overlong(length: int, max_tokens: int, buffer: int, penalty: float) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to max_tokens - buffer tokens,
    then falling linearly to -penalty at max_tokens."""
    return -penalty * min(max(length - (max_tokens - buffer), 0), buffer) / buffer


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
        per_group: int = 0,
        overlong: tuple[int, int, float] | None = None,
    ):
        """`reward_fn`: the function, called in a thread, or RewardProcesses serving it. `per_group`:
        the group size n when the reward function scores a whole group per call (lists in, a list
        out), 0 for one call per sample. `overlong`: (max_new_tokens, buffer, penalty) of DAPO's
        overlong penalty, None for none."""
        self.reward_fn, self.kind, self.store = reward_fn, kind, store
        self.timeout_s, self.failure_reward, self.batch_rows = timeout_s, failure_reward, batch_rows
        self.get_timeout_s, self.per_group, self.overlong = get_timeout_s, per_group, overlong
        self.processes = reward_fn if isinstance(reward_fn, RewardProcesses) else None
        self.takes_info = self.processes is None and takes_info(reward_fn)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="reward")
        self.stats: dict[str, float] = {
            "samples": 0,
            "failures": 0,
            "timeouts": 0,
            "restarts": 0,  # reward processes replaced (killed past the deadline, out of memory, dead)
            "busy_s": 0.0,
            "idle_s": 0.0,
        }

    async def _call(self, *args: Any, info: Any = "") -> tuple[Any, str]:
        """(what the reward function returned, "") or (None, why it failed)."""
        return (await self._calls([(list(args), info)]))[0]

    async def _calls(self, calls: list[tuple[list, Any]]) -> list[tuple[Any, str]]:
        """`_call` for many calls at once: in reward processes, one batch per process (one message
        each way per call would cost more than a cheap function); in threads, all in flight."""
        if self.processes is None:
            results = await asyncio.gather(*(self._in_thread(args, info) for args, info in calls),
                                           return_exceptions=True)  # fmt: skip
        else:
            size = -(-len(calls) // self.processes.size)  # contiguous chunks, one per process
            try:
                chunks = await asyncio.gather(
                    *(self.processes.call_many(calls[i : i + size], self.timeout_s)
                      for i in range(0, len(calls), size))
                )  # fmt: skip
            finally:
                self.stats["restarts"] = self.processes.restarts
            results = [result for chunk in chunks for result in chunk]
        return [self._outcome(result) for result in results]

    def _outcome(self, result: Any) -> tuple[Any, str]:
        if isinstance(result, WorkerError):  # the reward processes cannot start: the run stops
            raise result
        if isinstance(result, TimeoutError):
            self.stats["timeouts"] += 1
            return None, f"timed out after {self.timeout_s:g} s"
        if isinstance(result, RewardFailed):
            return None, str(result)
        if isinstance(result, Exception):  # the user's reward function failed: record it, go on
            return None, f"{type(result).__name__}: {result}"[:500]
        return result, ""

    async def _in_thread(self, args: list, info: Any) -> Any:
        loop = asyncio.get_running_loop()
        fn = with_info(self.reward_fn, info) if self.takes_info else self.reward_fn
        call = loop.run_in_executor(self._pool, fn, *args)
        done, _ = await asyncio.wait([call], timeout=self.timeout_s)  # wait_for would cancel-and-hang
        if not done:
            raise TimeoutError(self.timeout_s)
        return call.result()

    def _scored(self, value: Any, error: str) -> Scored:
        if not error:
            try:
                total, parts = parts_of(value)
                return total, "", parts
            except (TypeError, ValueError) as e:
                error = str(e) if isinstance(e, ValueError) else f"the reward function returned {value!r}"
        self.stats["failures"] += 1
        return self.failure_reward, error, {}

    async def _score(self, *args: Any, info: str = "") -> Scored:
        return self._scored(*await self._call(*args, info=info))

    def _group_scored(self, size: int, value: Any, error: str) -> list[Scored]:
        """A per-group call's result as one Scored per row."""
        if not error and not (isinstance(value, (list, tuple)) and len(value) == size):
            error = f"a per-group reward function must return a list of {size} rewards, got {value!r}"[:500]
        if error:
            return [self._scored(None, error) for _ in range(size)]
        return [self._scored(v, "") for v in value]

    async def step(self, max_rows: int | None = None) -> int:
        """Score up to `max_rows` ready rows (sync mode); returns how many (0: the stream ended)."""
        start = time.perf_counter()
        size = max_rows or self.batch_rows
        batch = await take(
            self.store, self.fields, size, REWARD, writes=WRITES, timeout_s=self.get_timeout_s, **self._read
        )
        self.stats["idle_s"] += time.perf_counter() - start
        if not len(batch):
            return 0
        await self.process(batch)
        await self.store.ack(batch)
        return len(batch)

    @traced("reward", lambda batch: {"row_ids": batch.rows})
    async def process(self, batch: Any) -> None:
        """Score a batch and write its reward fields (the caller acks it)."""
        start = time.perf_counter()
        rows = [self.kind.reward_args(*row) for row in zip(*(batch[f] for f in self.fields[:3]))]
        infos = list(batch["info"])
        if "episode" in self.fields:  # multi-turn: the reward function sees the episode in info["episode"]
            infos = [with_episode(i, e) for i, e in zip(infos, batch["episode"])]
        if self.per_group:  # the batch holds whole groups: one call per prompt, lists in, a list out
            groups: dict[int, list[int]] = {}
            for i, prompt_index in enumerate(batch["prompt_index"]):
                groups.setdefault(int(prompt_index), []).append(i)
            calls = [
                ([list(c) for c in zip(*(rows[i] for i in g))], [infos[i] for i in g])
                for g in groups.values()
            ]
            by_row: dict[int, Scored] = {}
            for members, outcome in zip(groups.values(), await self._calls(calls)):
                by_row.update(zip(members, self._group_scored(len(members), *outcome)))
            scored = [by_row[i] for i in range(len(rows))]
        else:
            scored = [
                self._scored(*outcome)
                for outcome in await self._calls([(list(r), i) for r, i in zip(rows, infos)])
            ]
        if self.overlong is not None:
            max_tokens, buffer, penalty = self.overlong
            for i, response in enumerate(batch[self.kind.response_field]):
                part = overlong(len(response), max_tokens, buffer, penalty)
                reward, error, parts = scored[i]
                scored[i] = (reward + part, error, {**(parts or {"reward": reward}), "overlong": part})
        await fill(
            self.store,
            # One float32 array: a list of Python floats would have to be exact in float32 (-0.1 is not).
            {
                "reward": np.asarray([s for s, _, _ in scored], np.float32),
                "reward_error": [e for _, e, _ in scored],
                "reward_parts": [json.dumps(p) if p else "" for _, _, p in scored],
            },
            batch,
        )
        self.stats["samples"] += len(batch)
        self.stats["busy_s"] += time.perf_counter() - start

    @property
    def fields(self) -> list[str]:
        fields = [self.kind.prompt_field, self.kind.response_field, "answer", "prompt_index", "info"]
        return fields + (["episode"] if getattr(self.kind, "multi_turn", False) else [])

    @property
    def _read(self) -> dict[str, Any]:
        """How this worker reads: whole groups when the reward function scores a group per call."""
        return {"unit": self.per_group, "sampler": "group"} if self.per_group else {}

    async def work(self, rows: int) -> int:
        """Process exactly `rows` rows (sync mode)."""
        return await work_through(self.step, rows)

    async def run(self) -> None:
        """Score rows as they become ready until the stream ends (async mode)."""
        await serve(
            self.store, self.fields, self.batch_rows, REWARD, idle(self.stats, self.process), writes=WRITES,
            timeout_s=self.get_timeout_s, **self._read,
        )  # fmt: skip

    async def start(self) -> None:
        """Start the reward processes, if any (a reward that cannot load fails here)."""
        if self.processes is not None:
            await self.processes.start()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.processes is not None:
            self.processes.close()
