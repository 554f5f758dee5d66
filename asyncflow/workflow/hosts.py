"""One worker in one Ray actor, per role: the typed methods the pipeline calls.

Workers are plain classes (workers/). A host builds its worker complete, with a store
client it connected first, the task, the policy kind and a weight client, on the first
call (`start`): Ray re-runs the constructor when it restarts a dead actor, and the next
call builds a fresh worker from the same arguments, which pulls the weights again. Each
role's host has the methods of that role and no others, so the pipeline calls
`trainer.step.remote()`, never a method by name.
"""

from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path
from typing import Any

import ray

from asyncflow.config import AsyncFlowConfig
from asyncflow.tracing import tracer

# The Ray namespace of every named actor of a run (`<dataplane.name>.trainer0`, `.control`, ...);
# the memory store names its actors in a namespace of the same name.
NAMESPACE = "asyncflow"


def reconstructed() -> bool:
    """Whether Ray restarted this actor. Ray 2.60's `was_current_actor_reconstructed` reads its own
    deprecated `RuntimeContext.actor_id`, which warns once per actor (in every job's log when the
    run joins a cluster: log_to_driver); the warning is Ray's, not ours to act on."""
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RayDeprecationWarning)
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


class Host:
    """What every role's actor shares: its config, task and kind; the worker, built on `start`."""

    role = ""  # the role's name in time/<role>/... metrics
    track_base, track_label = 0, "{role} {index}"  # its trace track: number, and name

    def __init__(self, config: dict, store_address: str, index: int = 0):
        from asyncflow.workflow.stacks import dump_on_signal
        from workers.kinds import make_kind
        from workers.policy import make_task

        dump_on_signal()  # the watchdog's fallback for reading this actor's stacks without py-spy
        self.config = AsyncFlowConfig.model_validate(config)
        tracer.configure(self.config.trace.enabled, self.config.trace.max_events)
        self.store_address, self.index = store_address, index
        # A restarted actor samples with a fresh seed: it must not repeat its previous life's samples.
        self.incarnation = int(reconstructed())
        self.task = make_task(self.config.task, self.config.seed)
        self.kind = make_kind(self.config, self.task)
        self._worker: Any = None
        self._building: asyncio.Task | None = None

    async def start(self) -> int:
        """Connect to the store and build the worker, once; returns the actor's pid."""
        if self._building is None:
            self._building = asyncio.ensure_future(self._build())
        await asyncio.shield(self._building)
        return os.getpid()

    async def _build(self) -> None:
        from dataplane.client import StoreClient

        self._worker = self.make(await StoreClient.connect(self.store_address))

    def make(self, store: Any) -> Any:
        raise NotImplementedError

    async def worker(self) -> Any:
        await self.start()
        return self._worker

    def weights(self) -> Any:
        from workers.weights import WeightClient

        # Looked up by name, not passed as a handle: a handle among the constructor arguments
        # would keep Ray from restarting this actor reliably (ray-project/ray#53727).
        handle = ray.get_actor(f"{self.config.dataplane.name}.weights", namespace=NAMESPACE)
        w = self.config.weights
        return WeightClient(handle, remote=True, bucket_mb=w.bucket_mb, channels=w.channels)

    def stats(self) -> dict:
        return dict(getattr(self._worker, "stats", {}))

    def trace(self) -> dict:
        """The spans this actor recorded since the last call, and the track they belong on."""
        name = self.track_label.format(role=self.role, index=self.index)
        return {
            "role": self.role,
            "track": self.track_base + self.index,
            "name": name,
            "events": tracer.drain(),
            "in_flight": tracer.in_flight(),
        }

    def in_flight(self) -> list[dict]:
        """The spans this actor has begun and not ended (asyncflow.tracing.Tracer.in_flight)."""
        return tracer.in_flight()

    async def close(self) -> None:
        """Close the worker (its engine: vLLM's process group and its file in the temp directory)
        and its store connection, before the actor is killed."""
        worker = self._worker
        if worker is None:
            return
        close = getattr(worker, "close", None)
        if close is not None:
            result = close()
            if asyncio.iscoroutine(result):
                await result
        await worker.store.close()


class SourceHost(Host):
    role, track_base, track_label = "source", 1000, "prompt source"

    def __init__(self, config: dict, store_address: str, cursor: int, freed: int = 0):
        super().__init__(config, store_address)
        self.cursor, self.freed = cursor, freed

    def make(self, store: Any) -> Any:
        from workers.source import PromptSource

        c = self.config
        return PromptSource(
            self.task, self.kind, store, self.weights(), n=c.rollout.n, batch_prompts=c.trainer.batch_prompts,
            staleness=c.staleness, cursor=self.cursor, dynamic_sampling=c.trainer.dynamic_sampling,
            freed=self.freed, admit_ahead=c.admit_ahead if c.mode == "async" else None,
            backlog_rows=c.rollout.num_workers * c.rollout.groups_per_call * c.rollout.n,
            prompts_per_put=c.rollout.groups_per_call,  # a put wakes a worker with a whole call's prompts
        )  # fmt: skip

    async def take_freed(self) -> int:
        """Dynamic sampling: wait for groups the trainer dropped; how many (slots freed)."""
        return await (await self.worker()).take_freed()

    async def freed_slots(self) -> int:
        return (await self.worker()).freed

    async def admit(self, count: int, version: int) -> int:
        return await (await self.worker()).admit(count, version)

    async def run(self) -> None:
        await (await self.worker()).run()

    async def pause(self) -> int:
        return await (await self.worker()).pause()

    async def resume(self) -> None:
        (await self.worker()).resume()

    async def set_staleness(self, k: int) -> None:
        (await self.worker()).set_staleness(k)


class TrainerHost(Host):
    """One trainer rank (`index`, of trainer.num_ranks); the pipeline joins the ranks into a group."""

    role, track_base, track_label = "trainer", 2000, "trainer rank {index}"

    def make(self, store: Any) -> Any:
        import torch

        from workers.policy import device_for, set_threads
        from workers.ranks import Ranks
        from workers.trainer import TrainerWorker

        c = self.config
        set_threads(c.trainer.torch_threads)
        torch.manual_seed(c.seed)
        model = self.kind.model(c.seed).to(device_for("trainer", c.trainer.num_gpus))
        return TrainerWorker(
            model, store, self.weights(), c.trainer, self.kind, n=c.rollout.n,
            staleness=c.staleness, reference=c.reference.enabled, get_timeout_s=c.dataplane.get_timeout_s,
            ranks=Ranks(self.index, c.trainer.num_ranks, c.trainer.parallel),
        )  # fmt: skip

    async def address(self) -> str:
        """Rank 0: where the others find it."""
        from workers.ranks import Ranks

        return Ranks.address()

    async def join(self, address: str) -> None:
        worker = await self.worker()
        await asyncio.to_thread(worker.ranks.join, address)

    async def warmup(self) -> dict:
        worker = await self.worker()
        return await asyncio.to_thread(worker.warmup, self.task, self.config.warmup)

    async def step(self) -> dict:
        return await (await self.worker()).step()

    async def publish(self) -> float:
        return await (await self.worker()).publish()

    async def save(self, path: str) -> None:
        worker = await self.worker()
        await worker.weights.settle()  # the checkpoint's version is in the weight store
        worker.save(path)

    async def load(self, path: str) -> int:
        return (await self.worker()).load(path)

    async def save_weights(self, path: str) -> None:
        (await self.worker()).save_weights(path)

    async def set_staleness(self, k: int) -> None:
        (await self.worker()).set_staleness(k)


class RolloutHost(Host):
    role, track_base = "rollout", 3000

    _eval_reward: Any = None  # the held-out reward function, made on the first evaluation

    def make(self, store: Any) -> Any:
        from workers.policy import set_threads
        from workers.rollout import RolloutWorker

        c = self.config.rollout
        set_threads(c.torch_threads)
        return RolloutWorker(
            self.engine(), store, self.weights(), n=c.n, groups_per_call=c.groups_per_call,
            params=self.kind.params(), kind=self.kind, name=f"rollout{self.index}",
            get_timeout_s=self.config.dataplane.get_timeout_s, partial_rollout=c.partial_rollout != "off",
            **self.episodes(),
        )  # fmt: skip

    def episodes(self) -> dict[str, Any]:
        """With env.source: the episode runner over this worker's own pool of environment actors
        (a slow tool waits there, not in the engine's process), and the task's examples."""
        e = self.config.env
        if e.source is None:
            return {}
        import ray

        from workers.episodes import EnvHost, EnvPool, Episodes, RemoteEnvHost

        actor = ray.remote(max_restarts=1, **e.ray_options())(EnvHost)
        pool = EnvPool([RemoteEnvHost(actor.remote(e.source, e.options)) for _ in range(e.num_workers)])
        kind: Any = self.kind  # a TokenKind: env.source needs policy: token
        episodes = Episodes(
            pool, kind.tokenizer, kind.stop_ids, max_turns=e.max_turns, episode_timeout_s=e.episode_timeout_s,
            max_episode_tokens=e.max_episode_tokens,
        )  # fmt: skip
        return {"episodes": episodes, "examples": self.task.example}

    def engine(self) -> Any:
        """The rollout engine of the configured kind; its weights come from the weight store."""
        from services.serving.simulated import SimulatedEngine

        c, tok = self.config, self.kind.tokenizer
        seed = c.seed * 1000 + self.index + 1000 * self.incarnation
        if c.rollout.engine == "simulated":
            return SimulatedEngine(
                vocab_size=len(tok), eos_token_id=tok.eos_token_id, version=-1, seed=seed,
                **c.rollout.simulated.model_dump(),
            )  # fmt: skip
        device = self.device  # a GPU asked for and no CUDA: refused here, whatever the engine
        if c.rollout.engine == "vllm":
            return self._vllm(seed)
        if c.rollout.scheduler.policy != "off":
            return self._scheduled(seed, device)
        return self.kind.engine(seed, device)  # the torch engine for tokens, a flow policy's SDE sampler

    @property
    def device(self) -> str:
        from workers.policy import device_for

        return device_for("rollout", self.config.rollout.num_gpus)

    def _scheduled(self, seed: int, device: str) -> Any:
        """The scheduled torch engine (rollout.scheduler): a token policy's model, weights to come."""
        from asyncflow.errors import ConfigError
        from services.serving.torch_scheduled import ScheduledTorchEngine

        s, kind = self.config.rollout.scheduler, self.kind
        if not hasattr(kind, "stop_ids"):
            raise ConfigError(
                f"rollout.scheduler.policy={s.policy!r} schedules token policies; this run's policy kind is "
                f"{type(kind).__name__}. Set rollout.scheduler.policy: off"
            )
        model: Any = kind.model(0).to(device)  # a transformers model; weights from the weight store
        policy: Any = s.policy  # fcfs or rl here
        return ScheduledTorchEngine(
            model, eos_token_id=kind.stop_ids[0], pad_token_id=kind.tokenizer.pad_token_id,
            version=-1, seed=seed, policy=policy, kv_budget_tokens=s.kv_budget_tokens,
            max_batch_size=s.max_batch_size, keep_kv=s.keep_kv, turn_cache_tokens=s.turn_cache_tokens,
            autocast=self.config.rollout.autocast,
        )  # fmt: skip

    def _vllm(self, seed: int) -> Any:
        import tempfile

        from services.models import save_model
        from services.serving.vllm import VLLMEngine

        r = self.config.rollout
        kind: Any = self.kind  # vLLM serves token policies: a TokenKind
        engine = functools.partial(
            VLLMEngine, eos_token_id=kind.stop_ids[0], version=-1, seed=seed,
            on_update="abort" if r.partial_rollout == "abort" else "keep",
            max_num_seqs=r.vllm.max_num_seqs, kv_cache_gib=r.vllm.kv_cache_gib, dtype=r.vllm.dtype,
            tensor_parallel_size=r.vllm.tensor_parallel_size,
            partial_updates=self.config.trainer.trainable != "all",  # a model trained in part
            policy="rl" if r.scheduler.policy == "rl" else "fcfs",
        )  # fmt: skip
        path = self.config.model.path
        if path is not None and Path(path).is_dir():  # a local checkpoint: vLLM loads it as it is
            return engine(path)
        # vLLM loads a model directory; once loaded it keeps the weights in memory.
        with tempfile.TemporaryDirectory(prefix="asyncflow-vllm-") as model_dir:
            model: Any = self.kind.model(self.config.seed)  # a transformers model: vLLM loads the same shape
            save_model(model, self.kind.tokenizer, model_dir)
            return engine(model_dir)

    async def run(self) -> None:
        await (await self.worker()).run()

    async def work(self, groups: int) -> int:
        return await (await self.worker()).work(groups)

    async def sync_weights(self, min_version: int = 0) -> int:
        return await (await self.worker()).sync_weights(min_version)

    async def probe(self) -> dict:
        """Health: a tiny generation on the engine; its seconds (`probe_s`) and the longest engine
        call so far. {} while the worker is still being built or holds no weights yet."""
        worker = self._worker
        if worker is None or worker.engine.version < 0:
            return {}
        return {
            "probe_s": await worker.probe(self.task.example(0)),
            "longest_call_s": worker.stats["longest_call_s"],
        }

    async def evaluate(self, count: int, min_version: int) -> float:
        """Mean reward on `count` held-out prompts with weights >= min_version."""
        from workers.policy import make_reward_fn

        worker = await self.worker()
        await worker.sync_weights(min_version)
        examples = [self.task.eval_example(i) for i in range(count)]
        task = self.config.task  # an eval_reward of its own scores one sample per call
        per_group = self.config.reward.per_group and not task.eval_reward
        if self._eval_reward is None:  # made once: a reward model loads its checkpoint
            self._eval_reward = make_reward_fn(task, evaluation=True)
        return await worker.evaluate(examples, self._eval_reward, per_group)


class RewardHost(Host):
    role, track_base = "reward", 4000

    def make(self, store: Any) -> Any:
        from workers.reward import RewardWorker

        r, max_new = self.config.reward, self.config.rollout.max_new_tokens
        return RewardWorker(
            self.reward_fn(), self.kind, store, timeout_s=r.timeout_s,
            failure_reward=r.failure_reward, batch_rows=r.batch_rows,
            get_timeout_s=self.config.dataplane.get_timeout_s,
            per_group=self.config.rollout.n if r.per_group else 0,
            overlong=(max_new, r.overlong_buffer, r.overlong_penalty) if r.overlong_buffer else None,
        )  # fmt: skip

    def reward_fn(self) -> Any:
        """The task's reward function, or the reward processes that serve it (reward.isolation)."""
        from workers.policy import make_reward_fn
        from workers.reward_pool import RewardProcesses

        r, task = self.config.reward, self.config.task
        if r.isolation == "thread" or (r.isolation == "auto" and task.reward_options):
            return make_reward_fn(task)
        return RewardProcesses(
            task.reward, task.reward_options, processes=r.processes, memory_limit_mb=r.memory_limit_mb
        )

    async def _build(self) -> None:
        await super()._build()
        await self._worker.start()  # the reward processes load the function now, not on the first call

    async def run(self) -> None:
        await (await self.worker()).run()

    async def work(self, rows: int) -> int:
        return await (await self.worker()).work(rows)


class ReferenceHost(Host):
    role, track_base, track_label = "reference", 5000, "reference"

    def __init__(self, config: dict, store_address: str, weights_path: str):
        super().__init__(config, store_address)
        self.weights_path = weights_path

    def make(self, store: Any) -> Any:
        from safetensors.torch import load_model

        from workers.policy import device_for, set_threads
        from workers.reference import ReferenceWorker

        set_threads(self.config.reference.torch_threads)
        model = self.kind.model(self.config.seed)
        load_model(model, self.weights_path)
        model = model.to(device_for("reference", self.config.reference.num_gpus))
        return ReferenceWorker(
            model, store, kind=self.kind, get_timeout_s=self.config.dataplane.get_timeout_s
        )

    async def run(self) -> None:
        await (await self.worker()).run()

    async def work(self, rows: int) -> int:
        return await (await self.worker()).work(rows)
