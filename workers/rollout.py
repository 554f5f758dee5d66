"""RolloutWorker: takes prompt groups from the store, samples `n` responses per prompt with
its engine, writes them back with behaviour log-probs and the version of every token (or
denoising step, for a flow policy: the kind, workers.kinds, says what prompts and responses
are and how they become engine requests and store fields).

Weights are pulled at a safe point, between engine calls (deferred update): the worker
never waits for the trainer unless a prompt was admitted at a version newer than the
weights it holds, and the trainer never waits for it. With partial rollout on, a version
published while a call is generating is also loaded at once: the engine swaps the weights
under the samples in flight (and keeps them, or regenerates them, as it was built to), so
long responses do not hold old weights for the whole call. With an environment (`episodes`,
workers.episodes) each sample is a multi-turn episode: its turns go to the engine batched with
the other episodes' turns, and what it writes is the whole trajectory with its loss mask. The
worker knows nothing about rewards or training; the engine knows nothing about the store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from asyncflow.errors import WeightMismatch
from asyncflow.tracing import tracer
from workers.episodes import Batcher
from workers.reward import parts_of, takes_info, with_episode, with_info
from workers.samples import ROLLOUT, fill, idle, serve, take

if TYPE_CHECKING:  # the seams' protocols and classes, for the type checker
    from asyncflow.tasks import Example
    from dataplane.client import StoreClient
    from services.serving.protocol import Engine
    from workers.episodes import Episodes
    from workers.kinds import Kind
    from workers.weights import WeightClient

log = logging.getLogger("asyncflow.rollout")


class RolloutWorker:
    def __init__(
        self,
        engine: Engine,
        store: StoreClient,
        weights: WeightClient,
        *,
        n: int,
        groups_per_call: int,
        params: Any,
        kind: Kind,
        name: str = "rollout",
        get_timeout_s: float | None = None,
        partial_rollout: bool = False,
        episodes: Episodes | None = None,
        examples: Callable[[int], Example] | None = None,
    ):
        """`episodes`: multi-turn episodes with an environment, on the task example that
        `examples(prompt_index)` returns (both or neither)."""
        if (episodes is None) != (examples is None):
            raise ValueError("RolloutWorker: episodes need examples (the task's example(index)), and back")
        self.engine, self.store, self.weights = engine, store, weights
        self.episodes, self.examples = episodes, examples
        self._sync = asyncio.Lock()  # concurrent episodes' engine calls may all reach a safe point
        self.partial_rollout = partial_rollout
        self.n, self.groups_per_call, self.params, self.name = n, groups_per_call, params, name
        self.kind = kind  # workers.kinds: what prompts and responses are
        self.get_timeout_s = get_timeout_s
        self.stats = {
            "samples": 0,
            "tokens": 0,
            "busy_s": 0.0,
            "idle_s": 0.0,
            "weight_syncs": 0,
            "sync_s": 0.0,
            "mid_call_syncs": 0,  # versions loaded while a call was generating (partial rollout)
            "rejected_versions": 0,  # versions whose received bytes differed from the published ones
            "longest_call_s": 0.0,  # the longest engine call: what a health probe's deadline allows for
        }
        self.stats["optimal_tokens_per_s"] = float(
            getattr(engine, "stats", {}).get("optimal_tokens_per_s", 0)
        )
        self.rejected = -1  # the newest version refused; it is not pulled again
        if episodes is not None:  # episodes run, their model turns, and those a limit or an error ended
            self.stats.update(episodes=0, episode_turns=0, episodes_cut=0)

    @property
    def seen(self) -> int:
        """The newest version this worker has loaded or refused."""
        return max(self.engine.version, self.rejected)

    async def sync_weights(self, min_version: int = 0) -> int:
        """Load the newest published version (waiting for one >= min_version); returns the version
        the engine holds. A version whose bytes arrive changed (WeightMismatch) is refused: the
        engine keeps its weights, the refusal is counted and logged, and the next version is tried."""
        start = time.perf_counter()
        with tracer.span("weights.wait", min_version=min_version, held=self.engine.version):
            latest = await self.weights.wait_version(min_version)
        async with self._sync:  # concurrent episodes reach safe points together: one pull
            await self._load(latest, min_version)
        self.stats["sync_s"] += time.perf_counter() - start
        return self.engine.version

    async def _load(self, latest: int, min_version: int) -> None:
        if latest > self.seen:
            try:
                # an engine that never loaded a version takes every tensor, the others only what changed
                with tracer.span("weights.pull", held=self.engine.version) as span:
                    version, tensors = await self.weights.pull(min_version, whole=self.engine.version < 0)
                    span.update(version=version, bytes=sum(t.nbytes for t in tensors.values()))
            except WeightMismatch as e:
                self.rejected = latest
                self.stats["rejected_versions"] += 1
                log.warning("%s refused weights; it keeps version %d: %s", self.name, self.engine.version, e)
            else:
                with tracer.span("weights.switch", version=version, held=self.engine.version):
                    await self.engine.update_weights(version, tensors)
                self.stats["weight_syncs"] += 1

    async def step(self, max_groups: int | None = None) -> int:
        """One engine call on up to `max_groups` ready prompt groups (sync mode). Returns samples
        written (0 when the stream has ended)."""
        start = time.perf_counter()
        size = (max_groups or self.groups_per_call) * self.n
        batch = await take(
            self.store, self.kind.prompt_fields, size, ROLLOUT, unit=self.n, sampler="group",
            writes=self.kind.rollout_fields, timeout_s=self.get_timeout_s,
        )  # fmt: skip
        self.stats["idle_s"] += time.perf_counter() - start
        if not len(batch):
            return 0
        await self.process(batch)
        await self.store.ack(batch)
        return len(batch)

    async def process(self, batch: Any) -> None:
        """One engine call: generate `n` samples for each prompt group of `batch` and write them with
        their behaviour log-probs and versions (the caller acks the batch)."""
        start = time.perf_counter()
        # The safe point: weights at least as new as the version each prompt was admitted at.
        await self.sync_weights(max(int(v) for v in batch["admit_version"]))
        heads = range(0, len(batch), self.n)  # rows of a group are adjacent, in sample order
        prompts = batch[self.kind.prompt_field]
        requests = [
            self.kind.request(f"{batch['prompt_index'][i]}", prompts[i], self.n, self.params) for i in heads
        ]
        called = time.perf_counter()
        order = {(int(batch["prompt_index"][i]), int(batch["sample_index"][i])): i for i in range(len(batch))}
        with tracer.span(
            "generate", row_ids=batch.rows, groups=len(requests), version=self.engine.version
        ) as span:
            tokens = await self._generate_into(batch, order, requests)
            span.update(tokens=tokens, version_end=self.engine.version)
        self.stats["longest_call_s"] = max(self.stats["longest_call_s"], time.perf_counter() - called)
        self.stats["busy_s"] += time.perf_counter() - start

    async def _generate_into(self, batch: Any, order: dict[tuple[int, int], int], requests: list) -> int:
        """Generate for `requests` and write each group's rows as soon as the group is complete
        (the groups that finish together in one put), so reward and the trainer start on the
        first groups while the slowest still generate; returns the tokens (or steps) written."""
        groups, follower = self._start(requests)
        pending, tokens = set(groups), 0
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                completions = [c for task in done for c in task.result()]
                positions = [order[(int(c.request_id), c.index)] for c in completions]
                rows = [c for _, c in sorted(zip(positions, completions), key=lambda pc: pc[0])]
                await fill(
                    self.store,
                    self.kind.results(rows),
                    batch.select(sorted(positions)),
                    version=min(min(c.versions, default=self.engine.version) for c in rows),
                )
                self.stats["samples"] += len(rows)
                tokens += sum(len(c.versions) for c in rows)  # tokens, or denoising steps
            if follower is not None:
                await follower
        finally:
            for task in (*groups, follower):
                if task is not None and not task.done():
                    task.cancel()
        self.stats["tokens"] += tokens
        return tokens

    def _start(self, requests: list) -> tuple[list[asyncio.Future], asyncio.Future | None]:
        """The call's groups as tasks that each return one group's completions, and the task
        that follows newer weights meanwhile (partial rollout) when the groups run separately.
        An engine that batches concurrent calls (`batches_calls`) gets one call per group (per
        episode turn with an environment), so each group returns when its own samples finish;
        any other engine gets one call (one per round of episode turns)."""
        if not getattr(self.engine, "batches_calls", False):
            if self.episodes is not None:
                return self._episodes(requests, Batcher(self._generate)), None
            return [asyncio.ensure_future(self._generate(requests))], None
        groups: list[asyncio.Future]
        if self.episodes is not None:
            groups = self._episodes(requests, self.engine.generate)
        else:
            groups = [asyncio.ensure_future(self.engine.generate([r])) for r in requests]
        if not self.partial_rollout:
            return groups, None
        return groups, asyncio.ensure_future(self._follow(asyncio.gather(*groups)))

    async def _generate(self, requests: Sequence[Any]) -> list:
        """engine.generate, loading each version published meanwhile when partial rollout is on."""
        call = asyncio.ensure_future(self.engine.generate(requests))
        try:
            await self._follow(call)
            return await call
        finally:
            if not call.done():
                call.cancel()

    async def _follow(self, call: asyncio.Future) -> None:
        """With partial rollout, load each version published while `call` runs."""
        newer: asyncio.Future | None = None
        try:
            while self.partial_rollout and not call.done():
                newer = asyncio.ensure_future(self.weights.wait_version(self.seen + 1))
                await asyncio.wait([call, newer], return_when=asyncio.FIRST_COMPLETED)
                if newer.done():
                    newer.result()  # a failed wait raises here
                    held = self.engine.version
                    if await self.sync_weights() != held:  # (not when the version was refused)
                        self.stats["mid_call_syncs"] += 1
        finally:  # a remote wait stays parked in the weight store until a publish
            if newer is not None and not newer.done():
                newer.cancel()

    def _episodes(self, requests: list, generate: Callable) -> list[asyncio.Future]:
        """One multi-turn episode per sample of each request, each turn sent by `generate`
        (workers.episodes): a task per request, returning its group's trajectories."""
        assert self.episodes is not None and self.examples is not None
        examples, episodes = self.examples, self.episodes

        async def group(request: Any) -> list:
            example = examples(int(request.request_id))
            done = await asyncio.gather(
                *(episodes.run(generate, request, i, example) for i in range(request.n))
            )
            self.stats["episodes"] += len(done)
            self.stats["episode_turns"] += sum(t.episode["turns"] for t in done)
            self.stats["episodes_cut"] += sum(t.episode["end"] != "done" for t in done)  # limits, errors
            return list(done)

        return [asyncio.ensure_future(group(r)) for r in requests]

    async def work(self, groups: int) -> int:
        """Generate for exactly `groups` prompt groups (sync mode); returns samples written."""
        done = 0
        while done < groups * self.n:
            done += await self.step(groups - done // self.n)
        return done

    async def run(self) -> None:
        """Generate until the prompt stream ends (the workflow seals it) or the task is cancelled."""
        await serve(
            self.store, self.kind.prompt_fields, self.groups_per_call * self.n, ROLLOUT,
            idle(self.stats, self.process), unit=self.n, sampler="group", writes=self.kind.rollout_fields,
            timeout_s=self.get_timeout_s,
        )  # fmt: skip

    async def close(self) -> None:
        await self.engine.close()

    async def probe(self, example: Any) -> float:
        """A health probe: one sample for one prompt, beside any call in flight; returns its seconds."""
        start = time.perf_counter()
        prompt = self.kind.prompts([example])[self.kind.prompt_field][0]
        request_id = f"probe{time.monotonic_ns()}"  # unique: an engine may still run an earlier one
        await self.engine.generate([self.kind.request(request_id, prompt, 1, self.params)])
        return time.perf_counter() - start

    async def evaluate(self, examples: list[Any], reward_fn: Any, per_group: bool = False) -> float:
        """Mean reward of one sample per held-out prompt, with the current weights."""
        prompts = self.kind.prompts(examples)[self.kind.prompt_field]
        requests = [self.kind.request(f"eval{i}", p, 1, self.params) for i, p in enumerate(prompts)]
        outputs: list[Any]
        if self.episodes is not None:  # the held-out prompts' episodes, each with its own example
            generate = Batcher(self.engine.generate)
            outputs = await asyncio.gather(
                *(self.episodes.run(generate, r, 0, e) for r, e in zip(requests, examples))
            )
        else:
            outputs = await self.engine.generate(requests)
        responses = self.kind.results(outputs)[self.kind.response_field]
        args = [self.kind.reward_args(p, r, e.answer) for p, r, e in zip(prompts, responses, examples)]
        binds_info, rewards = takes_info(reward_fn), []
        for arg, example, output in zip(args, examples, outputs):
            info = getattr(example, "info", "")
            if self.episodes is not None:
                info = with_episode(info, json.dumps(output.episode, default=str))
            fn = with_info(reward_fn, [info] if per_group else info) if binds_info else reward_fn
            if per_group:  # a reward function that scores lists: each held-out prompt is a group of one
                rewards.append(parts_of(fn(*([a] for a in arg))[0])[0])
            else:
                rewards.append(parts_of(fn(*arg))[0])
        return sum(rewards) / max(len(rewards), 1)
