"""Health probes of the rollout engines: a worker whose engine stops answering is replaced.

A worker can be alive to Ray and useless to the run: its engine hangs in a kernel, a lock or
a stopped process, and its loop holds leased rows forever. Every `rollout.health.every_s`
(async mode) each rollout worker is asked for a tiny generation (one prompt, one sample,
beside any call in flight). One that does not answer within its deadline, the larger of
`health.timeout_s` and `health.slowdown` x the longest engine call it reported, is killed
and restarted by Ray (rollout.max_restarts): the pipeline's supervision calls run() on the
new actor, and the rows the old one held return to the store when their lease expires, for
another worker to generate. The probes know nothing of what the workers generate.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from asyncflow.config.pools import HealthConfig

log = logging.getLogger("asyncflow")


def deadline_s(config: HealthConfig, longest_call_s: float) -> float:
    """How long a probe may take: never under timeout_s, and room for a call in flight."""
    return max(config.timeout_s, config.slowdown * longest_call_s)


class Health:
    """Probes the rollout workers of `pipe` (asyncflow.workflow.Pipeline) until cancelled. A worker
    whose engine has not answered a probe yet (starting, or restarted) gets `start_timeout_s`."""

    def __init__(self, pipe: Any, config: HealthConfig, start_timeout_s: float):
        self.pipe, self.config, self.start_timeout_s = pipe, config, start_timeout_s
        self.longest: dict[Any, float] = {}  # actor -> the longest engine call of its working engine
        self.replaced = 0  # workers killed for not answering

    async def run(self) -> None:
        """Probe every worker every `every_s`; a worker still answering a probe is not asked again,
        so one slow worker holds up no other's probe."""
        probes: dict[Any, asyncio.Task] = {}
        try:
            while True:
                await asyncio.sleep(self.config.every_s)
                for actor, task in list(probes.items()):
                    if task.done():
                        del probes[actor]
                        task.result()  # a bug in the probing itself stops the run
                for actor in self.pipe.rollouts:
                    if actor not in probes:
                        probes[actor] = asyncio.ensure_future(self.probe(actor))
        finally:
            for task in probes.values():
                task.cancel()

    async def probe(self, actor: Any) -> bool:
        """Probe one worker; False if it did not answer in time (it is then killed for a restart)."""
        known = actor in self.longest
        deadline = deadline_s(self.config, self.longest[actor]) if known else self.start_timeout_s
        call = asyncio.ensure_future(_answer(actor.probe.remote()))
        done, _ = await asyncio.wait([call], timeout=deadline)
        if done:
            reply = call.result()
            if reply:
                self.longest[actor] = reply["longest_call_s"]
            else:  # still building its engine, or restarting: not a working engine yet
                self.longest.pop(actor, None)
            return True
        call.cancel()
        if actor not in self.pipe.rollouts:  # scaled down meanwhile
            return True
        self.replaced += 1
        name = self.pipe.role_of(actor._actor_id.hex())
        log.warning("%s did not answer a health probe within %.0f s: restarting it", name, deadline)
        self.longest.pop(actor, None)  # the new engine has start_timeout_s to answer
        ray.kill(actor, no_restart=False)
        return False


async def _answer(ref: Any) -> dict:
    """A probe's reply; {} when the actor is dead or restarting (supervision deals with that)."""
    try:
        return await ref
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
        return {}
    except ray.exceptions.RayTaskError as e:  # it answered, with an error: its own loop will report it
        log.warning("a health probe failed: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return {}
