"""The config tree of a run: one pydantic model per section, loaded from YAML.

`load_config(path, overrides)` reads a YAML file, applies `key.path=value` overrides and
validates everything at once; any problem raises ConfigError naming the field path, the
value and the fix. Importing this package pulls in no torch, ray or vllm (a test checks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from asyncflow.config._base import Section
from asyncflow.config.deploy import DeployConfig
from asyncflow.config.env import EnvConfig
from asyncflow.config.flow import AFMConfig, EncoderConfig, FlowConfig, PMRFConfig
from asyncflow.config.observe import LoggingConfig
from asyncflow.config.resources import RoleResources, summed
from asyncflow.config.rl import (
    CriticConfig,
    ModelConfig,
    ReferenceConfig,
    RewardConfig,
    RolloutConfig,
    TaskConfig,
    TrainerConfig,
    WarmupConfig,
    import_string,
)
from asyncflow.config.trace import TraceConfig
from asyncflow.config.trainable import Lora, LoraConfig, Patterns, Trainable
from asyncflow.config.watchdog import WatchdogConfig
from asyncflow.config.weights import WeightsConfig
from asyncflow.errors import ConfigError
from dataplane.config import DataPlaneConfig

__all__ = [
    "AFMConfig",
    "AsyncFlowConfig",
    "CriticConfig",
    "DataPlaneConfig",
    "DeployConfig",
    "EncoderConfig",
    "EnvConfig",
    "FlowConfig",
    "LoggingConfig",
    "Lora",
    "LoraConfig",
    "ModelConfig",
    "PMRFConfig",
    "Patterns",
    "ReferenceConfig",
    "RewardConfig",
    "RolloutConfig",
    "Section",
    "TaskConfig",
    "TraceConfig",
    "TrainerConfig",
    "Trainable",
    "WarmupConfig",
    "WatchdogConfig",
    "WeightsConfig",
    "import_string",
    "load_config",
    "parse_config",
]


class AsyncFlowConfig(Section):
    """The root of a run config. Each component receives only its own section."""

    run_name: str = Field(
        "run",
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Name of the run; used for the run directory and Ray names.",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for every random number generator of the run.")
    output_dir: str = Field("runs", min_length=1, description="Run directories are made under this folder.")
    run_dir_mode: Literal["timestamped", "stable"] = Field(
        "timestamped",
        description="timestamped: each `asyncflow run` makes a new output_dir/<run_name>-<time>; stable: "
        "the run directory is output_dir/<run_name>, and running the config again continues it from "
        "its last checkpoint (what a cluster job that may be retried or re-applied needs).",
    )
    start_timeout_s: float = Field(
        600.0,
        gt=0,
        le=86_400,
        description="How long the run waits for its actors to start (the cluster to offer the CPUs "
        "and GPUs they ask for) before it fails, naming the ones still pending.",
    )
    sigterm_grace_s: float = Field(
        25.0,
        ge=0,
        le=3600,
        description="On SIGTERM (job stop, eviction, node drain) the run stops at the next step boundary "
        "with a checkpoint; after this many seconds it exits without one.",
    )
    placement: Literal["split", "colocated"] = Field(
        "split",
        description="split: Ray places each actor wherever its resources are free. colocated: trainer "
        "rank i and rollout worker i share one placement-group bundle, so each pair runs on one node "
        "(sharing its GPU where their num_gpus add up to 1) and weights move within the node's shared "
        "memory; workers added later by scaling are placed freely.",
    )
    mode: Literal["async", "sync"] = Field(
        "async",
        description="async: workers stream, bounded by `staleness`; sync: generate -> reward -> train -> "
        "sync weights, strictly alternating (the baseline).",
    )
    staleness: int = Field(
        1,
        ge=0,
        le=1024,
        description="k: a sample trains while trainer_version - its version <= k (0: on-policy).",
    )
    admit_ahead: int | None = Field(
        None, ge=1, le=1024,
        description="Async: the source admits prompts only while the trainer has fewer than this many "
        "batches waiting (generated and scored, not yet trained), within the staleness bound; so a run "
        "whose trainer is the bottleneck trains fresher samples, and one whose rollout is keeps k. "
        "null: admit as far as the bound allows.",
    )  # fmt: skip
    policy: Literal["token", "flow"] = Field(
        "token",
        description="The kind of policy: a language model (token) or a flow-matching generator (flow, "
        "configured in `flow`); it selects the rows' fields, the engine and how log-probs are recomputed.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The policy's architecture.")
    flow: FlowConfig = Field(
        default_factory=FlowConfig, description="The flow-matching policy (policy: flow)."
    )
    task: TaskConfig = Field(default_factory=TaskConfig, description="Prompts and the reward function.")
    warmup: WarmupConfig = Field(default_factory=WarmupConfig, description="Supervised warm-start before RL.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout workers and sampling.")
    env: EnvConfig = Field(
        default_factory=EnvConfig, description="Multi-turn episodes with an environment (unset source: none)."
    )
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward workers.")
    reference: ReferenceConfig = Field(
        default_factory=ReferenceConfig, description="Reference log-probs (KL)."
    )
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="Loss, optimizer, checkpoints.")
    weights: WeightsConfig = Field(default_factory=WeightsConfig, description="The weight store.")
    trace: TraceConfig = Field(default_factory=TraceConfig, description="Spans of every actor: trace.json.")
    dataplane: DataPlaneConfig = Field(
        default_factory=DataPlaneConfig, description="The streaming data store."
    )
    watchdog: WatchdogConfig = Field(
        default_factory=WatchdogConfig, description="Stall detection and the timeouts of remote calls."
    )
    deploy: DeployConfig = Field(
        default_factory=DeployConfig, description="Ray job submission and Kubernetes; the run ignores it."
    )
    logging: LoggingConfig = Field(
        default_factory=LoggingConfig,
        description="Live metric sinks beside metrics.jsonl: Prometheus, Ray metrics, TensorBoard, W&B.",
    )

    def public(self) -> dict[str, Any]:
        """The config as it may be written to a run directory or printed: no secret in it."""
        data = self.model_dump(mode="json")
        data["dataplane"]["redis"] = self.dataplane.redis.public()
        return data

    @model_validator(mode="after")
    def _consistent(self) -> AsyncFlowConfig:
        is_flow_task = hasattr(import_string(self.task.source), "condition_dim")
        if is_flow_task != (self.policy == "flow"):
            kind = "flow" if is_flow_task else "token"
            raise ValueError(
                f"policy = {self.policy!r} but task.source {self.task.source!r} is a {kind} task; "
                f"set policy: {kind}, or pick a task of that kind"
            )
        memory = {"logprob_chunk_tokens": self.trainer.logprob_chunk_tokens,
                  "logprob_vocab_shards": self.trainer.logprob_vocab_shards > 1,
                  "gradient_checkpointing": self.trainer.gradient_checkpointing}  # fmt: skip
        on = [f"trainer.{k} = {getattr(self.trainer, k)}" for k, v in memory.items() if v]
        if self.policy == "flow" and on:
            raise ValueError(
                f"{', '.join(on)} applies to a token policy (a transformers model), but policy = 'flow'; "
                "remove it, the flow policy has no LM head or transformer blocks to save memory on"
            )
        truncated = self.rollout.top_k != 0 or self.rollout.top_p != 1.0
        if self.trainer.logprob_vocab_shards > 1 and truncated:
            raise ValueError(
                f"trainer.logprob_vocab_shards = {self.trainer.logprob_vocab_shards} merges pieces of the "
                f"vocabulary by online softmax, but rollout.top_k = {self.rollout.top_k}, top_p = "
                f"{self.rollout.top_p} sample from a truncation that needs the whole vocabulary row; set "
                "trainer.logprob_vocab_shards: 1 (logprob_chunk_tokens still bounds the logits), or "
                "rollout.top_k: 0 and top_p: 1"
            )
        if self.trainer.kl_coef > 0 and not self.reference.enabled:
            raise ValueError(
                f"trainer.kl_coef = {self.trainer.kl_coef} needs reference log-probs; "
                "set reference.enabled: true, or trainer.kl_coef: 0"
            )
        self._trainer_consistent()
        batch_rows = self.trainer.batch_prompts * self.rollout.n
        if self.dataplane.capacity_rows < batch_rows:
            raise ValueError(
                f"dataplane.capacity_rows = {self.dataplane.capacity_rows} cannot hold one training batch "
                f"(trainer.batch_prompts x rollout.n = {batch_rows} rows); raise it to at least "
                f"{(self.staleness + 1) * batch_rows} so rollout can run k = {self.staleness} steps ahead"
            )
        if self.policy == "flow" and isinstance(self.trainer.trainable, Lora):
            raise ValueError(
                "trainer.trainable: lora adapts a language model's linear layers; a flow policy trains "
                "all of its parameters or those trainer.trainable.patterns name"
            )
        if self.reward.overlong_buffer and self.policy == "flow":
            raise ValueError(
                "reward.overlong_buffer counts response tokens; a flow policy has none, set it to 0"
            )
        if self.reward.overlong_buffer > self.rollout.max_new_tokens:
            raise ValueError(
                f"reward.overlong_buffer = {self.reward.overlong_buffer} is longer than "
                f"rollout.max_new_tokens = {self.rollout.max_new_tokens}; the penalty ramps over the last "
                "tokens of it, so make it at most that"
            )
        if self.trainer.batch_prompts % self.trainer.minibatches:
            raise ValueError(
                f"trainer.batch_prompts = {self.trainer.batch_prompts} does not split into "
                f"trainer.minibatches = {self.trainer.minibatches}; make it a multiple"
            )
        return self

    @model_validator(mode="after")
    def _sections_fit_the_policy(self) -> AsyncFlowConfig:
        if self.flow.afm is not None and self.policy != "flow":
            raise ValueError(
                f"flow.afm is set (an Action Flow Matching run) but policy = {self.policy!r}; set policy: "
                "flow and task.source: asyncflow.tasks.robot:PointRobotTask, or unset flow.afm"
            )
        for section, autocast in (("trainer", self.trainer.autocast), ("rollout", self.rollout.autocast)):
            if autocast != "off" and self.policy != "token":
                raise ValueError(
                    f"{section}.autocast = {autocast!r} is for token policies, but policy = "
                    f"{self.policy!r}: a flow policy's Gaussian log-probs need float32 means; set "
                    f"{section}.autocast: off"
                )
        if self.env.source is not None and self.policy != "token":
            raise ValueError(
                f"env.source = {self.env.source!r} runs multi-turn episodes of a language model, but "
                f"policy = {self.policy!r}; unset env.source, or use policy: token"
            )
        positions, tokens = self.model.max_positions, self.env.max_episode_tokens
        if self.env.source is not None and self.model.path is None and tokens >= positions:
            raise ValueError(
                f"env.max_episode_tokens = {tokens} leaves no room for a prompt in the model's "
                f"model.max_positions = {positions}; lower it below {positions} (by the longest prompt), "
                "or raise model.max_positions"
            )
        return self

    def roles(self) -> dict[str, tuple[RoleResources, int]]:
        """The roles this run places on Ray, by name: each one's section (its resources per actor)
        and how many actors it runs."""
        roles = {"trainer": (self.trainer, self.trainer.num_ranks),
                 "rollout": (self.rollout, self.rollout.num_workers),
                 "reward": (self.reward, self.reward.num_workers)}  # fmt: skip
        if self.reference.enabled:
            roles["reference"] = (self.reference, 1)
        if self.env.source is not None:  # environment actors: env.num_workers per rollout worker
            roles["env"] = (self.env, self.env.num_workers * self.rollout.num_workers)
        return roles

    def resources_needed(self) -> dict[str, float]:
        """Ray resources the run's actors reserve, summed over them: CPU, and GPU, memory (bytes)
        and custom resources where a role asks for them (Ray must offer at least this much)."""
        d = self.dataplane
        # the prompt source and the weight store: 0.1 CPUs each
        need = {"CPU": 0.2 + d.controller_num_cpus + d.storage_num_cpus * d.num_storage_units}
        for section, actors in self.roles().values():
            for name, amount in section.bundle().items():
                need[name] = need.get(name, 0.0) + amount * actors
        return need

    def bundles(self) -> list[dict[str, float]]:
        """The run's placement-group bundles (Ray's resource names): placement: colocated, bundle i
        holds trainer rank i and rollout worker i (where each exists); split, one per trainer rank
        when there are several (packed onto few nodes); else none."""
        t, r = self.trainer, self.rollout
        if self.placement == "split":
            return [t.bundle()] * t.num_ranks if t.num_ranks > 1 else []
        pairs = range(max(t.num_ranks, r.num_workers))
        return [summed([t.bundle()] * (i < t.num_ranks) + [r.bundle()] * (i < r.num_workers)) for i in pairs]

    def _trainer_consistent(self) -> None:
        """The trainer's ranks, critic and GPUs against the rest of the run."""
        if self.policy == "flow" and self.trainer.estimator == "gae":
            raise ValueError(
                "trainer.estimator = 'gae' needs a value model of the policy's transformer; a flow "
                "policy has none; use a group estimator (grpo, drgrpo, rloo, reinforce++)"
            )
        t = self.trainer
        if t.num_ranks > t.batch_prompts:
            raise ValueError(
                f"trainer.num_ranks = {t.num_ranks} ranks for trainer.batch_prompts = {t.batch_prompts} "
                "groups: each rank reads whole groups from the store; raise batch_prompts or lower num_ranks"
            )
        for bundle in self.bundles():
            if bundle.get("GPU", 0) > 1 and bundle["GPU"] % 1:
                raise ValueError(
                    f"placement = 'colocated' puts trainer.num_gpus = {t.num_gpus:g} and rollout.num_gpus = "
                    f"{self.rollout.num_gpus:g} on one bundle, {bundle['GPU']:g} GPUs: Ray gives a bundle a "
                    "fraction of one GPU or whole GPUs; make their sum at most 1 or a whole number"
                )
        gpus = {f"{role}.num_gpus = {s.num_gpus:g}" for role, (s, _) in self.roles().items() if s.num_gpus}
        if gpus and self.policy == "flow":
            raise ValueError(
                f"{', '.join(sorted(gpus))}: flow policies run on the CPU (their models are small MLPs); "
                "set num_gpus: 0"
            )
        if t.num_gpus and (t.num_ranks > 1 or t.estimator == "gae"):
            what = f"trainer.num_ranks = {t.num_ranks}" if t.num_ranks > 1 else "trainer.estimator = 'gae'"
            raise ValueError(
                f"trainer.num_gpus = {t.num_gpus:g} with {what}: a trainer on a GPU runs as one rank "
                "without a critic today (its ranks join by gloo, its critic stays on the CPU); set "
                "trainer.num_ranks: 1 and a group estimator, or trainer.num_gpus: 0"
            )
        if t.num_ranks > 1 and t.parallel == "fsdp" and isinstance(t.trainable, Lora):
            raise ValueError(
                "trainer.trainable = {lora: ...} with trainer.parallel = 'fsdp': publishing merges each "
                "adapter into its whole base weight, which FSDP holds in shards; set trainer.parallel: ddp"
            )


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> AsyncFlowConfig:
    """Read `path` (YAML), apply `a.b.c=value` overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror}. Check the path.") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e}). Fix the syntax at the position shown.") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, got {type(data).__name__}. "
            "Start the file with keys such as `run_name:` and `dataplane:`."
        )
    for item in overrides:
        apply_override(data, item)
    return parse_config(data, source=str(path))


def parse_config(data: dict[str, Any], source: str = "<config>") -> AsyncFlowConfig:
    """Validate a plain dict; every error found is reported at once."""
    try:
        return AsyncFlowConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from None


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` (the value read as YAML) in the plain config dict `data`."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key.path=value, e.g. dataplane.lease_s=30")
    node = data
    *parents, leaf = key.strip().split(".")
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {name!r} is a value, not a section, so it has no {leaf!r}")
        node = child
    try:
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(
            f"override {item!r}: the value {raw!r} is not valid YAML ({problem}); write a YAML value "
            f"(e.g. {key.strip()}=[1, 2] or {key.strip()}=text), quoting text that starts with [, {{ or :"
        ) from None


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"{source}: {error.error_count()} invalid setting(s)"]
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        value = err.get("input")
        if isinstance(value, dict):  # a rule across fields of a section: its message names them
            lines.append(f"  {where}: {err['msg']}")  # (the section's values may hold a secret)
            continue
        if err["type"] == "extra_forbidden":
            fix = f"remove `{where}` or check its spelling against the documented fields"
            lines.append(f"  {where}: unknown field (value {value!r}); fix: {fix}")
            continue
        field = _field_info(where)
        hint = f" ({field.description})" if field is not None and field.description else ""
        lines.append(
            f"  {where} = {value!r}: {err['msg']}{hint}; fix: set `{where}` to a valid value "
            f"in {source} or with --set {where}=..."
        )
    return "\n".join(lines)


def _field_info(path: str):
    model: type[Section] | None = AsyncFlowConfig
    info = None
    for name in path.split("."):
        if model is None or name not in model.model_fields:
            return None
        info = model.model_fields[name]
        ann = info.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, Section) else None
    return info
