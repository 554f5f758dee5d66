"""Policy kinds: what a prompt and a response are for one kind of policy, and how they move
between the store, the engine, the reward function and the reference.

The workers are written once; the kind chosen by `policy:` in the config supplies the rest:

- "token": a language model. A prompt is token ids, a response token ids with one behaviour
  log-prob and version per token; the reward function gets decoded text.
- "flow": a flow-matching policy (services.flow). A prompt is a condition vector, a response
  the SDE trajectory with one log-prob and version per denoising step; the reward function
  gets the condition and the sample as arrays (workers.flow_kind).

A kind converts, it does not decide: the store, the staleness rule and the loss are the same
for both (the flow trainer differs only in how it recomputes log-probs, workers.flow_trainer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from asyncflow.algorithms import token_logprobs
from asyncflow.config import AsyncFlowConfig, ModelConfig, RolloutConfig
from services.serving import Request, SamplingParams
from workers.policy import make_model, make_tokenizer
from workers.samples import PROMPT_FIELDS, ROLLOUT_FIELDS
from workers.trainer import pack


class Kind(Protocol):
    policy: str  # the config's name for it
    prompt_field: str  # the field a prompt lives in
    response_field: str  # the field a response lives in
    prompt_fields: list[str]  # what rollout reads
    rollout_fields: list[str]  # what rollout writes
    reference_reads: list[str]  # what the reference reads
    tokenizer: Any  # None where there is no text

    def model(self, seed: int) -> torch.nn.Module: ...  # the policy's architecture, freshly initialised

    def params(self) -> Any: ...  # the engine's sampling parameters, from the config

    def prompts(self, examples: Sequence[Any]) -> dict[str, list]: ...  # the task's examples as prompt fields

    def request(self, request_id: str, prompt: Any, n: int, params: Any) -> Any: ...  # one engine request

    def results(self, outputs: Sequence[Any]) -> dict[str, list]: ...  # engine outputs as rollout fields

    def reward_args(self, prompt: Any, response: Any, answer: str) -> tuple: ...  # stored fields -> reward_fn

    def reference_logprobs(self, model: torch.nn.Module, batch: Any) -> list[np.ndarray]: ...


def make_kind(config: AsyncFlowConfig, task: Any) -> Kind:
    """The kind `config.policy` names, for `task`."""
    if config.policy == "flow":
        from workers.flow_kind import FlowKind

        return FlowKind(config.flow, task)
    return TokenKind(make_tokenizer(task), config.model, config.rollout)


class TokenKind:
    policy = "token"
    prompt_field, response_field = "prompt_ids", "response_ids"
    prompt_fields, rollout_fields = PROMPT_FIELDS, ROLLOUT_FIELDS
    reference_reads = ["prompt_ids", "response_ids"]

    def __init__(self, tokenizer: Any, model: ModelConfig, rollout: RolloutConfig):
        self.tokenizer, self.model_config, self.rollout = tokenizer, model, rollout

    def model(self, seed: int) -> torch.nn.Module:
        return make_model(self.model_config, len(self.tokenizer), seed)

    def params(self) -> SamplingParams:
        r = self.rollout
        return SamplingParams(
            temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
            stop_token_ids=(self.tokenizer.eos_token_id,),
        )  # fmt: skip

    def prompts(self, examples: Sequence[Any]) -> dict[str, list]:
        tok = self.tokenizer
        return {
            "prompt_ids": [np.asarray([tok.bos_token_id, *tok.encode(e.prompt)], np.int64) for e in examples]
        }

    def request(self, request_id: str, prompt: Any, n: int, params: SamplingParams) -> Request:
        return Request(request_id, np.asarray(prompt).tolist(), n, params)

    def results(self, outputs: Sequence[Any]) -> dict[str, list]:
        return {
            "response_ids": [np.asarray(c.response_ids, dtype=np.int64) for c in outputs],
            "behavior_logprobs": [np.asarray(c.logprobs, dtype=np.float32) for c in outputs],
            "token_versions": [np.asarray(c.versions, dtype=np.int64) for c in outputs],
            "finish": [c.finish_reason for c in outputs],
        }

    def reward_args(self, prompt: Any, response: Any, answer: str) -> tuple[str, str, str]:
        """(prompt text without <bos>, response text without <eos>, answer)."""
        text = self.tokenizer.decode(np.asarray(prompt).tolist()[1:], skip_special_tokens=True)
        return text, decode_response(self.tokenizer, np.asarray(response).tolist()), answer

    @torch.no_grad()
    def reference_logprobs(self, model: torch.nn.Module, batch: Any) -> list[np.ndarray]:
        prompts = [p.tolist() for p in batch["prompt_ids"]]
        ids, targets, mask = pack(prompts, [r.tolist() for r in batch["response_ids"]])
        r = self.rollout  # the reference scores the sampler's distribution too, so KL is 0 at step 1
        lp = token_logprobs(model(ids).logits[:, :-1], targets, r.temperature, r.top_k, r.top_p)  # (B, T-1)
        return [row[m].numpy() for row, m in zip(lp, mask)]


def decode_response(tokenizer: Any, ids: list[int]) -> str:
    """Response text without the end-of-sequence token."""
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)
