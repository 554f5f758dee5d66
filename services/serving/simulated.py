"""A cost-model engine: the Engine protocol with generation replaced by a timed sleep.

For scheduling benchmarks at a scale the machine cannot compute (16+ rollout workers on 2
cores): every response gets a length drawn from a heavy-tailed distribution and takes
`prefill_s + time_per_token_s * length` seconds of `asyncio.sleep`, so it costs no CPU.
The rows of one generate() call run concurrently, as in a continuous-batching server: the
call returns when its slowest row is done.

Lengths: `L = min(max_new_tokens, floor(min_tokens * X))` with X ~ Pareto(alpha) (X >= 1,
P(X > x) = x^-alpha). With alpha = 1.5 the median is 1.59 x min_tokens, one response in
ten is over 4.6 x min_tokens and one in a hundred over 21 x: a few long responses hold up
every synchronous step, which is what asynchronous RL is meant to hide.

Responses are uniform random token ids (never EOS but at the end, which is EOS unless the
length cap was hit), with the log-prob a uniform policy gives them, tagged with the
engine's version. A task's reward on such text is ~0: the engine measures schedules, not
learning. It knows nothing about tokenization, models, the data store or Ray.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Mapping, Sequence

import torch

from services.serving.protocol import Completion, FinishReason, Request

__all__ = ["SimulatedEngine", "response_length"]


def response_length(rng: random.Random, *, min_tokens: int, alpha: float, max_new_tokens: int) -> int:
    """One draw of floor(min_tokens * Pareto(alpha)), capped at max_new_tokens."""
    return max(1, min(max_new_tokens, int(min_tokens * rng.paretovariate(alpha))))


class SimulatedEngine:
    """Engine protocol implementation whose generation is a sleep of heavy-tailed length."""

    batches_calls = True  # concurrent calls sleep side by side, as a continuous-batching server decodes

    def __init__(
        self,
        *,
        vocab_size: int,
        eos_token_id: int,
        time_per_token_s: float,
        min_tokens: int = 16,
        alpha: float = 1.5,
        prefill_s: float = 0.0,
        update_s: float = 0.0,
        version: int = 0,
        seed: int = 0,
    ) -> None:
        if vocab_size < 2 or not 0 <= eos_token_id < vocab_size:
            raise ValueError(
                f"SimulatedEngine: vocab_size={vocab_size}, eos_token_id={eos_token_id}; need a vocabulary "
                "of >= 2 ids that contains EOS"
            )
        if time_per_token_s < 0 or prefill_s < 0 or update_s < 0 or min_tokens < 1 or alpha <= 0:
            raise ValueError(
                f"SimulatedEngine: time_per_token_s={time_per_token_s}, prefill_s={prefill_s}, "
                f"update_s={update_s} must be >= 0, min_tokens={min_tokens} >= 1, alpha={alpha} > 0"
            )
        self.version = version
        self.vocab_size, self.eos = vocab_size, eos_token_id
        self.time_per_token_s, self.prefill_s, self.update_s = time_per_token_s, prefill_s, update_s
        self.min_tokens, self.alpha = min_tokens, alpha
        self.stats: dict[str, float] = {"tokens_generated": 0, "generate_s": 0.0, "requests": 0}
        self._rng = random.Random(seed)
        self._others = [t for t in range(vocab_size) if t != eos_token_id]
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._closed = False

    async def generate(self, requests: Sequence[Request]) -> list[Completion]:
        self._check_open()
        await self._unpaused.wait()
        version, logprob = self.version, -math.log(self.vocab_size)
        completions, seconds = [], 0.0
        for request in requests:
            cap = request.params.max_new_tokens
            ordinary = [t for t in self._others if t not in request.params.stop_token_ids]
            if not ordinary:
                raise ValueError(f"Request {request.request_id!r}: every token id is a stop token")
            for index in range(request.n):
                length = response_length(
                    self._rng, min_tokens=self.min_tokens, alpha=self.alpha, max_new_tokens=cap
                )
                stopped = length < cap or self._rng.random() < 0.5  # a capped row ends on EOS half the time
                ids = [self._rng.choice(ordinary) for _ in range(length - 1)]
                ids.append(self.eos if stopped else self._rng.choice(ordinary))
                reason: FinishReason = "stop" if stopped else "length"
                completions.append(
                    Completion(
                        request_id=request.request_id,
                        index=index,
                        prompt_ids=list(request.prompt_ids),
                        response_ids=ids,
                        logprobs=[logprob] * len(ids),
                        versions=[version] * len(ids),
                        finish_reason=reason,
                    )  # fmt: skip
                )
                seconds = max(seconds, self.prefill_s + self.time_per_token_s * length)
        await asyncio.sleep(seconds)  # rows run concurrently: the call lasts as long as its slowest row
        await self._unpaused.wait()
        self._check_open()
        self.stats["tokens_generated"] += sum(len(c.response_ids) for c in completions)
        self.stats["generate_s"] += seconds
        self.stats["requests"] += len(requests)
        return completions

    async def update_weights(self, version: int, tensors: Mapping[str, torch.Tensor]) -> None:
        self._check_open()
        if self.update_s:
            await asyncio.sleep(self.update_s)
        self.version = version

    async def pause(self) -> None:
        self._check_open()
        self._unpaused.clear()

    async def resume(self) -> None:
        self._check_open()
        self._unpaused.set()

    async def close(self) -> None:
        self._closed = True
        self._unpaused.set()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("SimulatedEngine is closed; build a new engine to generate again")
