"""Elastic pools: the rollout and reward pools resized between trainer steps.

`decide` is the rule, a pure function: a pool grows by one while the trainer waits for its
batch and rows queue up in front of that pool (they are ready for it and it has not taken
them), and shrinks by one while it would still sit idle with one worker fewer; it stays
within its autoscale bounds.
`Autoscaler` feeds it what happened since its last decision (the trainer's waits, the
pools' busy and idle seconds, the store's queues) every `autoscale.every_steps` steps and
applies the sizes through the pipeline's scaling methods, the path the steering verbs
(scale_rollout, scale_reward) take. `resize` adds or removes workers of a pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import ray

from asyncflow.config import AsyncFlowConfig
from asyncflow.config.pools import AutoscaleConfig
from asyncflow.errors import AsyncFlowError, ControlError
from asyncflow.workflow.runtime import cancel_all, free_cpus

log = logging.getLogger("asyncflow")


def decide(
    size: int, bounds: AutoscaleConfig, *, idle_frac: float, queue_rows: int, trainer_wait_frac: float,
    batch_rows: int,
) -> int:  # fmt: skip
    """The pool's next size. `idle_frac`: of its workers' time since the last decision; `queue_rows`:
    rows ready for it now; `trainer_wait_frac`: of the trainer's time spent waiting for its batch;
    `batch_rows`: one trainer batch (half of it is a long queue when grow_queue_rows is 0: with
    admission bounding the rows in flight, a queue seldom holds a whole batch)."""
    long_queue = queue_rows >= (bounds.grow_queue_rows or max(batch_rows // 2, 1))
    # idle with one worker fewer, the same work spread over them: shrinking never makes it a bottleneck
    idle_after = 1 - (1 - idle_frac) * size / (size - 1) if size > 1 else 0.0
    if trainer_wait_frac >= bounds.trainer_wait_frac and long_queue and idle_frac < bounds.shrink_idle_frac:
        size += 1
    elif idle_after >= bounds.shrink_idle_frac:
        size -= 1
    return min(max(size, bounds.min), bounds.max)


class Autoscaler:
    """Decides and applies the pools' sizes between steps, for the pools that have autoscale bounds."""

    def __init__(self, config: AsyncFlowConfig, scale: Mapping[str, Callable[[int], Any]], loops: dict):
        """`scale`: role -> the pipeline's coroutine function that resizes that pool; `loops`: the
        pipeline's background tasks, where a resize runs (so that stopping the streams stops it)."""
        self.loops = loops
        bounds = {"rollout": config.rollout.autoscale, "reward": config.reward.autoscale}
        self.bounds = {role: b for role, b in bounds.items() if b is not None}
        self.scale = scale
        self.batch_rows = config.trainer.batch_prompts * config.rollout.n
        self.every = min((b.every_steps for b in self.bounds.values()), default=1)
        self._window()
        self.seen: dict[str, tuple[float, float]] = {}  # role -> (busy_s, idle_s) at the last decision
        self.resizing: dict[str, asyncio.Task] = {}  # role -> its resize in flight

    def _window(self) -> None:
        self.steps, self.wait_s, self.since = 0, 0.0, time.monotonic()

    async def after_step(self, metrics: dict, workers: dict | None) -> dict[str, int]:
        """Count the step; every `every_steps` steps (with fresh worker stats) decide the pools' sizes
        and start resizing those that change (in the background). Returns them, with their new size."""
        if not self.bounds:
            return {}
        self.steps += 1
        self.wait_s += metrics.get("wait_s", 0.0)
        if self.steps < self.every or workers is None:
            return {}
        trainer_wait = self.wait_s / max(time.monotonic() - self.since, 1e-9)
        changed = {}
        for role, bounds in self.bounds.items():
            stats = workers.get(role)
            if stats is None:
                continue
            size = decide(
                stats["workers"], bounds, idle_frac=self._idle_frac(role, stats),
                trainer_wait_frac=trainer_wait, queue_rows=workers["queues"].get(role, 0),
                batch_rows=self.batch_rows,
            )  # fmt: skip
            resizing = self.resizing.get(role)
            if size != stats["workers"] and (resizing is None or resizing.done()):
                # in the background: new workers take seconds to start, the trainer need not wait
                task = self.resizing[role] = asyncio.ensure_future(self._resize(role, size))
                self.loops[f"{role} resize"] = task  # a driver loop: named by a string
                task.add_done_callback(self._done)
                changed[role] = size
        self._window()
        return changed

    def _done(self, task: asyncio.Task) -> None:
        """A resize that ended leaves the pipeline's tasks (one that failed stays: the run reports it)."""
        for key, running in list(self.loops.items()):
            if running is task and (task.cancelled() or task.exception() is None):
                del self.loops[key]

    async def _resize(self, role: str, size: int) -> None:
        try:
            await self.scale[role](size)
        except AsyncFlowError as e:  # no room for one more: the pool keeps its size, the run goes on
            log.warning("autoscale: %s pool not resized to %d: %s", role, size, e)

    def _idle_frac(self, role: str, stats: dict) -> float:
        """The pool's idle fraction since the last decision (over the whole run when a worker left)."""
        busy, idle = stats["busy_s"], stats["idle_s"]
        last_busy, last_idle = self.seen.get(role, (0.0, 0.0))
        self.seen[role] = (busy, idle)
        d_busy, d_idle = busy - last_busy, idle - last_idle
        if d_busy < 0 or d_idle < 0 or d_busy + d_idle <= 0:
            return stats["idle_frac"]
        return d_idle / (d_busy + d_idle)


async def resize(
    actors: list, n: int, make: Callable[[], Any], what: str, *, loops: dict,
    supervise: Callable[[Any], Any] | None, start_timeout_s: float = 120.0,
) -> int:  # fmt: skip
    """Add workers made by `make` (started, then looped by `supervise` in async mode) or remove the
    newest ones (their loop cancelled, closed, killed: rows they held return to the store when their
    lease expires) until `actors` holds `n`; returns the pool's size."""
    while len(actors) < n:
        actor = make()
        try:
            await asyncio.wait_for(actor.start.remote(), start_timeout_s)
        except TimeoutError:
            ray.kill(actor)
            raise ControlError(
                f"a new {what} did not start within {start_timeout_s:.0f} s: the cluster has no room for it "
                f"({free_cpus()}); add nodes, or lower its num_cpus"
            ) from None
        except BaseException:  # cancelled (the run stops) or failed: it never joins the pool
            ray.kill(actor)
            raise
        actors.append(actor)
        if supervise is not None:
            loops[actor] = asyncio.ensure_future(supervise(actor))
    while len(actors) > n:
        actor = actors.pop()
        task = loops.pop(actor, None)
        if task is not None:
            await cancel_all([task])
        await asyncio.wait([asyncio.ensure_future(actor.close.remote())], timeout=30)
        ray.kill(actor)
    return len(actors)
