"""Wiring: builds each worker inside its own Ray actor and hands the recipe their handles.

Workers are plain classes (workers/); here they are assembled with what they need (the
task, tokenizer, engine, a store client, a weight client) inside a `WorkerHost` actor,
so the classes stay testable without Ray and placement stays a workflow decision.
Components never reference the workflow; the recipe (asyncflow.recipes) drives them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import ray

from asyncflow.config import AsyncFlowConfig
from asyncflow.errors import ConfigError, WorkerError

log = logging.getLogger("asyncflow")
# The Ray namespace of every named actor of a run (`<dataplane.name>.trainer0`, `.control`, ...);
# the memory store names its actors in a namespace of the same name.
NAMESPACE = "asyncflow"


@dataclass
class Context:
    """What every role is built from: its config, the task, the tokenizer, the weight store,
    and the policy kind (workers.kinds: token or flow), which knows what rows hold."""

    config: AsyncFlowConfig
    index: int
    task: Any
    tokenizer: Any
    weights: Any  # workers.weights.WeightClient
    extra: dict
    kind: Any = None


def _source(ctx: Context) -> Any:
    from workers.source import PromptSource

    c = ctx.config
    return PromptSource(
        ctx.task, ctx.kind, None, ctx.weights, n=c.rollout.n, batch_prompts=c.trainer.batch_prompts,
        staleness=c.staleness, cursor=ctx.extra.get("cursor", 0),
    )  # fmt: skip


def _reward(ctx: Context) -> Any:
    from workers.policy import make_reward_fn
    from workers.reward import RewardWorker

    r, timeout_s = ctx.config.reward, ctx.config.dataplane.get_timeout_s
    return RewardWorker(
        make_reward_fn(ctx.config.task), ctx.kind, None, timeout_s=r.timeout_s,
        failure_reward=r.failure_reward, batch_rows=r.batch_rows, get_timeout_s=timeout_s,
    )  # fmt: skip


def _engine(ctx: Context) -> Any:
    from services.serving.simulated import SimulatedEngine
    from services.serving.torch_engine import TorchEngine
    from workers.policy import make_model

    c, tok = ctx.config, ctx.tokenizer
    # A restarted worker samples with a fresh seed: it must not repeat its previous life's samples.
    seed = c.seed * 1000 + ctx.index + 1000 * ctx.extra.get("incarnation", 0)
    if c.policy == "flow":
        return ctx.kind.engine(seed)
    if c.rollout.engine == "simulated":
        return SimulatedEngine(
            vocab_size=len(tok), eos_token_id=tok.eos_token_id, version=-1, seed=seed,
            **c.rollout.simulated.model_dump(),
        )  # fmt: skip
    model = make_model(c.model, len(tok), c.seed)  # weights come from the weight store
    if c.rollout.engine == "vllm":
        return _vllm_engine(ctx, model, seed)
    return TorchEngine(
        model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, version=-1, seed=seed
    )


def _vllm_engine(ctx: Context, model: Any, seed: int) -> Any:
    import tempfile

    from services.models import save_model
    from services.serving.vllm import VLLMEngine

    r = ctx.config.rollout
    # vLLM loads a model directory; once loaded it keeps the weights in memory.
    with tempfile.TemporaryDirectory(prefix="asyncflow-vllm-") as model_dir:
        save_model(model, ctx.tokenizer, model_dir)
        return VLLMEngine(
            model_dir, eos_token_id=ctx.tokenizer.eos_token_id, version=-1, seed=seed,
            on_update="abort" if r.partial_rollout == "abort" else "keep", max_num_seqs=r.vllm.max_num_seqs,
            kv_cache_gib=r.vllm.kv_cache_gib, dtype=r.vllm.dtype,
        )  # fmt: skip


def _rollout(ctx: Context) -> Any:
    from workers.policy import set_threads
    from workers.rollout import RolloutWorker

    c = ctx.config.rollout
    set_threads(c.torch_threads)
    return RolloutWorker(
        _engine(ctx), None, ctx.weights, n=c.n, groups_per_call=c.groups_per_call, params=ctx.kind.params(),
        kind=ctx.kind, name=f"rollout{ctx.index}", get_timeout_s=ctx.config.dataplane.get_timeout_s,
        partial_rollout=c.partial_rollout != "off",
    )  # fmt: skip


def _reference(ctx: Context) -> Any:
    from safetensors.torch import load_file

    from workers.policy import set_threads
    from workers.reference import ReferenceWorker

    set_threads(ctx.config.reference.torch_threads)
    model = ctx.kind.model(ctx.config.seed)
    model.load_state_dict(load_file(ctx.extra["weights_path"]))
    return ReferenceWorker(model, None, kind=ctx.kind, get_timeout_s=ctx.config.dataplane.get_timeout_s)


def _trainer(ctx: Context) -> Any:
    import torch

    from workers.flow_trainer import FlowTrainerWorker
    from workers.policy import set_threads
    from workers.trainer import TrainerWorker

    c = ctx.config
    set_threads(c.trainer.torch_threads)
    torch.manual_seed(c.seed)
    if c.policy == "flow":
        return FlowTrainerWorker(
            ctx.kind.model(c.seed), None, ctx.weights, c.trainer, ctx.kind, n=c.rollout.n,
            staleness=c.staleness, reference=c.reference.enabled, get_timeout_s=c.dataplane.get_timeout_s,
        )  # fmt: skip
    return TrainerWorker(
        ctx.kind.model(c.seed), None, ctx.weights, c.trainer, n=c.rollout.n,
        staleness=c.staleness, temperature=c.rollout.temperature, reference=c.reference.enabled,
        top_k=c.rollout.top_k, top_p=c.rollout.top_p,
        get_timeout_s=c.dataplane.get_timeout_s,
    )  # fmt: skip


ROLES = {
    "source": _source,
    "rollout": _rollout,
    "reward": _reward,
    "reference": _reference,
    "trainer": _trainer,
}


class WorkerHost:
    """One worker in one actor. Ray re-runs the constructor when it restarts a dead actor,
    so a restarted worker is rebuilt from the same arguments and pulls weights again."""

    def __init__(
        self,
        role: str,
        config: dict,
        index: int,
        store_address: str,
        weights_name: str,
        extra: dict | None = None,
    ):
        from workers.kinds import make_kind
        from workers.policy import make_task
        from workers.weights import WeightClient

        if role not in ROLES:
            raise WorkerError(f"unknown worker role {role!r}; one of {sorted(ROLES)}")
        self.role, self.store_address = role, store_address
        self.config = AsyncFlowConfig.model_validate(config)
        extra = dict(extra or {})
        extra["incarnation"] = int(ray.get_runtime_context().was_current_actor_reconstructed)
        self.task = make_task(self.config.task, self.config.seed)
        self.kind = make_kind(self.config, self.task)
        self.tokenizer = self.kind.tokenizer
        # Looked up by name, not passed as a handle: a handle among the constructor arguments
        # would keep Ray from restarting this actor reliably (ray-project/ray#53727).
        handle = ray.get_actor(weights_name, namespace=NAMESPACE)
        weights = WeightClient(handle, remote=True, bucket_mb=self.config.weights.bucket_mb)
        self.worker = ROLES[role](
            Context(self.config, index, self.task, self.tokenizer, weights, extra, self.kind)
        )
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
        from workers.policy import make_reward_fn

        await self.call("sync_weights", min_version)
        examples = [self.task.eval_example(i) for i in range(count)]
        return await self.worker.evaluate(examples, make_reward_fn(self.config.task, evaluation=True))

    def stats(self) -> dict:
        return dict(getattr(self.worker, "stats", {}))

    async def close(self) -> None:
        """Close the worker (its engine: vLLM's process group and its file in the temp directory)
        and its store connection, before the actor is killed."""
        close = getattr(self.worker, "close", None)
        if close is not None:
            result = close()
            if inspect.isawaitable(result):
                await result
        store = getattr(self.worker, "store", None)
        if store is not None:
            await store.close()

    async def warmup(self) -> dict:
        return await asyncio.to_thread(self.worker.warmup, self.task, self.tokenizer, self.config.warmup)


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
    loops: dict[Any, Any] = field(default_factory=dict)  # async mode: actor -> the task supervising it

    @property
    def weights_name(self) -> str:
        return f"{self.config.dataplane.name}.weights"

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
                namespace=NAMESPACE,
                num_cpus=num_cpus,
                max_restarts=restarts,
                max_concurrency=64,
            )  # fmt: skip
            .remote(
                role, self.config.model_dump(mode="json"), index, self.store.address, self.weights_name, extra
            )
        )

    async def ready(self) -> None:
        """Wait until every worker actor has been built (actors start in parallel)."""
        await asyncio.gather(*(a.pid.remote() for a in [self.source, self.trainer, *self.streamers]))

    def role_of(self, actor_id: str | None) -> str:
        """Which worker an actor id is ("trainer", "rollout worker 1", ...), for messages."""
        named = {"the prompt source": [self.source], "the trainer": [self.trainer],
                 "the weight store": [self.weights], "rollout worker": self.rollouts,
                 "reward worker": self.rewards, "the reference worker": self.references}  # fmt: skip
        for role, actors in named.items():
            for i, actor in enumerate(actors):
                if actor is not None and actor._actor_id.hex() == actor_id:
                    return (
                        f"{role} {i}" if len(actors) > 1 or role.startswith(("rollout", "reward")) else role
                    )
        return "a worker"

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Close every worker (engines, connections), then kill the actors and stop the store."""
        workers = [a for a in [self.source, self.trainer, *self.streamers] if a is not None]
        closing = [asyncio.ensure_future(a.close.remote()) for a in workers]
        if closing:  # a dead or hung worker is killed anyway
            await asyncio.wait(closing, timeout=grace_s)
        for task in closing:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.warning("a worker did not close cleanly: %s", task.exception())
            task.cancel()
        for actor in [*workers, self.weights]:
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
        address = os.environ["RAY_ADDRESS"]
        try:
            ray.init()
        except ray.exceptions.AuthenticationError:
            raise ConfigError(
                f"the Ray cluster at RAY_ADDRESS={address} requires token authentication and refused this "
                "process: set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN or "
                "RAY_AUTH_TOKEN_PATH (`ray get-auth-token` on the head node prints it)"
            ) from None
        except ConnectionError as e:
            raise ConfigError(
                f"cannot join the Ray cluster at RAY_ADDRESS={address} ({e}); check the address and that "
                "the cluster runs, or unset RAY_ADDRESS to start Ray on this machine"
            ) from None
        return
    cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed(config)))
    # Ray starts workers at niceness 15; here they are the job, not background work, and at 15
    # anything else on a shared machine starves them.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)


def start(config: AsyncFlowConfig, *, cursor: int = 0) -> Workflow:
    """Start the store, the weight store and the worker actors of `config` (Ray must be up).
    The reference worker starts later (`Workflow.spawn`), once the weights it keeps exist."""
    from dataplane.store import start_store
    from workers.weights import WeightStore

    store = start_store(config.dataplane)
    weights = (
        ray.remote(WeightStore)
        .options(name=f"{config.dataplane.name}.weights", namespace=NAMESPACE, num_cpus=0.1)
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
