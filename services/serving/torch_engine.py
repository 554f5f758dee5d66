"""The embedded rollout engine: batched sampling from a transformers causal LM with a KV cache.

Each request is expanded n times; the rows of a chunk are left-padded to a common
length (an attention mask plus explicit position ids make a padded row compute exactly
what it would alone), prefilled once per request (its n rows share the prompt: the
prompt's cache and last logits are copied to each), then decoded one token per step,
feeding only the new token against the cache. Rows that finish leave the forward (their
rows of the cache are dropped) once an eighth of the rows still computed have finished,
so a long-tailed batch does not pay for its short rows until its longest one ends. Every
sampled token carries the log-prob it had under the distribution it was drawn from and
the policy version of the weights that drew it.

Between steps the loop yields to the event loop, so pause(), update_weights() and
close() land on a step boundary. After a weight update the in-flight rows are
re-prefilled under the new weights: a token tagged with version v+1 was produced by v+1
alone, not by v+1 reading keys and values that v wrote.

The engine knows nothing about tokenization, the data store or Ray: token ids in, token
ids out.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from asyncflow.algorithms import truncate
from services.serving.optimal import optimal_tokens_per_s
from services.serving.protocol import Completion, FinishReason, InProcessEngine, Request, check_fits

__all__ = ["TorchEngine", "sample_tokens"]


class TorchEngine(InProcessEngine):
    """Engine protocol implementation over an in-process transformers model (Llama / Qwen2 style)."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        eos_token_id: int,
        pad_token_id: int,
        version: int = 0,
        seed: int = 0,
        max_batch_size: int = 256,
        drop_finished: bool = True,
        autocast: str = "off",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"TorchEngine: max_batch_size={max_batch_size}, expected >= 1 rows per forward")
        super().__init__(model, version, autocast)
        self.max_batch_size = max_batch_size
        # Rows that finished leave the forward (their KV rows dropped); False: every row runs to the end.
        self.drop_finished = drop_finished
        self.stats: dict[str, float] = {"tokens_generated": 0, "generate_s": 0.0, "requests": 0}
        self.stats["optimal_tokens_per_s"] = optimal_tokens_per_s(model)  # NanoFlow's bound, measured
        self._eos = eos_token_id
        self._pad = pad_token_id
        self._device = next(model.parameters()).device
        self._max_positions = int(model.config.max_position_embeddings)
        self._vocab_size = int(model.config.vocab_size)
        # One stream for the engine's life: the same seed and the same calls give the same samples.
        self._generator = torch.Generator(device=self._device).manual_seed(seed)
        # transformers renamed the cache argument (past_key_values -> cache) within 5.x.
        forward_args = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"
        self._weights_epoch = 0  # bumped by every update; a row's cache is rebuilt when it changes

    # ---------------------------------------------------------------- protocol

    async def generate(self, requests: Sequence[Request]) -> list[Completion]:
        self._open_model()
        for request in requests:
            check_fits(request, max_positions=self._max_positions, vocab_size=self._vocab_size)
        rows = [(request, index) for request in requests for index in range(request.n)]
        started = time.perf_counter()
        completions: list[Completion] = []
        for start in range(0, len(rows), self.max_batch_size):
            completions += await self._generate_chunk(rows[start : start + self.max_batch_size])
        self.stats["generate_s"] += time.perf_counter() - started
        self.stats["tokens_generated"] += sum(len(c.response_ids) for c in completions)
        self.stats["requests"] += len(requests)
        return completions

    async def update_weights(self, version: int, tensors: Mapping[str, torch.Tensor]) -> None:
        await super().update_weights(version, tensors)
        self._weights_epoch += 1

    # ---------------------------------------------------------------- decoding

    async def _step_boundary(self) -> bool:
        """Let other coroutines run, wait out a pause; False once the engine is closed."""
        await asyncio.sleep(0)
        await self._unpaused.wait()
        return self._model is not None

    async def _generate_chunk(self, rows: list[tuple[Request, int]]) -> list[Completion]:
        batch = _Batch.build(rows, eos=self._eos, pad=self._pad, device=self._device)
        if not await self._step_boundary():
            return batch.completions(abort=True)
        epoch, version = self._weights_epoch, self.version
        logits, cache = self._prefill(batch.ids[batch.firsts], batch.mask[batch.firsts])  # once per prompt
        if len(batch.firsts) < len(batch.rows):  # to every row: (A, V), the active rows, all at first
            logits = logits[batch.prompt_of]
            cache.batch_select_indices(batch.prompt_of)
        for step in range(batch.max_steps):
            tokens, logprobs = self._sample(logits, batch)
            if batch.record(step, tokens, logprobs, version):
                break
            if not await self._step_boundary():
                return batch.completions(abort=True)
            fresh = self._weights_epoch != epoch  # new weights: rebuild the cache under them
            if self.drop_finished:  # finished rows leave the forward, once enough have
                batch.shrink(None if fresh else cache)
            active = batch.active
            if fresh:
                epoch, version = self._weights_epoch, self.version
                logits, cache = self._prefill(batch.ids[active], batch.mask[active])
            else:
                logits = self._decode(batch.ids[active, -1:], batch.mask[active], cache)
        return batch.completions(abort=False)

    @torch.inference_mode()
    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, DynamicCache]:
        model = self._open_model()
        cache = DynamicCache(config=model.config)
        # Positions count real tokens only, so a left-padded row sees the positions it would alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: cache},
        )
        return out.logits[:, -1].float(), cache  # (B, V)

    @torch.inference_mode()
    def _decode(self, new_ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        model = self._open_model()
        positions = mask.sum(-1, keepdim=True) - 1  # (B, 1)
        out = model(
            input_ids=new_ids,  # (B, 1)
            attention_mask=mask,  # (B, T): the cache's columns plus the new token
            position_ids=positions,
            use_cache=True,
            **{self._cache_arg: cache},
        )
        return out.logits[:, -1].float()  # (B, V)

    @torch.inference_mode()
    def _sample(self, logits: torch.Tensor, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
        a = batch.active
        return sample_tokens(
            logits,
            batch.temperature[a],
            top_k=batch.top_k[a],
            top_p=batch.top_p[a],
            generator=self._generator,
        )


def sample_tokens(
    logits: torch.Tensor,  # (B, V)
    temperature: torch.Tensor,  # (B,)
    *,
    top_k: torch.Tensor,  # (B,) long, 0 = off
    top_p: torch.Tensor,  # (B,) float, 1 = off
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; returns (tokens (B,), log-probs (B,)) under the distribution sampled from.

    Order as in vLLM and transformers: temperature, then top-k, then top-p on what top-k kept
    (`asyncflow.algorithms.truncate`, which the trainer applies too); the log-prob is taken
    after truncation, renormalised over the kept tokens.
    """
    scores = truncate(logits.float() / temperature[:, None], top_k, top_p)  # (B, V)
    logp = torch.log_softmax(scores, -1)  # (B, V)
    tokens = torch.multinomial(logp.exp(), 1, generator=generator)  # (B, 1)
    return tokens.squeeze(-1), logp.gather(-1, tokens).squeeze(-1)


@dataclass
class _Batch:
    """The rows of one chunk: their token grid, sampling settings and what each has produced."""

    rows: list[tuple[Request, int]]
    ids: torch.Tensor  # (B, T) left-padded prompts, then one column per step
    mask: torch.Tensor  # (B, T) 1 for real tokens
    temperature: torch.Tensor  # (B,)
    top_k: torch.Tensor  # (B,)
    top_p: torch.Tensor  # (B,)
    max_new: torch.Tensor  # (B,)
    stop_ids: torch.Tensor  # (B, S) EOS and each row's stop ids, padded with -1
    done: torch.Tensor  # (B,) bool
    stopped: torch.Tensor  # (B,) bool: finished on a stop token
    lengths: torch.Tensor  # (B,) response tokens kept per row
    tokens: list[torch.Tensor]  # per step (B,)
    logprobs: list[torch.Tensor]  # per step (B,)
    versions: list[int]  # per step: the policy version that sampled it
    active: torch.Tensor  # (A,) the rows the forward computes (the KV cache's rows), in order
    pad: int  # the token rows outside the forward receive
    firsts: torch.Tensor  # (P,) each request's first row: the rows prefilled
    prompt_of: torch.Tensor  # (B,) each row's request, as a position in `firsts`

    @staticmethod
    def build(rows: list[tuple[Request, int]], *, eos: int, pad: int, device: torch.device) -> _Batch:
        prompts = [request.prompt_ids for request, _ in rows]
        lengths = np.array([len(p) for p in prompts])  # (B,)
        width = int(lengths.max())
        ids = np.full((len(rows), width), pad, dtype=np.int64)  # filled in numpy: no tensor per row
        for i, prompt in enumerate(prompts):
            ids[i, width - lengths[i] :] = prompt
        mask = (np.arange(width) >= (width - lengths)[:, None]).astype(np.int64)  # (B, T) left padding
        stops = [(eos, *request.params.stop_token_ids) for request, _ in rows]
        stop_ids = np.full((len(rows), max(map(len, stops))), -1, dtype=np.int64)
        for i, stop in enumerate(stops):
            stop_ids[i, : len(stop)] = stop
        params = [request.params for request, _ in rows]
        # a request's n rows are adjacent: a row starts a request where the request changes
        starts = [i == 0 or request is not rows[i - 1][0] for i, (request, _) in enumerate(rows)]

        def column(values: list[float] | list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return _Batch(
            rows=rows,
            ids=torch.from_numpy(ids).to(device),
            mask=torch.from_numpy(mask).to(device),
            temperature=column([p.temperature for p in params], torch.float32),
            top_k=column([p.top_k for p in params], torch.long),
            top_p=column([p.top_p for p in params], torch.float32),
            max_new=column([p.max_new_tokens for p in params], torch.long),
            stop_ids=torch.from_numpy(stop_ids).to(device),
            done=torch.zeros(len(rows), dtype=torch.bool, device=device),
            stopped=torch.zeros(len(rows), dtype=torch.bool, device=device),
            lengths=torch.zeros(len(rows), dtype=torch.long, device=device),
            tokens=[],
            logprobs=[],
            versions=[],
            active=torch.arange(len(rows), device=device),
            pad=pad,
            firsts=torch.tensor(np.flatnonzero(starts), dtype=torch.long, device=device),
            prompt_of=torch.tensor(np.cumsum(starts) - 1, dtype=torch.long, device=device),
        )

    @property
    def max_steps(self) -> int:
        return int(self.max_new.max())

    def shrink(self, cache: DynamicCache | None) -> None:
        """Drop finished rows from the forward (and from `cache`, whose rows are `active`'s) once at
        least an eighth of the active rows have finished: a long-tailed batch then stops paying for
        the rows that ended early, at the price of one copy of the cache per shrink."""
        finished = self.done[self.active]  # (A,)
        if int(finished.sum()) * 8 < len(self.active):
            return
        keep = (~finished).nonzero().squeeze(-1)  # positions in the cache
        if cache is not None:
            cache.batch_select_indices(keep)
        self.active = self.active[keep]

    def record(self, step: int, tokens: torch.Tensor, logprobs: torch.Tensor, version: int) -> bool:
        """Keep step `step`'s tokens (A,) of the active rows for the unfinished ones; True once every
        row has finished. Rows outside the forward receive padding."""
        if len(self.active) < len(self.rows):
            tokens = torch.full_like(self.lengths, self.pad).index_copy_(0, self.active, tokens)
            logprobs = logprobs.new_zeros(len(self.rows)).index_copy_(0, self.active, logprobs)
        live = ~self.done
        hit_stop = (tokens[:, None] == self.stop_ids).any(-1) & live
        self.lengths += live.long()
        self.stopped |= hit_stop
        self.done |= hit_stop | (live & (self.lengths >= self.max_new))
        self.tokens.append(tokens)
        self.logprobs.append(logprobs)
        self.versions.append(version)
        # Finished rows keep receiving tokens (cheaper than reshaping the cache); they are not returned.
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return bool(self.done.all())

    def completions(self, *, abort: bool) -> list[Completion]:
        steps = len(self.tokens)
        tokens = torch.stack(self.tokens, 1).tolist() if steps else [[] for _ in self.rows]  # (B, steps)
        logprobs = torch.stack(self.logprobs, 1).tolist() if steps else [[] for _ in self.rows]
        out = []
        for i, (request, index) in enumerate(self.rows):
            n = int(self.lengths[i])
            reason: FinishReason = "stop" if self.stopped[i] else "length"
            if not self.done[i]:
                reason = "abort" if abort else "length"
            out.append(
                Completion(
                    request_id=request.request_id,
                    index=index,
                    prompt_ids=list(request.prompt_ids),
                    response_ids=tokens[i][:n],
                    logprobs=logprobs[i][:n],
                    versions=self.versions[:n],
                    finish_reason=reason,
                )
            )
        return out
