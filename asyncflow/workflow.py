"""Wiring: builds each worker inside its own Ray actor and hands the recipe their handles.

Workers are plain classes (workers/); here they are assembled with what they need (the
task, tokenizer, engine, a store client, a weight client) inside a `WorkerHost` actor,
so the classes stay testable without Ray and placement stays a workflow decision.
Components never reference the workflow; the recipe (asyncflow.recipes) drives them.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Any

import ray

from asyncflow.config import AsyncFlowConfig
from asyncflow.errors import WorkerError


def _build(role: str, config: AsyncFlowConfig, index: int, weights_handle: Any, extra: dict) -> Any:
    """Build a worker's synchronous parts (called in the actor; the store is connected later)."""
    from services.serving import SamplingParams
    from services.serving.simulated import SimulatedEngine
    from services.serving.torch_engine import TorchEngine
    from workers.policy import make_policy, make_reward_fn, make_task, set_threads
    from workers.reference import ReferenceWorker
    from workers.reward import RewardWorker
    from workers.rollout import RolloutWorker
    from workers.source import PromptSource
    from workers.trainer import TrainerWorker
    from workers.weights import WeightClient

    task = make_task(config.task, config.seed)
    weights = WeightClient(weights_handle, remote=True, bucket_mb=config.weights.bucket_mb)
    timeout = config.dataplane.get_timeout_s
    if role == "source":
        tokenizer, _ = make_policy(config.model, task, config.seed)
        return PromptSource(
            task, tokenizer, None, weights, n=config.rollout.n, batch_prompts=config.trainer.batch_prompts,
            staleness=config.staleness, cursor=extra.get("cursor", 0),
        )  # fmt: skip
    if role == "reward":
        tokenizer, _ = make_policy(config.model, task, config.seed)
        r = config.reward
        return RewardWorker(
            make_reward_fn(config.task), tokenizer, None, timeout_s=r.timeout_s,
            failure_reward=r.failure_reward, batch_rows=r.batch_rows, get_timeout_s=timeout,
        )  # fmt: skip
    if role == "rollout":
        c = config.rollout
        set_threads(c.torch_threads)
        tokenizer, model = make_policy(config.model, task, config.seed)
        seed = config.seed * 1000 + index + 1000 * extra.get("incarnation", 0)
        engine: Any
        if c.engine == "simulated":
            engine = SimulatedEngine(
                vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, version=-1, seed=seed,
                **c.simulated.model_dump(),
            )  # fmt: skip
        else:
            engine = TorchEngine(
                model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, version=-1,
                seed=seed,
            )  # fmt: skip
        params = SamplingParams(
            temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, max_new_tokens=c.max_new_tokens,
            stop_token_ids=(tokenizer.eos_token_id,),
        )  # fmt: skip
        worker = RolloutWorker(
            engine, None, weights, n=c.n, groups_per_call=c.groups_per_call, params=params,
            name=f"rollout{index}", get_timeout_s=timeout,
        )  # fmt: skip
        worker.eval_context = (task, tokenizer, make_reward_fn(config.task))  # type: ignore[attr-defined]
        return worker
    if role == "reference":
        set_threads(config.reference.torch_threads)
        _, model = make_policy(config.model, task, config.seed)
        from safetensors.torch import load_file

        model.load_state_dict(load_file(extra["weights_path"]))
        return ReferenceWorker(model, None, temperature=config.rollout.temperature, get_timeout_s=timeout)
    if role == "trainer":
        set_threads(config.trainer.torch_threads)
        torch_seed(config.seed)
        _, model = make_policy(config.model, task, config.seed)
        trainer = TrainerWorker(
            model, None, weights, config.trainer, n=config.rollout.n, staleness=config.staleness,
            temperature=config.rollout.temperature, reference=config.reference.enabled, get_timeout_s=timeout,
        )  # fmt: skip
        trainer.warmup_context = (task, make_policy(config.model, task, config.seed)[0])  # type: ignore[attr-defined]
        return trainer
    raise WorkerError(f"unknown worker role {role!r}")


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


class WorkerHost:
    """One worker in one actor. Ray re-runs the constructor when it restarts a dead actor,
    so a restarted worker is rebuilt from the same arguments and pulls weights again."""

    def __init__(
        self,
        role: str,
        config: dict,
        index: int,
        store_address: str,
        weights_handle: Any,
        extra: dict | None = None,
    ):
        self.role, self.store_address = role, store_address
        self.config = AsyncFlowConfig.model_validate(config)
        extra = dict(extra or {})
        extra["incarnation"] = ray.get_runtime_context().was_current_actor_reconstructed
        self.worker = _build(role, self.config, index, weights_handle, extra)
        self._connected: asyncio.Task | None = None

    async def _connect(self) -> None:
        from dataplane.client import StoreClient

        self.worker.store = await StoreClient.connect(self.store_address)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run `worker.method(*args)` (awaited if it is a coroutine)."""
        if self._connected is None:
            self._connected = asyncio.ensure_future(self._connect())
        await asyncio.shield(self._connected)
        result = getattr(self.worker, method)(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result

    def pid(self) -> int:
        return os.getpid()

    async def evaluate(self, count: int, min_version: int) -> float:
        """Mean reward on `count` held-out prompts with weights >= min_version (rollout only)."""
        await self.call("sync_weights", min_version)
        task, tokenizer, reward_fn = self.worker.eval_context
        examples = [task.eval_example(i) for i in range(count)]
        return await self.worker.evaluate(examples, tokenizer, reward_fn)

    def stats(self) -> dict:
        return dict(getattr(self.worker, "stats", {}))

    async def warmup(self) -> dict:
        task, tokenizer = self.worker.warmup_context
        return await asyncio.to_thread(self.worker.warmup, task, tokenizer, self.config.warmup)


@dataclass
class Workflow:
    """The running actors of one run, by role."""

    config: AsyncFlowConfig
    store: Any  # dataplane.store.StoreHandle
    weights: Any  # WeightStore actor
    source: Any = None
    trainer: Any = None
    rollouts: list[Any] = field(default_factory=list)
    rewards: list[Any] = field(default_factory=list)
    references: list[Any] = field(default_factory=list)

    @property
    def streamers(self) -> list[Any]:
        """Workers that run a loop of their own in async mode."""
        return [*self.rollouts, *self.rewards, *self.references]

    def spawn(
        self, role: str, index: int = 0, *, num_cpus: float, restarts: int = 0, extra: dict | None = None
    ):
        """A WorkerHost actor for `role`; Ray restarts it up to `restarts` times if it dies."""
        return (
            ray.remote(WorkerHost)
            .options(
                name=f"{self.config.dataplane.name}.{role}{index}",
                namespace="asyncflow",
                num_cpus=num_cpus,
                max_restarts=restarts,
                max_concurrency=64,
            )  # fmt: skip
            .remote(role, self.config.model_dump(mode="json"), index, self.store.address, self.weights, extra)
        )

    def shutdown(self) -> None:
        for actor in [self.source, self.trainer, *self.streamers, self.weights]:
            if actor is not None:
                ray.kill(actor)
        self.store.shutdown()


def cpus_needed(config: AsyncFlowConfig) -> float:
    """Logical CPUs the run's actors reserve (Ray must offer at least this many)."""
    d = config.dataplane
    return (
        config.trainer.num_cpus
        + config.rollout.num_cpus * config.rollout.num_workers
        + config.reward.num_cpus * config.reward.num_workers
        + (config.reference.num_cpus if config.reference.enabled else 0)
        + 0.2  # source and weight store
        + d.controller_num_cpus
        + d.storage_num_cpus * d.num_storage_units
    )


def init_ray(config: AsyncFlowConfig) -> None:
    """Join RAY_ADDRESS if set, else start Ray here with enough logical CPUs for the run."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed(config)))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)


def start(config: AsyncFlowConfig, *, cursor: int = 0) -> Workflow:
    """Start the store, the weight store and the worker actors of `config` (Ray must be up).
    The reference worker starts later (`Workflow.spawn`), once the weights it keeps exist."""
    from dataplane.store import start_store
    from workers.weights import WeightStore

    store = start_store(config.dataplane)
    weights = (
        ray.remote(WeightStore)
        .options(name=f"{config.dataplane.name}.weights", namespace="asyncflow", num_cpus=0.1)
        .remote(config.weights.keep_versions)
    )
    wf = Workflow(config, store, weights)
    r = config.rollout
    wf.source = wf.spawn("source", num_cpus=0.1, extra={"cursor": cursor})
    wf.trainer = wf.spawn("trainer", num_cpus=config.trainer.num_cpus)
    wf.rollouts = [
        wf.spawn("rollout", i, num_cpus=r.num_cpus, restarts=r.max_restarts) for i in range(r.num_workers)
    ]
    wf.rewards = [
        wf.spawn("reward", i, num_cpus=config.reward.num_cpus, restarts=2)
        for i in range(config.reward.num_workers)
    ]
    return wf
