"""The rollout engine protocol: what every engine (torch, vLLM, flow) takes and returns.

A request is token ids in; a completion is token ids out, with the behaviour log-prob
of every sampled token and the policy version that produced it. Engines differ in how
they decode, never in these records, so rollout workers are written once.

An engine whose class sets `batches_calls = True` decodes concurrent `generate()` calls in the
same steps (continuous batching), so a caller may send each group as its own call and have
it back as soon as its samples finish.

This module knows nothing about tokenization, the data store, Ray or any model library
beyond torch tensors for weights.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from services.models import mixed_precision

__all__ = ["Completion", "Engine", "FinishReason", "Request", "SamplingParams", "check_fits", "copy_weights"]

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's responses."""

    temperature: float = 1.0
    """Logits are divided by this before sampling; must be > 0 (RL needs a sampling distribution)."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of most likely tokens whose mass reaches top_p; 1 keeps all."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 turns the filter off."""
    max_new_tokens: int = 16
    """Most tokens to generate per response; reaching it finishes with reason "length"."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra tokens that end a response (kept in it); the engine's EOS always stops."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(
                f"SamplingParams.temperature={self.temperature}: must be > 0; greedy is not supported "
                "for RL sampling (behaviour log-probs need a distribution) — use a small temperature "
                "such as 0.05, or top_k=1"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p={self.top_p}: must be in (0, 1]; use 1.0 to turn it off")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k={self.top_k}: must be >= 0; use 0 to turn it off")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens={self.max_new_tokens}: must be >= 1")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"SamplingParams.stop_token_ids={self.stop_token_ids}: ids must be >= 0")


@dataclass(frozen=True)
class Request:
    """One prompt to complete n times."""

    request_id: str
    prompt_ids: list[int]
    n: int = 1
    params: SamplingParams = field(default_factory=SamplingParams)
    priority: tuple[int, ...] = ()
    """Scheduling key from the caller's RL state (services.serving.scheduler.priority_key); smaller
    runs first. Empty: a scheduling engine derives it from the request (unfinished samples, the
    version at arrival, arrival). Engines without a scheduler ignore it."""

    def __post_init__(self) -> None:
        if not all(isinstance(p, int) for p in self.priority):
            raise ValueError(
                f"Request {self.request_id!r}: priority={self.priority!r}, expected a tuple of ints "
                "(build it with services.serving.scheduler.priority_key)"
            )
        if not self.prompt_ids:
            raise ValueError(
                f"Request {self.request_id!r}: prompt_ids is empty; a prompt needs at least one token "
                "(prepend BOS for an unconditional sample)"
            )
        if self.n < 1:
            raise ValueError(f"Request {self.request_id!r}: n={self.n}, expected n >= 1 responses per prompt")
        if any(t < 0 for t in self.prompt_ids):
            raise ValueError(
                f"Request {self.request_id!r}: prompt_ids contains negative ids; ids must be >= 0"
            )


@dataclass
class Completion:
    """One response to one request; lists are aligned token by token with response_ids."""

    request_id: str
    index: int  # 0..n-1 within the request
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # behaviour log-prob of each token under the distribution sampled from
    versions: list[int]  # policy version whose weights produced each token
    finish_reason: FinishReason


def check_fits(request: Request, *, max_positions: int, vocab_size: int) -> None:
    """Raise ValueError if the request cannot run on a model with these limits."""
    total = len(request.prompt_ids) + request.params.max_new_tokens
    if total > max_positions:
        raise ValueError(
            f"Request {request.request_id!r}: prompt ({len(request.prompt_ids)} tokens) + max_new_tokens "
            f"({request.params.max_new_tokens}) = {total} exceeds the model's {max_positions} positions; "
            "shorten the prompt or lower max_new_tokens"
        )
    if max(request.prompt_ids) >= vocab_size:
        raise ValueError(
            f"Request {request.request_id!r}: prompt id {max(request.prompt_ids)} is outside the "
            f"vocabulary of {vocab_size}; encode prompts with the model's own tokenizer"
        )


def copy_weights(
    targets: Mapping[str, torch.Tensor], version: int, tensors: Mapping[str, torch.Tensor]
) -> None:
    """Copy `tensors` into the live `targets` (a model's state_dict(keep_vars=True)), all or none."""
    unknown = sorted(name for name in tensors if name not in targets)
    mismatched = [
        f"{name}: got {tuple(t.shape)}, expected {tuple(targets[name].shape)}"
        for name, t in tensors.items()
        if name in targets and tuple(t.shape) != tuple(targets[name].shape)
    ]
    if unknown or mismatched:
        raise ValueError(
            f"update_weights(version={version}): unknown names {unknown}, shape mismatches {mismatched}; "
            "send tensors named and shaped as in model.state_dict(). No weight was changed."
        )
    with torch.no_grad():
        for name, t in tensors.items():
            targets[name].copy_(t)


class InProcessEngine:
    """What the engines over an in-process torch module share: new weights copied in place into
    the live parameters, pause / resume (generation loops wait on `_unpaused` at their step
    boundaries) and close. Subclasses generate."""

    def __init__(self, model: torch.nn.Module, version: int, autocast: str = "off") -> None:
        self.version = version
        if autocast != "off":  # every forward of this engine's own model, as accelerate wraps one
            model.forward = mixed_precision(model, autocast)(model.forward)  # type: ignore[method-assign,operator]
        self._model: Any = model.eval()
        # Live references to parameters and buffers, so an update copies into what forward reads.
        self._targets = dict(model.state_dict(keep_vars=True))
        self._unpaused = asyncio.Event()
        self._unpaused.set()

    async def update_weights(self, version: int, tensors: Mapping[str, torch.Tensor]) -> None:
        self._open_model()
        copy_weights(self._targets, version, tensors)
        self.version = version

    async def pause(self) -> None:
        # Steps never yield midway, so once this runs every generation loop sits at a step
        # boundary and sees the cleared event before it computes again.
        self._open_model()
        self._unpaused.clear()

    async def resume(self) -> None:
        self._open_model()
        self._unpaused.set()

    async def close(self) -> None:
        self._model = None
        self._targets = {}
        self._unpaused.set()  # release paused loops; they see the engine closed and abort

    def _open_model(self) -> Any:
        if self._model is None:
            raise RuntimeError(f"{type(self).__name__} is closed; build a new engine to generate again")
        return self._model


@runtime_checkable
class Engine(Protocol):
    """A rollout engine: samples completions and takes new weights in place."""

    version: int
    """Policy version of the weights now loaded."""

    async def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """n completions per request, grouped by request, in request order (index 0..n-1)."""
        ...

    async def update_weights(self, version: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy tensors (named as in model.state_dict()) into the live model; no restart.

        Tokens sampled after this returns carry `version`; in-flight requests continue.
        """
        ...

    async def pause(self) -> None:
        """Stop decoding at the next step boundary; in-flight requests are kept, not aborted."""
        ...

    async def resume(self) -> None:
        """Continue decoding after pause()."""
        ...

    async def close(self) -> None:
        """Free the model; later calls raise RuntimeError."""
        ...
