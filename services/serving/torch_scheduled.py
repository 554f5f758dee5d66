"""The scheduled torch engine: continuous batching under a KV budget, RL priorities and preemption
that keeps the preempted KV on the host.

Every sequence (one sample of one request) is either waiting, running (its keys and values
are rows of the batch's KV cache) or preempted (its keys and values copied to host memory).
Each step, `services.serving.scheduler.plan_step` picks the sequences that decode, in
priority order, within `kv_budget_tokens` cached tokens and `max_batch_size` rows; the
lowest-priority running sequences leave the batch when the budget runs short or a waiting
sequence outranks them. A preempted sequence comes back with its KV restored from the host
(FastSwitch's swap, at sequence granularity), so its prefix is not recomputed; with
`keep_kv=False` it is recomputed, as vLLM's default preemption does, and the recomputed
tokens are counted.

A sequence's cache always covers its tokens but the last, which is fed at the next decode:
a new sequence is prefilled with prompt[:-1], so admission, restore and decode are one path
and a restored row computes exactly what the uninterrupted row would.

Weight updates land between steps. All cached KV (batch and host) was written by the old
weights, so it is dropped and every sequence is re-prefilled under the new ones (counted as
recomputed): no decode step mixes weight versions.

The engine knows nothing about tokenization, the data store or Ray.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from services.serving.optimal import optimal_tokens_per_s
from services.serving.protocol import Completion, FinishReason, InProcessEngine, Request, check_fits
from services.serving.scheduler import POLICIES, Policy, Slot, fcfs_priority, plan_step, priority_key
from services.serving.torch_engine import sample_tokens

__all__ = ["ScheduledTorchEngine"]

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each (1, H, T, D)


@dataclass
class _Group:
    """The samples of one request: how many are unfinished, and the version it arrived at."""

    remaining: int
    version: int
    arrival: int


@dataclass(eq=False)  # identity: two sequences are never the same one
class _Seq:
    request: Request
    index: int
    group: _Group
    done: asyncio.Future
    tokens: list[int]  # prompt + generated; the cache covers all but the last
    prompt_len: int
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    kv: KV | None = None  # host (or device) copy while not in the batch
    kv_epoch: int = -1
    computed: int = 0  # tokens whose KV was computed at least once (a recompute redoes these)

    @property
    def stop(self) -> tuple[int, ...]:
        return self.request.params.stop_token_ids


class ScheduledTorchEngine(InProcessEngine):
    """Engine protocol implementation with a step scheduler over an in-process transformers model."""

    batches_calls = True  # concurrent generate() calls share its decode steps: a call per group costs nothing

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        eos_token_id: int,
        pad_token_id: int,
        version: int = 0,
        seed: int = 0,
        max_batch_size: int = 256,
        kv_budget_tokens: int = 1 << 16,
        policy: Policy = "rl",
        keep_kv: bool = True,
        turn_cache_tokens: int = 0,
        autocast: str = "off",
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"ScheduledTorchEngine: policy={policy!r}, expected one of {POLICIES}")
        if max_batch_size < 1 or kv_budget_tokens < 1:
            raise ValueError(
                f"ScheduledTorchEngine: max_batch_size={max_batch_size}, "
                f"kv_budget_tokens={kv_budget_tokens}; both must be >= 1"
            )
        super().__init__(model, version, autocast)
        self.max_batch_size, self.kv_budget_tokens = max_batch_size, kv_budget_tokens
        self.policy, self.keep_kv = policy, keep_kv
        self._turns = _TurnCache(turn_cache_tokens)  # finished sequences' KV, for the next turn
        self.stats: dict[str, float] = dict.fromkeys(
            ("tokens_generated", "generate_s", "requests", "steps", "preemptions", "restores",
             "recomputed_tokens", "prefill_tokens", "host_kv_bytes", "forward_s", "schedule_s", "plan_s",
             "reused_tokens"), 0
        )  # fmt: skip
        self.stats["optimal_tokens_per_s"] = optimal_tokens_per_s(model)  # NanoFlow's bound, measured
        # per step: (rows decoded, KV tokens they attend to, tokens prefilled, seconds of the whole step)
        self.step_log: list[tuple[int, int, int, float]] = []
        self._eos, self._pad = eos_token_id, pad_token_id
        self._device = next(model.parameters()).device
        self._max_positions = int(model.config.max_position_embeddings)
        self._vocab_size = int(model.config.vocab_size)
        self._generator = torch.Generator(device=self._device).manual_seed(seed)
        self._cache_arg = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )
        self._epoch = 0  # bumped by every weight update; KV of an older epoch is stale
        self._arrivals = 0
        self._live: list[_Seq] = []  # unfinished sequences, any state
        self._batch: list[_Seq] = []  # running, in cache row order
        self._cache: KV = []  # per layer (B, H, T, D), rows right-aligned
        self._mask = torch.zeros((0, 0), dtype=torch.long)  # (B, T) 1 for real cached tokens
        self._driver: asyncio.Task | None = None

    # ---------------------------------------------------------------- protocol

    async def generate(self, requests: Sequence[Request]) -> list[Completion]:
        self._open_model()
        for request in requests:
            check_fits(request, max_positions=self._max_positions, vocab_size=self._vocab_size)
            need = len(request.prompt_ids) + request.params.max_new_tokens
            if need > self.kv_budget_tokens:
                raise ValueError(
                    f"Request {request.request_id!r}: prompt + max_new_tokens = {need} KV tokens exceeds "
                    f"kv_budget_tokens={self.kv_budget_tokens}; raise the budget or lower max_new_tokens"
                )
        loop, started = asyncio.get_running_loop(), time.perf_counter()
        seqs = []
        for request in requests:
            group = _Group(request.n, self.version, self._arrivals)
            self._arrivals += 1
            for index in range(request.n):
                prompt = list(request.prompt_ids)
                seqs.append(_Seq(request, index, group, loop.create_future(), prompt, len(prompt)))
        self._live += seqs
        if self._driver is None or self._driver.done():
            self._driver = asyncio.ensure_future(self._drive())
        try:
            completions = list(await asyncio.gather(*(s.done for s in seqs)))
        except asyncio.CancelledError:  # the caller gave up: free the engine of its sequences
            self._evict(seqs, keep=False)
            self._live = [s for s in self._live if s not in seqs]
            raise
        self.stats["generate_s"] += time.perf_counter() - started
        self.stats["tokens_generated"] += sum(len(c.response_ids) for c in completions)
        self.stats["requests"] += len(requests)
        return completions

    async def update_weights(self, version: int, tensors: Mapping[str, torch.Tensor]) -> None:
        await super().update_weights(version, tensors)
        self._epoch += 1
        self._turns.clear()  # written by the old weights

    async def close(self) -> None:
        await super().close()
        for seq in self._live:
            if not seq.done.done():
                seq.done.set_result(self._completion(seq, "abort"))
        self._live, self._batch, self._cache = [], [], []

    # ---------------------------------------------------------------- the loop

    async def _drive(self) -> None:
        try:
            while self._live:
                await asyncio.sleep(0)
                await self._unpaused.wait()
                if self._model is None:
                    return
                self._step()
        except Exception as e:  # the failure belongs to the callers waiting on these sequences
            for seq in self._live:
                if not seq.done.done():
                    seq.done.set_exception(e)
            self._live, self._batch, self._cache = [], [], []

    def key(self, seq: _Seq) -> tuple[int, ...]:
        rank = priority_key if self.policy == "rl" else fcfs_priority
        group = seq.group
        base = seq.request.priority if self.policy == "rl" and seq.request.priority else ()
        own = rank(remaining=group.remaining, version=group.version, arrival=group.arrival)
        return (*base, *own, seq.index)

    def _step(self) -> None:
        started, prefilled = time.perf_counter(), self.stats["prefill_tokens"]
        if self._batch and self._cache_epoch != self._epoch:
            self._evict(self._batch, keep=False)  # written by the old weights
        in_batch = {id(s) for s in self._batch}
        slots = [Slot(self.key(s), len(s.tokens), id(s) in in_batch) for s in self._live]
        plan = plan_step(slots, budget_tokens=self.kv_budget_tokens, max_rows=self.max_batch_size)
        self.stats["plan_s"] += time.perf_counter() - started  # the host-side decision alone
        preempt = [self._live[i] for i in plan.preempt]
        self.stats["preemptions"] += len(preempt)
        self._evict(preempt, keep=self.keep_kv)
        admit = [self._live[i] for i in plan.admit]
        if admit:
            self._admit(admit)
        self.stats["schedule_s"] += time.perf_counter() - started
        rows, prefilled = len(self._batch), int(self.stats["prefill_tokens"] - prefilled)
        kv_tokens = self._decode()
        self.step_log.append((rows, kv_tokens, prefilled, time.perf_counter() - started))

    @property
    def _cache_epoch(self) -> int:
        return self._batch[0].kv_epoch if self._batch else self._epoch

    def _evict(self, seqs: list[_Seq], *, keep: bool) -> None:
        """Take `seqs` out of the batch; their KV goes to the host (keep) or is dropped."""
        leaving = {id(s) for s in seqs}
        if not leaving & {id(s) for s in self._batch}:
            return
        for row, seq in enumerate(self._batch):
            if id(seq) in leaving:
                kept = _row(self._cache, row, len(seq.tokens) - 1)
                seq.kv = [(k.to("cpu", copy=True), v.to("cpu", copy=True)) for k, v in kept] if keep else None
                if keep:
                    self.stats["host_kv_bytes"] += sum(k.nbytes + v.nbytes for k, v in seq.kv or [])
        self._rebuild([s for s in self._batch if id(s) not in leaving], [])

    def _admit(self, seqs: list[_Seq]) -> None:
        """Bring `seqs` into the batch: KV restored from the host when still valid, else prefilled."""
        restore = [s for s in seqs if s.kv is not None and s.kv_epoch == self._epoch]
        prefill = [s for s in seqs if not (s.kv is not None and s.kv_epoch == self._epoch)]
        self.stats["restores"] += len(restore)
        fresh = [[(k.to(self._device), v.to(self._device)) for k, v in s.kv or []] for s in restore]
        for seq in [s for s in prefill if not s.computed]:  # a new turn that extends a finished one
            found = self._turns.take(seq.tokens[:-1])
            if found is not None:
                prefill.remove(seq)
                restore.append(seq)
                fresh.append(self._extend(seq, *found))
        if prefill:
            fresh += self._prefill(prefill)
        self._rebuild(self._batch, list(zip(restore + prefill, fresh)))

    @torch.inference_mode()
    def _prefill(self, seqs: list[_Seq]) -> list[KV]:
        """Each sequence's KV over its tokens but the last."""
        for seq in seqs:
            self.stats["recomputed_tokens"] += seq.computed
            self.stats["prefill_tokens"] += len(seq.tokens) - 1
            seq.computed = len(seq.tokens) - 1
        width = max(len(s.tokens) - 1 for s in seqs)
        if width == 0:
            return [self._empty_kv() for _ in seqs]
        ids = torch.full((len(seqs), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            n = len(seq.tokens) - 1
            if n:
                ids[i, width - n :] = torch.tensor(seq.tokens[:-1])
                mask[i, width - n :] = 1
        cache = DynamicCache(config=self._open_model().config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        self._open_model()(
            input_ids=ids.to(self._device), attention_mask=mask.to(self._device),
            position_ids=positions.to(self._device), use_cache=True, logits_to_keep=1,
            **{self._cache_arg: cache},
        )  # fmt: skip
        layers = _layers(cache)
        return [
            [(k[i : i + 1, :, width - n :], v[i : i + 1, :, width - n :]) for k, v in layers]
            for i, n in enumerate(len(s.tokens) - 1 for s in seqs)
        ]

    @torch.inference_mode()
    def _extend(self, seq: _Seq, cached: int, kv: KV) -> KV:
        """`seq`'s KV from a finished turn's KV over its first `cached` tokens plus a prefill of the rest."""
        self.stats["reused_tokens"] += cached
        rest = seq.tokens[cached:-1]
        seq.computed = len(seq.tokens) - 1
        kv = [(k.to(self._device), v.to(self._device)) for k, v in kv]
        if not rest:
            return kv
        self.stats["prefill_tokens"] += len(rest)
        model = self._open_model()
        cache = DynamicCache(ddp_cache_data=kv, config=model.config)
        positions = torch.arange(cached, cached + len(rest), device=self._device)[None]  # (1, R)
        model(
            input_ids=torch.tensor([rest], device=self._device), position_ids=positions, use_cache=True,
            attention_mask=torch.ones((1, cached + len(rest)), dtype=torch.long, device=self._device),
            logits_to_keep=1, **{self._cache_arg: cache},
        )  # fmt: skip
        return _layers(cache)

    def _empty_kv(self) -> KV:
        config = self._open_model().config
        heads = int(getattr(config, "num_key_value_heads", config.num_attention_heads))
        dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        empty = torch.zeros((1, heads, 0, dim), device=self._device)
        return [(empty, empty) for _ in range(config.num_hidden_layers)]

    def _rebuild(self, staying: list[_Seq], joining: list[tuple[_Seq, KV]]) -> None:
        """The batch cache of `staying` (rows of the current cache) and `joining` (their own KV)."""
        parts: list[tuple[_Seq, KV]] = []
        keep = {id(s) for s in staying}
        for row, seq in enumerate(self._batch):
            if id(seq) in keep:
                parts.append((seq, _row(self._cache, row, len(seq.tokens) - 1)))
        parts += joining
        self._batch = [seq for seq, _ in parts]
        for seq in self._batch:
            seq.kv, seq.kv_epoch = None, self._epoch
        if not parts:
            self._cache, self._mask = [], torch.zeros((0, 0), dtype=torch.long)
            return
        width = max(len(s.tokens) - 1 for s in self._batch)
        self._mask = torch.zeros((len(parts), width), dtype=torch.long, device=self._device)
        cache = []
        for layer in range(len(parts[0][1])):
            k0 = parts[0][1][layer][0]
            k = k0.new_zeros((len(parts), k0.shape[1], width, k0.shape[3]))
            v = torch.zeros_like(k)
            for row, (_, kv) in enumerate(parts):
                n = kv[layer][0].shape[2]
                k[row, :, width - n :], v[row, :, width - n :] = kv[layer][0][0], kv[layer][1][0]
                self._mask[row, width - n :] = 1
            cache.append((k, v))
        self._cache = cache

    @torch.inference_mode()
    def _decode(self) -> int:
        """One token for every running sequence; returns the KV tokens the step attended to."""
        seqs, model = self._batch, self._open_model()
        started = time.perf_counter()
        new = torch.tensor([[s.tokens[-1]] for s in seqs], device=self._device)  # (B, 1)
        mask = torch.cat([self._mask, torch.ones_like(new)], dim=1)  # (B, T+1)
        positions = torch.tensor([[len(s.tokens) - 1] for s in seqs], device=self._device)  # (B, 1)
        cache = DynamicCache(ddp_cache_data=self._cache, config=model.config)
        out = model(
            input_ids=new, attention_mask=mask, position_ids=positions, use_cache=True,
            **{self._cache_arg: cache},
        )  # fmt: skip
        self._cache = _layers(cache)
        self._mask = mask
        params = [s.request.params for s in seqs]
        tokens, logprobs = sample_tokens(
            out.logits[:, -1].float(),
            torch.tensor([p.temperature for p in params], device=self._device),
            top_k=torch.tensor([p.top_k for p in params], device=self._device),
            top_p=torch.tensor([p.top_p for p in params], device=self._device),
            generator=self._generator,
        )
        seconds = time.perf_counter() - started
        self.stats["forward_s"] += seconds
        self.stats["steps"] += 1
        self._record(tokens.tolist(), logprobs.tolist())
        return int(mask.sum())

    def _record(self, tokens: list[int], logprobs: list[float]) -> None:
        finished: list[tuple[_Seq, FinishReason]] = []
        for seq, token, logprob in zip(self._batch, tokens, logprobs):
            seq.computed = len(seq.tokens)
            seq.tokens.append(token)
            seq.logprobs.append(logprob)
            seq.versions.append(self.version)
            generated = len(seq.tokens) - seq.prompt_len
            if token == self._eos or token in seq.stop:
                finished.append((seq, "stop"))
            elif generated >= seq.request.params.max_new_tokens:
                finished.append((seq, "length"))
        if not finished:
            return
        gone = {id(seq) for seq, _ in finished}
        if self._turns.max_tokens:
            rows = {id(seq): row for row, seq in enumerate(self._batch)}
            for seq, _ in finished:  # its KV over all but the last token, for a next turn
                kv = _row(self._cache, rows[id(seq)], len(seq.tokens) - 1)
                self._turns.put(
                    seq.tokens[:-1], [(k.to("cpu", copy=True), v.to("cpu", copy=True)) for k, v in kv]
                )
        self._rebuild([s for s in self._batch if id(s) not in gone], [])
        self._live = [s for s in self._live if id(s) not in gone]
        for seq, reason in finished:
            seq.group.remaining -= 1
            seq.done.set_result(self._completion(seq, reason))

    def _completion(self, seq: _Seq, reason: FinishReason) -> Completion:
        return Completion(
            request_id=seq.request.request_id,
            index=seq.index,
            prompt_ids=list(seq.request.prompt_ids),
            response_ids=seq.tokens[seq.prompt_len :],
            logprobs=seq.logprobs,
            versions=seq.versions,
            finish_reason=reason,
        )


def _row(cache: KV, row: int, n: int) -> KV:
    """Row `row`'s last `n` cached tokens (rows are right-aligned), as views."""
    return [(k[row : row + 1, :, k.shape[2] - n :], v[row : row + 1, :, v.shape[2] - n :]) for k, v in cache]


def _layers(cache: DynamicCache) -> KV:
    """A cache's per-layer (keys, values) tensors (attention layers only: Llama / Qwen2 style)."""
    out: Any = [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr]
    return out


class _TurnCache:
    """Finished sequences' KV on the host, keyed by the tokens it covers, least recently used out
    first: a multi-turn episode's next request (previous context + response + observation)
    starts from it instead of prefilling the whole context again."""

    def __init__(self, max_tokens: int) -> None:
        if max_tokens < 0:
            raise ValueError(f"ScheduledTorchEngine: turn_cache_tokens={max_tokens}, expected >= 0 (0: off)")
        self.max_tokens, self.tokens = max_tokens, 0
        self.entries: OrderedDict[tuple[int, ...], KV] = OrderedDict()

    def put(self, tokens: list[int], kv: KV) -> None:
        if not tokens or len(tokens) > self.max_tokens:
            return
        key = tuple(tokens)
        if key in self.entries:
            return
        self.entries[key] = kv
        self.tokens += len(key)
        while self.tokens > self.max_tokens:
            old, _ = self.entries.popitem(last=False)
            self.tokens -= len(old)

    def take(self, tokens: list[int]) -> tuple[int, KV] | None:
        """The longest entry that `tokens` starts with: (its length, its KV), removed from the cache."""
        best = max(
            (k for k in self.entries if len(k) <= len(tokens) and tuple(tokens[: len(k)]) == k),
            key=len,
            default=None,
        )
        if best is None:
            return None
        self.tokens -= len(best)
        return len(best), self.entries.pop(best)

    def clear(self) -> None:
        self.entries.clear()
        self.tokens = 0
