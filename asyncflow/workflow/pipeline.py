"""The Pipeline: one run's actors and its samples partition, and everything done to them.

It starts the store, the weight store and one actor per worker (typed hosts,
asyncflow.workflow.hosts), and owns them until shutdown: a fresh start (partition,
warm-start, version 0) or a resume from a checkpoint, the supervision of the streaming
loops (a dead rollout or reward actor is restarted by Ray and its loop called again),
scaling the rollout pool, pause / resume, the staleness bound, consistent checkpoints and
a clean shutdown. The recipe (asyncflow.recipes) drives its steps; steering
(asyncflow.control) calls its methods. Components never reference the pipeline: it wires
them. A Ray failure leaves it as an AsyncFlowError that names the worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

import ray

from asyncflow.config import AsyncFlowConfig
from asyncflow.errors import AsyncFlowError, ConfigError, RankDied, WorkerError
from asyncflow.rundir import RunDir
from asyncflow.workflow.checks import check
from asyncflow.workflow.dynamic import drop_dropped, ensure_dropped, refills, reset_dropped
from asyncflow.workflow.elastic import Autoscaler, resize
from asyncflow.workflow.health import Health
from asyncflow.workflow.hosts import (
    NAMESPACE,
    ReferenceHost,
    RewardHost,
    RolloutHost,
    SourceHost,
    TrainerHost,
)
from asyncflow.workflow.runtime import (
    cancel_all,
    group_found_no_room,
    in_bundle,
    names_free,
    no_room,
    not_started,
    placed,
    placement_group,
)
from asyncflow.workflow.traces import Traces
from asyncflow.workflow.watchdog import Watchdog

log = logging.getLogger("asyncflow")
RESTARTS = 2  # a reward or reference worker that dies is restarted this many times (and the watchdog's)


class Pipeline:
    """The running actors of one run, by role, and their partition in the store."""

    def __init__(self, config: AsyncFlowConfig, run: RunDir, *, cursor: int = 0, freed: int = 0):
        """Start the store, the weight store and the worker actors (Ray must be up); `cursor` is the
        next prompt to admit, `freed` the admission slots dropped groups freed (dynamic sampling).
        The reference worker starts later, once the weights it keeps exist."""
        from dataplane.store import start_store
        from workers.weights import WeightStore

        # a bad task, data set or checkpoint fails here, before any actor starts
        self.prompt_filter = check(config)  # a data set: its limit, and the prompts it dropped
        self.config, self.run = config, run
        self.store = start_store(config.dataplane)
        self.weights = (
            ray.remote(WeightStore)
            .options(name=f"{config.dataplane.name}.weights", namespace=NAMESPACE, num_cpus=0.1)
            .remote(config.weights.keep_versions)
        )
        r = config.rollout
        self.source = self._spawn(SourceHost, "source", ask={"num_cpus": 0.1}, cursor=cursor, freed=freed)
        self.group = placement_group(config)  # trainer ranks, and rollout workers colocated with them
        self.trainers = [self._rank(i) for i in range(config.trainer.num_ranks)]
        self.trainer = self.trainers[0]  # rank 0: its step's metrics are the run's
        self.rollouts = [self._rollout(i) for i in range(r.num_workers)]
        self.next_reward = 0  # fresh actor names for added workers
        self.rewards = [self._reward() for _ in range(config.reward.num_workers)]
        self.references: list[Any] = []
        self.loops: dict[Any, asyncio.Future] = {}  # async mode: actor -> the task supervising it
        self.next_rollout = r.num_workers  # fresh actor names for added workers
        self.paused = False
        self.round_version = 0  # sync mode: the trainer version of the round being generated
        self.health = Health(self, r.health, config.start_timeout_s)  # probes of the engines (async mode)
        scale = {"rollout": self.scale_rollout, "reward": self.scale_reward}
        self.autoscaler = Autoscaler(config, scale, self.loops)  # rollout/reward.autoscale
        self.client: Any = None  # the driver's store client (dataplane.client.StoreClient)
        self.watchdog = Watchdog(self)  # stalls: diagnosed, then restarted or stopped
        self.traces = Traces(config.trace, run)  # every actor's spans: trace.json

    def _spawn(
        self, host: type, role: str, slot: int = 0, *, ask: dict, restarts: int = 0,
        options: dict | None = None, **kw: Any,
    ):  # fmt: skip
        """A host actor named `<store>.<role><slot>`, given the resources in `ask` (Ray's options:
        num_cpus, num_gpus, memory, resources); Ray restarts it `restarts` (+ the watchdog's) times."""
        return (
            ray.remote(host)
            .options(
                name=f"{self.config.dataplane.name}.{role}{slot}",
                namespace=NAMESPACE,
                **ask,
                max_restarts=restarts + (self.config.watchdog.max_restarts if restarts else 0),
                max_concurrency=64,
                **(options or {}),
            )  # fmt: skip
            .remote(self.config.model_dump(mode="json"), self.store.address, **kw)
        )

    def _rank(self, rank: int) -> Any:
        options = in_bundle(self.group, rank) if self.group is not None else None
        return self._spawn(
            TrainerHost, "trainer", rank, ask=self.config.trainer.ray_options(), options=options, index=rank
        )

    async def _ranks(self, call: Any, grace_s: float = 10.0) -> Any:
        """`call(rank)` on every trainer rank, together (their steps meet in collectives); rank 0's
        result. One rank failing stops the others inside a collective (or leaves them waiting in
        one): all are killed, and a dead one is reported as RankDied, which the run recovers from."""
        calls = [asyncio.ensure_future(call(t)) for t in self.trainers]
        for c in calls:
            c.add_done_callback(_retrieved)
        limit_s = self.config.watchdog.call_timeout_s
        _, pending = await asyncio.wait(calls, timeout=limit_s, return_when=asyncio.FIRST_EXCEPTION)
        failed = [c for c in calls if c.done() and c.exception() is not None]
        if pending and failed:  # a rank failed: see whether it died (the others fail with it, or hang)
            await asyncio.wait(pending, timeout=grace_s)
            failed = [c for c in calls if c.done() and c.exception() is not None]
        if not failed and not pending:
            return calls[0].result()
        for c in calls:
            c.cancel()
        dead = [c.exception() for c in failed if isinstance(c.exception(), ray.exceptions.RayActorError)]
        if len(self.trainers) > 1 or dead or not failed:
            for t in self.trainers:
                ray.kill(t)
        if not failed:  # stuck: no call can wait forever
            raise RankDied(f"the trainer did not answer within watchdog.call_timeout_s = {limit_s:g} s")
        if dead:
            why = self.watchdog.stalled or f"{self.role_of(dead[0].actor_id)} died"  # type: ignore[union-attr]
            raise RankDied(why) from None
        return await self._ask(failed[0])  # raises its error, as every other call's

    def _rollout(self, index: int) -> Any:
        r = self.config.rollout
        paired = self.config.placement == "colocated" and index < r.num_workers  # not one added later
        return self._spawn(
            RolloutHost, "rollout", index, ask=r.ray_options(), restarts=r.max_restarts,
            options=in_bundle(self.group, index) if paired else None, index=index,
        )  # fmt: skip

    @property
    def streamers(self) -> list[Any]:
        """Workers that run a loop of their own in async mode."""
        return [*self.rollouts, *self.rewards, *self.references]

    async def ready(self) -> None:
        """Wait until every worker actor is built and connected (they start in parallel) and the
        trainer ranks have joined their group; or fail after start_timeout_s, naming the laggards."""
        timeout_s = self.config.start_timeout_s
        if self.group is not None:
            done, _ = await asyncio.wait([asyncio.ensure_future(self.group.ready())], timeout=timeout_s)
            if not done:
                for actor in [*self.trainers, *self.rollouts]:  # so that the shutdown does not wait for
                    if not placed(actor):  # the close() of actors waiting for the group
                        ray.kill(actor)
                raise ConfigError(group_found_no_room(self.config, timeout_s))
        actors = [self.source, *self.trainers, *self.streamers]
        starts = {asyncio.ensure_future(self._ask(a.start.remote())): a for a in actors}
        done, pending = await asyncio.wait(starts, timeout=timeout_s, return_when=asyncio.FIRST_EXCEPTION)
        for task in pending:
            task.cancel()
        for task in done:
            task.result()  # one that failed to start raises its own error
        if pending:
            late = {self.role_of(starts[t]._actor_id.hex()): starts[t] for t in pending}
            waiting = [role for role, actor in late.items() if not placed(actor)]
            # a waiting actor whose ask some node has free is only slow to start (its worker process)
            unplaced = [role for role in waiting if no_room(self.config, role)]
            for role in waiting:  # so that the shutdown does not wait for their close()
                ray.kill(late[role])
            starting = [role for role in late if role not in unplaced]
            raise ConfigError(not_started(self.config, unplaced, starting, timeout_s))
        if len(self.trainers) > 1:
            address = await self._ask(self.trainer.address.remote())
            await self._ask(*(t.join.remote(address) for t in self.trainers))
        if self.client is None:
            self.client = await self.store.async_client()

    # ------------------------------------------------------------------ fresh start, resume

    async def fresh(self) -> dict:
        """A new run: the samples partition, the warm-start, the reference's weights, version 0."""
        from workers.samples import PARTITION, consumers, schema

        name = self.config.dataplane.name
        if PARTITION in (await self.client.store_stats())["partitions"]:  # a durable store outlives runs
            if not self.run.owns_partition(name):
                raise ConfigError(
                    f"store {name!r} already holds a {PARTITION!r} partition (another run uses it, or one "
                    "ended without cleaning up); set dataplane.name to a name of its own, or continue that "
                    "run with --resume"
                )
            # a dead attempt of this run (its run directory) left it, before any checkpoint: start clean
            log.warning("store %r: dropping the partition a dead attempt of this run left", name)
            await self.client.drop_partition(PARTITION)
        self.run.claim_partition(name)
        await self.client.create_partition(
            PARTITION, schema(self.config.policy), consumers=consumers(self.config.reference.enabled),
            stale_policy="regenerate",
        )  # fmt: skip
        await reset_dropped(self.client, self.config.trainer.dynamic_sampling)
        warm = await self._ranks(lambda t: t.warmup.remote())
        if self.config.reference.enabled:
            await self._ranks(lambda t: t.save_weights.remote(str(self.run.reference_weights)))
        await self._ranks(lambda t: t.publish.remote())
        await self._start_reference()
        return warm

    async def resume(self, path: Path) -> int:
        """Continue from the checkpoint at `path`; returns the trainer's version. The checkpoint is
        the consistent cut (model, cursor and rows together): whatever a durable store still holds
        from after it is replaced by it."""
        from workers.samples import PARTITION

        if PARTITION in (await self.client.store_stats())["partitions"]:
            await self.client.drop_partition(PARTITION)
        await drop_dropped(self.client)
        await self.client.restore(str(path / "store"))
        await ensure_dropped(self.client, self.config.trainer.dynamic_sampling)
        version = await self._ranks(lambda t: t.load.remote(str(path / "trainer")))
        await self._ranks(lambda t: t.publish.remote())
        await self._start_reference()
        return version

    async def _start_reference(self) -> None:
        if self.config.reference.enabled and not self.references:
            self.references = [
                self._spawn(
                    ReferenceHost,
                    "reference",
                    ask=self.config.reference.ray_options(),
                    weights_path=str(self.run.reference_weights),
                    restarts=RESTARTS,
                )  # fmt: skip
            ]
            await self._ask(self.references[0].start.remote())

    # ------------------------------------------------------------------ the loops' steps

    async def start_streams(self) -> None:
        """Async mode: every streaming worker and the source run their loop, supervised."""
        for actor in [*self.streamers, self.source]:
            restarts = self.config.rollout.max_restarts if actor in self.rollouts else RESTARTS
            restarts = 0 if actor is self.source else restarts
            self.loops[actor] = asyncio.ensure_future(self._supervise(actor, restarts))
        if self.config.rollout.health.every_s:  # engines that stop answering are restarted
            self.loops["health"] = asyncio.ensure_future(self.health.run())
        if self.config.watchdog.enabled:
            self.loops[self.watchdog] = asyncio.ensure_future(self.watchdog.run())

    async def stop_streams(self) -> None:
        # Stop admitting first: a source cancelled inside a put would leave rows in the store
        # beyond its cursor, and a later resume would admit those prompts again.
        probe_s = self.config.watchdog.probe_timeout_s
        await asyncio.gather(asyncio.wait_for(self.source.pause.remote(), probe_s), return_exceptions=True)
        await cancel_all(self.loops.values())
        self.loops.clear()

    async def train_step(self) -> dict:
        """One trainer step; fails at once if a supervised loop failed meanwhile."""
        self.watchdog.step_began()
        step = asyncio.ensure_future(self._ranks(lambda t: t.step.remote()))
        step.add_done_callback(_retrieved)  # a run stopped mid-step (SIGTERM) leaves it behind
        extra = refills(self, step)  # sync mode, dynamic sampling: dropped groups replaced meanwhile
        waits = [step, *self.loops.values(), *extra]
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        try:
            for task in done:
                if task is not step and task.exception() is not None:
                    if step.done():
                        step.exception()  # retrieved: the loop's failure is the one reported
                    step.cancel()
                    raise task.exception()  # type: ignore[misc]
            metrics = await step
            await asyncio.gather(*extra)  # a refill ends with its step
        except AsyncFlowError as e:  # diagnosed (stalls/) before the run stops or restarts
            await self.watchdog.failed(e)
            raise
        finally:
            for task in extra:
                task.cancel()
        self.watchdog.step_ended()
        metrics.update(self.traces.step(self.tracked))  # spans to trace.json, in the background
        return metrics

    @property
    def tracked(self) -> list[Any]:
        """The actors whose spans go to trace.json."""
        return [self.source, *self.trainers, *self.streamers]

    async def sync_round(self, step: int) -> None:
        """Sync mode, before step `step`'s training: admit a batch, generate it, score it."""
        self.round_version = step - 1
        await self.generate(self.config.trainer.batch_prompts, step - 1)

    async def generate(self, groups: int, version: int) -> None:
        """Sync mode: admit `groups` prompts (at trainer version `version`), generate them, score them."""
        n = self.config.rollout.n
        await self._ask(self.source.admit.remote(groups, version))
        await self._ask(*(r.work.remote(g) for r, g in zip(self.rollouts, split(groups, len(self.rollouts)))))
        await self._ask(
            *(w.work.remote(g * n) for w, g in zip(self.rewards, split(groups, len(self.rewards))))
        )
        await self._ask(*(r.work.remote(groups * n) for r in self.references))

    async def sync_weights(self, version: int) -> None:
        """Sync mode, after a step: every rollout worker loads `version`."""
        await self._ask(*(r.sync_weights.remote(version) for r in self.rollouts))

    async def evaluate(self, count: int, min_version: int) -> float:
        return await self._ask(self.rollouts[0].evaluate.remote(count, min_version))

    async def _supervise(self, actor: Any, restarts: int) -> None:
        """Keep `actor.run()` going; Ray restarts a dead actor, this calls run() on the new one."""
        failures, key = 0, actor._actor_id.hex()
        while True:
            ref = actor.run.remote()
            try:
                await ref
                return
            except asyncio.CancelledError:
                ray.cancel(ref)
                raise
            except ray.exceptions.ActorUnavailableError:
                await asyncio.sleep(0.5)  # Ray is restarting it: ask again shortly
            except ray.exceptions.RayActorError as e:
                failures += 1
                if failures > restarts + self.watchdog.healed.get(key, 0):  # its restarts, and the watchdog's
                    raise WorkerError(
                        f"{self.role_of(e.actor_id)} died {failures} times (limit {restarts}): {e}"
                    ) from None
            except ray.exceptions.RayTaskError as e:
                raise _unwrapped(e) from None

    # ------------------------------------------------------------------ steering

    async def pause(self) -> int:
        """Admit no more prompts (rollout finishes what it has); returns the prompt cursor."""
        self.paused = True
        return await self._ask(self.source.pause.remote())

    async def resume_admission(self) -> None:
        self.paused = False
        await self._ask(self.source.resume.remote())

    async def set_staleness(self, k: int) -> None:
        """The new bound holds for every later step: admission and the trainer's window."""
        await self._ask(
            self.source.set_staleness.remote(k), *(t.set_staleness.remote(k) for t in self.trainers)
        )

    async def scale_rollout(self, n: int) -> int:
        """Add or remove rollout workers. A removed worker is closed and killed; rows it held go
        back to the store and another worker generates them."""
        r = self.config.rollout
        loop = (lambda actor: self._supervise(actor, r.max_restarts)) if self.config.mode == "async" else None
        return await resize(
            self.rollouts, n, self._next_rollout, "rollout worker", loops=self.loops, supervise=loop
        )

    def _next_rollout(self) -> Any:
        self.next_rollout += 1
        return self._rollout(self.next_rollout - 1)

    async def scale_reward(self, n: int) -> int:
        """Add or remove reward workers (a removed one's leased rows go back to the store)."""
        loop = (lambda actor: self._supervise(actor, RESTARTS)) if self.config.mode == "async" else None
        return await resize(self.rewards, n, self._reward, "reward worker", loops=self.loops, supervise=loop)

    def _reward(self) -> Any:
        self.next_reward += 1
        r = self.config.reward
        return self._spawn(RewardHost, "reward", self.next_reward - 1, ask=r.ray_options(), restarts=RESTARTS)

    async def checkpoint(self, step: int) -> Path:
        """Model, optimizer, version, every row in the store and the prompt cursor, consistently: the
        source is paused (no put in flight) and the trainer is between steps. Written whole or not
        at all (RunDir)."""
        cursor = await self._ask(self.source.pause.remote())
        freed = await self._ask(self.source.freed_slots.remote())  # dynamic sampling's, with the cursor
        try:
            tmp = self.run.begin_checkpoint(step)
            await self.client.checkpoint(str(tmp / "store"))
            await self._ranks(lambda t: t.save.remote(str(tmp / "trainer")))
        finally:
            if not self.paused:  # a run a client paused stays paused
                await self._ask(self.source.resume.remote())
        return self.run.commit_checkpoint(tmp, step, {"step": step, "cursor": cursor, "freed": freed})

    # ------------------------------------------------------------------ reports, the end

    async def worker_stats(self) -> dict:
        """Per role and of the store: asyncflow.workflow.stats.worker_stats."""
        from asyncflow.workflow.stats import worker_stats

        return await worker_stats(self)

    async def finish(self) -> dict:
        """The run ended: what is left untrained, then drop the partition (its rows live on in the
        final checkpoint) and close the driver's client."""
        from workers.samples import PARTITION, TRAINER

        stats = (await self.client.store_stats())["partitions"][PARTITION]["consumers"][TRAINER]
        admitted = await self._ask(self.source.pause.remote())
        await self.client.drop_partition(PARTITION)
        await drop_dropped(self.client)
        await self.traces.close(self.tracked)  # the last spans (evaluation, final checkpoint)
        return {"admitted_prompts": admitted, "untrained_rows": stats["pending"] + stats["leased"]}

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Close every worker (engines, connections), then kill the actors and stop the store."""
        await self.stop_streams()
        if self.client is not None:
            await self.client.close()
        workers = [self.source, *self.trainers, *self.streamers]
        closing = [asyncio.ensure_future(a.close.remote()) for a in workers]
        await asyncio.wait(closing, timeout=grace_s)  # a dead or hung worker is killed anyway
        for task in closing:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.warning("a worker did not close cleanly: %s", task.exception())
            task.cancel()
        for actor in [*workers, self.weights]:
            ray.kill(actor)
        if self.group is not None:
            ray.util.remove_placement_group(self.group)
        self.store.shutdown()
        await names_free(f"{self.config.dataplane.name}.")

    # ------------------------------------------------------------------ Ray's errors, ours

    async def _ask(self, *calls: Awaitable[Any]) -> Any:
        """Await actor calls (one: its result; several: their results); a dead actor or a worker's
        exception becomes an AsyncFlowError that names it, without Ray's stack."""
        limit_s = self.config.watchdog.call_timeout_s
        try:
            results = await asyncio.wait_for(asyncio.gather(*calls), limit_s)
        except TimeoutError:
            why = (
                f"within watchdog.call_timeout_s = {limit_s:g} s: stuck? (py-spy dump --pid PID); or raise it"
            )
            raise WorkerError(f"a worker did not answer {why}") from None
        except ray.exceptions.RayActorError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WorkerError(f"{self.role_of(e.actor_id)} died ({reason})") from None
        except ray.exceptions.RayTaskError as e:
            raise _unwrapped(e) from None
        return results[0] if len(calls) == 1 else results

    def role_of(self, actor_id: str | None) -> str:
        """Which worker an actor id is ("the trainer", "rollout worker 1", ...), for messages."""
        named: dict[str, Sequence[Any]] = {
            "the prompt source": [self.source], "trainer rank": self.trainers,
            "the weight store": [self.weights], "rollout worker": self.rollouts,
            "reward worker": self.rewards, "the reference worker": self.references,
        }  # fmt: skip
        for role, actors in named.items():
            for i, actor in enumerate(actors):
                if actor._actor_id.hex() == actor_id:
                    if role == "trainer rank" and len(self.trainers) == 1:
                        return "the trainer"
                    return f"{role} {i}" if role.startswith(("rollout", "reward", "trainer")) else role
        return "a worker"


def _retrieved(task: asyncio.Future) -> None:
    """Mark a task's error as seen: one the run left behind when it stopped (its awaiter gone)
    is not logged as "Task exception was never retrieved" with a traceback. An awaiter still
    gets the error as usual."""
    if not task.cancelled():
        task.exception()


def _unwrapped(e: Any) -> Exception:
    """A worker's own AsyncFlowError out of Ray's task error; other errors (bugs) keep Ray's stack."""
    return e.cause if isinstance(e.cause, AsyncFlowError) else e


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]
