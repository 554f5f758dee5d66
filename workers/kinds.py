"""Policy kinds: what a prompt and a response are for one kind of policy, and how they move
between the store, the engine, the reward function and the reference.

The workers are written once; the kind chosen by `policy:` in the config supplies the rest:

- "token": a language model. A prompt is token ids, a response token ids with one behaviour
  log-prob and version per token; the reward function gets decoded text.
- "flow": a flow-matching policy (services.flow). A prompt is a condition vector, a response
  the SDE trajectory with one log-prob and version per denoising step; the reward function
  gets the condition and the sample as arrays (workers.flow_kind).

A kind converts, it does not decide: the store, the staleness rule and the loss are the same
for both. It is the only seam between the two: the fields each role reads and writes, a
sample as the trainer sees it (`rows`), how samples are cut into micro-batches, their
log-probs under a model with gradient, the engine, and the warm-start.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from asyncflow.algorithms import chunked_token_logprobs, pack, token_logprobs
from asyncflow.config import AsyncFlowConfig, ModelConfig, RolloutConfig, WarmupConfig
from services.parallelism.balance import micro_batches
from services.parallelism.vocab import vocab_parallel_logprobs
from services.serving import Request, SamplingParams
from workers.policy import body_and_head, check_body_and_head, eos_ids, make_model, make_tokenizer
from workers.samples import EPISODE_FIELDS, PROMPT_FIELDS, ROLLOUT_FIELDS


class Sample(Protocol):
    """One sample as the trainer sees it: whatever the kind, its actions' behaviour log-probs
    and versions, its reward and (with a reference) the reference's log-probs."""

    behavior: list[float]  # one per action: token, or denoising step
    reward: float
    ref: list[float] | None

    def version(self, default: int) -> int: ...  # the oldest version that took one of its actions


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

    def engine(self, seed: int, device: str = "cpu") -> Any: ...  # in-process; weights from the weight store

    def trainer_reads(self, reference: bool) -> list[str]: ...  # the fields the trainer takes

    def rows(
        self, data: dict, order: list[int], reference: bool
    ) -> Sequence[Sample]: ...  # a batch's samples

    def micro_batches(self, rows: Sequence[Any], token_budget: int) -> list[list[int]]: ...

    def lengths(self, rows: Sequence[Any]) -> list[int]: ...  # what a row costs a forward: its positions

    # log-probs of the samples' actions under `model`, with gradient (b, T), and which are real (b, T)
    def logprobs(self, model: torch.nn.Module, rows: Sequence[Any]) -> tuple[Tensor, Tensor]: ...

    def warmup(self, model: torch.nn.Module, task: Any, config: WarmupConfig) -> dict: ...


def make_kind(config: AsyncFlowConfig, task: Any) -> Kind:
    """The kind `config.policy` names, for `task`. A task that drops prompts too long for the model
    (a data set: `limit_prompts`) learns here how this kind counts a prompt's tokens (chat template
    applied, as the rollout does) and how many the model has room for."""
    if config.policy == "flow":
        from workers.flow_kind import FlowKind

        return FlowKind(config.flow, task)
    kind = TokenKind(
        make_tokenizer(task, config.model), config.model, config.rollout,
        chunk_tokens=config.trainer.logprob_chunk_tokens, vocab_shards=config.trainer.logprob_vocab_shards,
        multi_turn=config.env.source is not None, episode_tokens=config.env.max_episode_tokens,
    )  # fmt: skip
    if hasattr(task, "limit_prompts"):
        task.limit_prompts(lambda prompt: len(kind.prompt_ids(prompt)), kind.prompt_room())
    return kind


class TokenKind:
    policy = "token"
    prompt_field, response_field = "prompt_ids", "response_ids"
    prompt_fields, rollout_fields = PROMPT_FIELDS, ROLLOUT_FIELDS
    reference_reads = ["prompt_ids", "response_ids"]

    def __init__(
        self, tokenizer: Any, model: ModelConfig, rollout: RolloutConfig, *, chunk_tokens: int = 0,
        vocab_shards: int = 1, multi_turn: bool = False, episode_tokens: int = 0,
    ):  # fmt: skip
        self.tokenizer, self.model_config, self.rollout = tokenizer, model, rollout
        # Multi-turn episodes (workers.episodes): a response is the whole trajectory, and its loss
        # mask says which tokens the model sampled (trained) and which the environment gave (not).
        self.multi_turn = multi_turn
        self.episode_tokens = episode_tokens  # an episode's tokens after the prompt, at most (multi-turn)
        if multi_turn:
            self.rollout_fields = ROLLOUT_FIELDS + EPISODE_FIELDS
            self.reference_reads = [*TokenKind.reference_reads, "loss_mask"]
        self.chunk_tokens = chunk_tokens  # positions whose logits exist at once (0: all of them)
        self.vocab_shards = vocab_shards  # pieces of the vocabulary whose logits exist at once
        self._stop_ids: tuple[int, ...] | None = None

    def model(self, seed: int) -> torch.nn.Module:
        model = make_model(self.model_config, len(self.tokenizer), seed)
        if self.chunk_tokens or self.vocab_shards > 1:  # refused now, not by other log-probs than its own
            check_body_and_head(model)
        return model

    def params(self) -> SamplingParams:
        r = self.rollout
        return SamplingParams(
            temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
            stop_token_ids=self.stop_ids,
        )  # fmt: skip

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a response: the tokenizer's EOS and the checkpoint's generation EOS ids."""
        if self._stop_ids is None:
            generation = None
            if self.model_config.path is not None:
                from transformers import GenerationConfig

                try:
                    generation = GenerationConfig.from_pretrained(
                        self.model_config.path, revision=self.model_config.revision or "main"
                    )
                except OSError:  # a checkpoint without generation_config.json
                    generation = None
            self._stop_ids = eos_ids(self.tokenizer, generation)
        return self._stop_ids

    def prompt_ids(self, prompt: Any) -> list[int]:
        """A prompt's token ids: chat messages rendered with the tokenizer's chat template (ready for
        the assistant's turn), text encoded as it is, after the tokenizer's BOS if it has one."""
        tok = self.tokenizer
        if isinstance(prompt, list | tuple):
            if not getattr(tok, "chat_template", None):
                raise ValueError(
                    "the data gives chat messages, but the tokenizer has no chat template; use a checkpoint "
                    "whose tokenizer has one, or give prompts as text"
                )
            rendered = tok.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
            return list(tok.encode(rendered, add_special_tokens=False))
        ids = list(tok.encode(prompt))
        if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
            ids = [tok.bos_token_id, *ids]
        return ids

    def prompt_room(self) -> int | None:
        """The most prompt tokens the model has room for: its max positions (the built-in model's
        max_positions, a checkpoint's max_position_embeddings) minus the longest response
        (rollout.max_new_tokens, or env.max_episode_tokens for multi-turn episodes); None for a
        checkpoint whose config gives no max positions."""
        m = self.model_config
        positions: int | None = m.max_positions
        if m.path is not None:
            from transformers import AutoConfig

            checkpoint = AutoConfig.from_pretrained(
                m.path, revision=m.revision, trust_remote_code=m.trust_remote_code
            )
            positions = getattr(checkpoint, "max_position_embeddings", None)
        if positions is None:
            return None
        name, longest = "rollout.max_new_tokens", self.rollout.max_new_tokens
        if self.multi_turn:
            name, longest = "env.max_episode_tokens", self.episode_tokens
        if positions - longest < 1:
            raise ValueError(
                f"{name} {longest} leaves no room for a prompt in the model's {positions} positions; "
                f"lower it below {positions}"
            )
        return positions - longest

    def prompts(self, examples: Sequence[Any]) -> dict[str, list]:
        return {"prompt_ids": [np.asarray(self.prompt_ids(e.prompt), np.int64) for e in examples]}

    def request(self, request_id: str, prompt: Any, n: int, params: SamplingParams) -> Request:
        return Request(request_id, np.asarray(prompt).tolist(), n, params)

    def results(self, outputs: Sequence[Any]) -> dict[str, list]:
        """Engine completions (or, multi-turn, workers.episodes.Trajectory) as rollout fields."""
        fields: dict[str, list] = {
            "response_ids": [np.asarray(c.response_ids, dtype=np.int64) for c in outputs],
            "behavior_logprobs": [np.asarray(c.logprobs, dtype=np.float32) for c in outputs],
            "token_versions": [np.asarray(c.versions, dtype=np.int64) for c in outputs],
            "finish": [c.finish_reason for c in outputs],
        }
        if self.multi_turn:
            fields["loss_mask"] = [np.asarray(c.loss_mask, dtype=np.uint8) for c in outputs]
            fields["episode"] = [json.dumps(c.episode, default=str) for c in outputs]
        return fields

    def reward_args(self, prompt: Any, response: Any, answer: str) -> tuple[str, str, str]:
        """(prompt text, response text, answer): decoded once, here, without special tokens; the
        ids trained on stay the ids the engine sampled."""
        text = self.tokenizer.decode(np.asarray(prompt).tolist(), skip_special_tokens=True)
        return text, decode_response(self.tokenizer, np.asarray(response).tolist(), self.stop_ids), answer

    @torch.no_grad()
    def reference_logprobs(self, model: torch.nn.Module, batch: Any) -> list[np.ndarray]:
        prompts = [p.tolist() for p in batch["prompt_ids"]]
        masks = [m.tolist() for m in batch["loss_mask"]] if self.multi_turn else None
        packed = pack(prompts, [r.tolist() for r in batch["response_ids"]], loss_masks=masks)
        ids, targets, mask = on_device(model, *packed)
        # (B, T-1): the sampler's distribution, so the KL is 0 at step 1
        lp = self._logprobs(model, ids, targets, mask, self.rollout)
        return [row[m].cpu().numpy() for row, m in zip(lp, mask)]

    def engine(self, seed: int, device: str = "cpu") -> Any:
        from services.serving.torch_engine import TorchEngine

        tok = self.tokenizer
        model: Any = self.model(0).to(device)  # a transformers model; its weights come from the weight store
        return TorchEngine(
            model, eos_token_id=self.stop_ids[0], pad_token_id=tok.pad_token_id, version=-1, seed=seed,
            autocast=self.rollout.autocast,
        )  # fmt: skip

    def trainer_reads(self, reference: bool) -> list[str]:
        fields = ["prompt_ids", "prompt_index", "sample_index", *ROLLOUT_FIELDS[:3], "reward"]
        return fields + (["ref_logprobs"] if reference else []) + (["loss_mask"] if self.multi_turn else [])

    def rows(self, data: dict, order: list[int], reference: bool) -> list[TokenSample]:
        return [
            TokenSample(
                data["prompt_ids"][i].tolist(),
                data["response_ids"][i].tolist(),
                data["behavior_logprobs"][i].tolist(),
                data["token_versions"][i].tolist(),
                float(data["reward"][i]),
                data["ref_logprobs"][i].tolist() if reference else None,
                data["loss_mask"][i].tolist() if self.multi_turn else None,
            )  # fmt: skip
            for i in order
        ]

    def micro_batches(self, rows: Sequence[TokenSample], token_budget: int) -> list[list[int]]:
        return micro_batches(self.lengths(rows), token_budget)

    def lengths(self, rows: Sequence[TokenSample]) -> list[int]:
        return [len(r.prompt) + len(r.response) for r in rows]

    def logprobs(self, model: torch.nn.Module, rows: Sequence[TokenSample]) -> tuple[Tensor, Tensor]:
        masks = [r.mask or [] for r in rows] if self.multi_turn else None  # env tokens: no log-prob, no loss
        packed = pack([r.prompt for r in rows], [r.response for r in rows], loss_masks=masks)
        ids, targets, mask = on_device(model, *packed)
        return self._logprobs(model, ids, targets, mask, self.rollout), mask  # (b, L-1) each

    def _logprobs(
        self,
        model: torch.nn.Module,
        ids: Tensor,
        targets: Tensor,
        mask: Tensor,
        sampler: RolloutConfig | None,
    ) -> Tensor:
        """Log-probs of `targets` under the distribution the engine samples from (the sampler's
        temperature, top-k and top-p; None: the model's own distribution): ids (b, L), targets and
        mask (b, L-1) -> (b, L-1).

        With `chunk_tokens` the LM head runs over the masked positions alone, `chunk_tokens` at a
        time (`chunked_token_logprobs`), and the other positions are 0; with `vocab_shards` > 1 also
        the vocabulary `vocab_shards` pieces at a time (`vocab_parallel_logprobs`; chunk_tokens 0: all
        the masked positions in one chunk); else the whole (b, L-1, V) logits are built at once."""
        settings = (1.0, 0, 1.0) if sampler is None else (sampler.temperature, sampler.top_k, sampler.top_p)
        if not self.chunk_tokens and self.vocab_shards == 1:
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]  # (b, L-1, V)
            return token_logprobs(logits, targets, *settings)
        body, head = body_and_head(model)
        hidden = body(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]  # (b, L-1, H)
        if self.vocab_shards > 1:  # (N,): the response tokens only
            picked = sharded_logprobs(
                hidden[mask], head, targets[mask], self.chunk_tokens, self.vocab_shards, settings
            )
        else:
            picked = chunked_token_logprobs(hidden[mask], head, targets[mask], self.chunk_tokens, *settings)
        out = torch.zeros(targets.shape, dtype=picked.dtype, device=picked.device)  # (b, L-1)
        out[mask] = picked
        return out

    def warmup(self, model: torch.nn.Module, task: Any, config: WarmupConfig) -> dict:
        """Supervised steps on the task's answers (examples far from the RL prompts' indices)."""
        if config.steps == 0:
            return {"steps": 0}
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
        start, loss = time.perf_counter(), torch.tensor(0.0)
        for step in range(config.steps):
            examples = [
                task.example((1 << 36) + step * config.batch_size + i) for i in range(config.batch_size)
            ]
            prompts = [self.prompt_ids(e.prompt) for e in examples]
            answers, masks = self._targets(task, examples)
            ids, targets, mask = on_device(model, *pack(prompts, answers, loss_masks=masks))
            loss = -self._logprobs(model, ids, targets, mask, None)[mask].mean()  # the cross-entropy
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return {"steps": config.steps, "loss": loss.item(), "seconds": time.perf_counter() - start}

    def _targets(self, task: Any, examples: Sequence[Any]) -> tuple[list[list[int]], list[list[int]] | None]:
        """The warm-start's targets: each answer then the stop token, or (a task with `demonstration`,
        for multi-turn episodes) a whole episode, each segment tokenized on its own as the rollout
        does, the model's turns ended by the stop token and trained, the environment's not."""
        tok, stop = self.tokenizer, self.stop_ids[0]
        if not (self.multi_turn and hasattr(task, "demonstration")):
            return [[*tok.encode(e.answer, add_special_tokens=False), stop] for e in examples], None
        targets, masks = [], []
        for e in examples:
            ids, mask = [], []
            for text, by_model in task.demonstration(e):
                segment = [*tok.encode(text, add_special_tokens=False), *([stop] if by_model else [])]
                ids += segment
                mask += [int(by_model)] * len(segment)
            targets.append(ids)
            masks.append(mask)
        return targets, masks


@dataclass
class TokenSample:
    """One sample of a language model as the trainer needs it (plain lists: rows are regrouped per
    micro-batch)."""

    prompt: list[int]
    response: list[int]
    behavior: list[float]
    versions: list[int]
    reward: float
    ref: list[float] | None
    mask: list[int] | None = None  # multi-turn: 1 per model token, 0 per environment token of `response`

    def version(self, default: int) -> int:
        """The oldest version that produced a token of this sample (its staleness counts from it)."""
        return min(self.versions, default=default)


def sharded_logprobs(
    hidden: Tensor, head: torch.nn.Module, targets: Tensor, chunk_tokens: int, shards: int,
    settings: tuple[float, int, float],
) -> Tensor:  # fmt: skip
    """`token_logprobs(head(hidden), targets)` with the head's vocabulary in `shards` pieces merged
    by online softmax: hidden (N, H), targets (N,) -> (N,). The head must be a plain linear layer
    (tied to the embedding or not: its weight is a parameter either way)."""
    temperature, top_k, top_p = settings
    if top_k != 0 or top_p != 1.0:
        raise ValueError(
            f"trainer.logprob_vocab_shards = {shards} cannot apply rollout.top_k = {top_k}, top_p = {top_p}: "
            "they truncate the whole vocabulary row; set trainer.logprob_vocab_shards: 1"
        )
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(
            f"trainer.logprob_vocab_shards = {shards} needs an nn.Linear LM head, got {type(head).__name__} "
            "(a LoRA adapter on the head?); set trainer.logprob_vocab_shards: 1"
        )
    logp, _ = vocab_parallel_logprobs(
        hidden.to(head.weight.dtype), head.weight, targets, temperature=temperature,
        chunk_tokens=chunk_tokens, shards=shards, bias=head.bias,
    )  # fmt: skip
    return logp


def decode_response(tokenizer: Any, ids: list[int], stop_ids: Sequence[int] = ()) -> str:
    """Response text without the token that ended it."""
    if ids and (ids[-1] == tokenizer.eos_token_id or ids[-1] in stop_ids):
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)


def on_device(model: torch.nn.Module, *tensors: Tensor) -> list[Tensor]:
    """`tensors` where the model's parameters are (the same tensors on the CPU)."""
    device = next(model.parameters()).device
    return [t.to(device) for t in tensors]
