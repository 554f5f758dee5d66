"""The vLLM rollout engine: vLLM's scheduler, KV cache and kernels behind the engine protocol.

vLLM runs inside this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): its engine core,
scheduler and model live in the rollout actor, and an asyncio task of this class steps
them, one scheduler step at a time, yielding to the event loop between steps. (vLLM 0.32's
`AsyncLLM` always starts its engine core in a child process: ~18-30 s to start on CPU,
and weights would cross a socket. In process it starts in ~3 s and takes weights as
tensors.) Because the loop yields only between steps, every pause, weight update and
close lands on a step boundary. With tensor parallelism (`tensor_parallel_size` > 1) the
engine core stays here and the model's shards run in vLLM's worker processes, one per GPU
(or per share of the CPU cores); weight updates reach each through collective_rpc.

- Sampling: each of a request's n samples is one vLLM request (vLLM fans `n` out the same
  way); prefix caching shares the prompt's KV between them, and the requests of concurrent
  generate() calls are batched together step by step (continuous batching).
- Log-probs: vLLM's `processed_logprobs` mode, the log-prob of the sampled token under the
  distribution it was drawn from (after temperature, top-k and top-p), as the torch engine
  records it and the trainer recomputes it (`token_logprobs` at the rollout temperature).
- Versions: vLLM labels each step's output with the engine's weight version
  (`set_weight_version`), and a finished completion carries the spans of tokens each
  label produced; they become the per-token versions.
- update_weights: between two steps, so it is pause -> swap -> resume. vLLM's layerwise
  `reload_weights` worker method copies all the named tensors into the live model in one
  call (`model.load_weights` alone fails once the CPU kernels have repacked the weights),
  then the prefix cache is emptied so no later request reuses KV written by the old
  weights, then the version label moves on. A partial update (some tensors: a model trained
  in part) is applied as it is, except that vLLM rebuilds each layer it touches from the
  tensors it is given alone (a weight and its bias; the shards of a fused layer: qkv_proj
  from q, k, v), so a tensor left out would come back as uninitialised memory (measured:
  q and v alone put log-probs 0.05 off). With `partial_updates` the engine keeps a copy of the
  tensors of every layer of several tensors, as last loaded, and completes the layers an
  update touches in part.
  The requests in flight (`on_update`):
    keep   they continue. The running ones are preempted, so at the next step vLLM
           recomputes their KV cache (prompt + tokens so far) under the new weights, and
           their later tokens carry the new version: as with the torch engine's
           re-prefill, no token of version v+1 reads keys or values that v wrote.
    abort  they are aborted and requeued from their prompts; every token of their
           completions then comes from the new weights (tokens sampled before are dropped).

- Scheduling (`policy`): "fcfs" is vLLM's default. "rl" runs vLLM's priority scheduler with
  prefix caching; each request's priority is the caller's RL key (Request.priority) or its
  own (n samples, the version loaded), packed into vLLM's integer (smaller first, ties by
  arrival). vLLM 0.32 fixes a request's priority at submission, admits waiting requests in
  its order and, when a running request needs a KV block and none is free, preempts the
  lowest-priority running one (it does not preempt for a waiting request) and recomputes
  its KV later (what prefix caching still holds is reused).

The engine knows nothing about tokenization, the data store or Ray: token ids in, token
ids out. It loads the model from a Hugging Face directory (services.models.save_model
writes one). Its host process is vLLM's: vLLM seeds the global RNGs with `seed`, and its
CPU worker turns `torch.set_num_threads` into a no-op, so set threads before building it.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from services.serving.optimal import matmul_flops
from services.serving.protocol import Completion, FinishReason, Request, check_fits
from services.serving.scheduler import POLICIES, Policy, priority_key, vllm_priority

__all__ = ["OnUpdate", "VLLMEngine"]

OnUpdate = Literal["keep", "abort"]


@dataclass
class _Sample:
    """One response being generated: which request and sample it is, and where it goes."""

    request: Request
    index: int
    done: asyncio.Future
    vllm_id: str = ""


class VLLMEngine:
    """Engine protocol implementation over vLLM's in-process engine (CPU build or GPU build)."""

    batches_calls = True  # concurrent generate() calls share its decode steps: a call per group costs nothing

    def __init__(
        self,
        model_dir: str | Path,
        *,
        eos_token_id: int,
        version: int = 0,
        seed: int = 0,
        on_update: OnUpdate = "keep",
        max_num_seqs: int = 256,
        kv_cache_gib: float = 0.25,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        partial_updates: bool = False,
        policy: Policy = "fcfs",
        tensor_parallel_size: int = 1,
    ) -> None:
        model_dir = _check_args(model_dir, on_update, policy)
        from transformers import AutoConfig

        # transformers maps each architecture's names (GPT-2's n_positions is max_position_embeddings)
        config = AutoConfig.from_pretrained(model_dir)
        self._max_positions = int(config.max_position_embeddings)
        self._vocab_size = int(config.vocab_size)
        self._shapes = _checkpoint_shapes(model_dir)
        embedding = next((n for n in _EMBEDDINGS if n in self._shapes), None)
        if getattr(config, "tie_word_embeddings", False) and embedding is not None:
            self._shapes.setdefault("lm_head.weight", self._shapes[embedding])  # saved once, as the embedding
        self._engine: Any = _start_vllm(
            model_dir, dtype, seed, self._max_positions, max_num_seqs, kv_cache_gib, policy,
            tensor_parallel_size,
        )  # fmt: skip
        self.policy = policy
        self._engine.set_weight_version(str(version))
        mapping = self._engine.collective_rpc(
            lambda worker: dict(getattr(worker.get_model(), "packed_modules_mapping", {}))
        )
        self._layers = _layers(self._shapes, mapping[0])  # name -> the names of its vLLM layer
        # Copies of the tensors of layers of several tensors (host memory), for partial updates.
        self._held = _read_tensors(model_dir, self._layers) if partial_updates else None
        self.version = version
        self.on_update = on_update
        self.stats: dict[str, float] = {
            "tokens_generated": 0, "generate_s": 0.0, "requests": 0, "steps": 0, "weight_updates": 0,
            "update_s": 0.0,
            "optimal_tokens_per_s": _bound(self._shapes, dtype),
        }  # fmt: skip
        self._eos = eos_token_id
        self._samples: dict[str, _Sample] = {}  # vLLM request id -> the sample it generates
        self._next_id = 0
        self._driver: asyncio.Task | None = None
        self._unpaused = asyncio.Event()
        self._unpaused.set()

    # ---------------------------------------------------------------- protocol

    async def generate(self, requests: Sequence[Request]) -> list[Completion]:
        self._open()
        for request in requests:
            check_fits(request, max_positions=self._max_positions, vocab_size=self._vocab_size)
        loop = asyncio.get_running_loop()
        samples = [_Sample(r, i, loop.create_future()) for r in requests for i in range(r.n)]
        for sample in samples:
            self._submit(sample)
        if self._driver is None or self._driver.done():
            self._driver = asyncio.ensure_future(self._drive())
        started = time.perf_counter()
        try:
            completions = list(await asyncio.gather(*(s.done for s in samples)))
        except asyncio.CancelledError:  # the caller gave up: free the engine of its requests
            self._abort([s for s in samples if s.vllm_id in self._samples])
            raise
        self.stats["generate_s"] += time.perf_counter() - started
        self.stats["tokens_generated"] += sum(len(c.response_ids) for c in completions)
        self.stats["requests"] += len(requests)
        return completions

    async def update_weights(self, version: int, tensors: Mapping[str, torch.Tensor]) -> None:
        engine = self._open()
        unknown = sorted(name for name in tensors if name not in self._shapes)
        mismatched = [
            f"{name}: got {tuple(t.shape)}, expected {self._shapes[name]}"
            for name, t in tensors.items()
            if name in self._shapes and tuple(t.shape) != self._shapes[name]
        ]
        if unknown or mismatched:
            raise ValueError(
                f"update_weights(version={version}): unknown names {unknown}, shape mismatches {mismatched}; "
                "send tensors named and shaped as in model.state_dict(). No weight was changed."
            )
        tensors = self._whole_layers(version, tensors)
        start = time.perf_counter()
        requeue = list(self._samples.values()) if self.on_update == "abort" else []
        self._abort(requeue)
        # No await from here to the end: the driver cannot step while the weights change.
        engine.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": list(tensors.items()), "is_checkpoint_format": True}
        )
        # Preempts the running requests (their KV is recomputed under the new weights) and
        # empties the prefix cache.
        if not engine.reset_prefix_cache(reset_running_requests=True):
            raise RuntimeError(f"update_weights(version={version}): vLLM could not reset its prefix cache")
        engine.set_weight_version(str(version))
        self.version = version
        if self._held is not None:
            for name, t in tensors.items():
                if name in self._held:
                    self._held[name].copy_(t)
        for sample in requeue:
            self._submit(sample)
        self.stats["weight_updates"] += 1
        self.stats["update_s"] += time.perf_counter() - start

    def _whole_layers(self, version: int, tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """`tensors` with the held copies of what they leave out of a vLLM layer they touch."""
        missing = sorted({m for n in tensors for m in self._layers.get(n, ()) if m not in tensors})
        if not missing:
            return tensors
        if self._held is None:
            raise ValueError(
                f"update_weights(version={version}): the update leaves out {missing[:4]} ({len(missing)} in "
                "all), tensors of vLLM layers it updates in part, and vLLM rebuilds a layer from the tensors "
                "it is given alone; send whole layers, or build the engine with partial_updates=True. "
                "No weight was changed."
            )
        return {**tensors, **{m: self._held[m] for m in missing}}

    async def pause(self) -> None:
        # The driver checks the event before each step, so no step starts after this returns.
        self._open()
        self._unpaused.clear()

    async def resume(self) -> None:
        self._open()
        self._unpaused.set()

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is None:
            return
        pending = list(self._samples.values())
        engine.abort_request([s.vllm_id for s in pending])
        self._samples.clear()
        for s in pending:
            if not s.done.done():
                s.done.set_result(_completion(s, [], [], [], "abort"))
        self._unpaused.set()  # a paused driver wakes, sees the engine closed and returns
        engine.engine_core.shutdown()  # frees the model and KV cache, tears down vLLM's process group

    # ---------------------------------------------------------------- driving vLLM

    def _open(self) -> Any:
        if self._engine is None:
            raise RuntimeError("VLLMEngine is closed; build a new engine to generate again")
        return self._engine

    def _submit(self, sample: _Sample) -> None:
        from vllm import SamplingParams as VLLMParams
        from vllm.sampling_params import RequestOutputKind

        p = sample.request.params
        self._next_id += 1
        sample.vllm_id = str(self._next_id)  # fresh on every (re)submission: requeued samples too
        self._samples[sample.vllm_id] = sample
        self._engine.add_request(
            sample.vllm_id,
            {"prompt_token_ids": list(sample.request.prompt_ids)},
            VLLMParams(
                temperature=p.temperature,
                top_p=p.top_p,
                top_k=p.top_k,
                max_tokens=p.max_new_tokens,
                stop_token_ids=[self._eos, *p.stop_token_ids],
                logprobs=0,
                detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,
            ),
            priority=self._priority(sample.request),
        )

    def _priority(self, request: Request) -> int:
        """vLLM's priority (smaller first, ties by arrival): the caller's RL key, else the request's
        own (its n samples, the version now loaded). vLLM fixes it at submission."""
        if self.policy == "fcfs":
            return 0
        key = request.priority or priority_key(remaining=request.n, version=self.version, arrival=0)
        return vllm_priority(key)

    def _abort(self, samples: list[_Sample]) -> None:
        if samples and self._engine is not None:
            self._engine.abort_request([s.vllm_id for s in samples])
        for s in samples:
            self._samples.pop(s.vllm_id, None)

    async def _drive(self) -> None:
        """Step vLLM while it has work, yielding to the event loop between steps."""
        try:
            while self._samples:
                await self._unpaused.wait()
                if self._engine is None:
                    return
                outputs = self._engine.step()
                self.stats["steps"] += 1
                for out in outputs:
                    sample = self._samples.pop(out.request_id, None)
                    if sample is not None and not sample.done.done():
                        sample.done.set_result(self._finished(sample, out.outputs[0]))
                await asyncio.sleep(0)
        except Exception as e:  # the failure belongs to the callers waiting on these samples
            waiting = [s for s in self._samples.values() if not s.done.done()]
            self._samples.clear()
            for sample in waiting:
                sample.done.set_exception(e)
            if not waiting:
                raise

    def _finished(self, sample: _Sample, out: Any) -> Completion:
        tokens = list(out.token_ids)
        logprobs = [out.logprobs[j][t].logprob for j, t in enumerate(tokens)]
        versions = [
            int(span.version) for span in out.weight_versions or [] for _ in range(span.start, span.end)
        ]
        if len(versions) != len(tokens):
            raise RuntimeError(
                f"vLLM labelled {len(versions)} of {len(tokens)} tokens with a weight version; "
                "the engine sets a label at start, so this is a vLLM change to report"
            )
        reason: FinishReason = out.finish_reason if out.finish_reason in ("stop", "length") else "abort"
        return _completion(sample, tokens, logprobs, versions, reason)


def _completion(
    sample: _Sample, tokens: list[int], logprobs: list[float], versions: list[int], reason: FinishReason
) -> Completion:
    return Completion(
        request_id=sample.request.request_id,
        index=sample.index,
        prompt_ids=list(sample.request.prompt_ids),
        response_ids=tokens,
        logprobs=logprobs,
        versions=versions,
        finish_reason=reason,
    )


# The input embedding's name in the Llama / Qwen2 and GPT-2 families: a tied LM head is saved as it.
_EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight")


def _checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the directory's safetensors files (headers only)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    if not shapes:
        raise ValueError(f"VLLMEngine: {model_dir} holds no *.safetensors weights; save the model there")
    return shapes


def _layers(names: Mapping[str, Any], packed: Mapping[str, list[str]]) -> dict[str, tuple[str, ...]]:
    """Checkpoint name -> every checkpoint name vLLM loads into the same layer, for layers of more
    than one tensor: a weight and its bias, and the shards of a fused layer (`packed`, the model's
    packed_modules_mapping: q, k and v weights and biases all go to qkv_proj)."""
    fused = {shard: layer for layer, shards in packed.items() for shard in shards}
    groups: dict[str, list[str]] = {}
    for name in names:
        parent, dot, leaf = name.rpartition(".")[0].rpartition(".")
        groups.setdefault(f"{parent}{dot}{fused.get(leaf, leaf)}", []).append(name)
    return {name: tuple(group) for group in groups.values() if len(group) > 1 for name in group}


def _read_tensors(model_dir: Path, names: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The named tensors of the directory's safetensors files, read into memory."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys() if name in names})
    return out


def _check_args(model_dir: str | Path, on_update: str, policy: str) -> Path:
    """The engine's arguments checked: each wrong one named with what is expected."""
    _check_policy(policy)
    if on_update not in ("keep", "abort"):
        raise ValueError(
            f"VLLMEngine: on_update={on_update!r}, expected 'keep' (pause, swap, resume) or 'abort' "
            "(abort and requeue the requests in flight)"
        )
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(
            f"VLLMEngine: {model_dir} has no config.json; pass a Hugging Face model directory "
            "(services.models.save_model writes one)"
        )
    return model_dir


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(
            f"VLLMEngine: policy={policy!r}, expected one of {POLICIES} ('rl' runs vLLM's priority "
            "scheduler with the RL priority of services.serving.scheduler)"
        )


def _bound(shapes: Mapping[str, tuple[int, ...]], dtype: str) -> float:
    """NanoFlow's bound for the checkpoint: measured matmul FLOP/s / (2 * parameters)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return matmul_flops(device, getattr(torch, dtype)) / (2 * sum(math.prod(s) for s in shapes.values()))


def _start_vllm(
    model_dir: Path, dtype: Literal["float32", "bfloat16", "float16"], seed: int, max_positions: int,
    max_num_seqs: int, kv_cache_gib: float, policy: Policy, tensor_parallel_size: int = 1,
) -> Any:  # fmt: skip
    """vLLM's engine in this process, token ids in and out, log-probs of what it sampled from;
    with tensor parallelism its model runs in that many worker processes (vLLM's multiprocessing
    executor), which take the weight updates through collective_rpc like the in-process one."""
    # In process, or the weights could not be handed over as tensors (see the module doc).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never ask the hub
    if tensor_parallel_size > 1 and not torch.cuda.is_available():
        bind_cores(tensor_parallel_size)
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    args = EngineArgs(
        model=str(model_dir),
        dtype=dtype,
        seed=seed,
        max_model_len=max_positions,
        max_num_seqs=max_num_seqs,
        kv_cache_memory_bytes=int(kv_cache_gib * 2**30),  # VLLM_CPU_KVCACHE_SPACE, if set, wins
        logprobs_mode="processed_logprobs",
        skip_tokenizer_init=True,  # token ids in and out
        generation_config="vllm",  # sampling comes from the request alone, not the model dir
        disable_log_stats=True,
        # RL priorities: vLLM's priority scheduler (waiting requests admitted by priority; under KV
        # pressure the lowest-priority running one is preempted) with prefix caching, so a
        # preempted request finds what is left of its prefix's KV.
        scheduling_policy="priority" if policy == "rl" else "fcfs",
        enable_prefix_caching=True
        if policy == "rl"
        else None,  # per-step Prometheus bookkeeping; self.stats counts what we report
        # CPU: no compile step, start in seconds. GPU: vLLM's default torch.compile + CUDA graphs.
        enforce_eager=not torch.cuda.is_available(),
        tensor_parallel_size=tensor_parallel_size,
        distributed_executor_backend="mp" if tensor_parallel_size > 1 else None,  # None: in this process
    )
    return LLMEngine.from_engine_args(args)


def bind_cores(workers: int) -> None:
    """vLLM's CPU workers bound to this process's cores, split evenly ("0|1" for two workers on
    two cores), unless VLLM_CPU_OMP_THREADS_BIND says otherwise (vLLM's own choice needs a NUMA
    node per worker)."""
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        raise ValueError(
            f"rollout.vllm.tensor_parallel_size = {workers} binds a vLLM worker to at least one core each, "
            f"but this process may run on {len(cores)} ({cores}); lower it, or give the rollout worker "
            "more cores"
        )
    share = len(cores) // workers
    groups = [cores[i * share : (i + 1) * share] for i in range(workers)]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, g)) for g in groups)
