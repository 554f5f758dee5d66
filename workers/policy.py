"""What every worker builds the same way: the task, its tokenizer, the policy's architecture.

Weights never come from here: the trainer makes version 0 and every other worker pulls
its weights from the weight store, so all of them run the same policy.
"""

from __future__ import annotations

from typing import Any

import torch

from asyncflow.config import ModelConfig, TaskConfig, import_string
from services.models import build_model, build_tokenizer


def make_task(config: TaskConfig, seed: int) -> Any:
    factory = import_string(config.source)
    options = {"seed": seed, **config.options}
    try:
        return factory(**options)
    except TypeError as e:
        raise ValueError(f"task {config.source} rejected task.options {config.options}: {e}") from None


def make_reward_fn(config: TaskConfig, *, evaluation: bool = False) -> Any:
    """The training reward, or with evaluation=True the held-out one (task.eval_reward, if set)."""
    return import_string(config.eval_reward if evaluation and config.eval_reward else config.reward)


def make_tokenizer(task: Any, model: ModelConfig | None = None) -> Any:
    """The checkpoint's tokenizer when `model.path` is set; else one token per symbol of the task
    (plus <pad>, <bos>, <eos>), for the built-in model."""
    if model is not None and model.path is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(
            model.path, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
        if tok.pad_token_id is None:  # batches are padded; the pad id never reaches the loss
            tok.pad_token = tok.eos_token
        return tok
    if getattr(task, "symbols", None) is None:
        raise ValueError(
            f"task {type(task).__name__} brings no symbols to build a tokenizer from; set model.path to a "
            "checkpoint (its tokenizer is used), or use a task with `symbols`"
        )
    return build_tokenizer(list(task.symbols))


def make_model(config: ModelConfig, vocab_size: int, seed: int) -> Any:
    """The checkpoint at `config.path` (its weights), or a freshly initialised built-in model."""
    if config.path is not None:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            config.path, revision=config.revision, trust_remote_code=config.trust_remote_code,
            dtype=getattr(torch, config.dtype),
        ).eval()  # fmt: skip
    model = build_model(
        vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_layers=config.num_layers, num_heads=config.num_heads, max_positions=config.max_positions,
        seed=seed,
    )  # fmt: skip
    return model.to(getattr(torch, config.dtype))


def model_outline(config: ModelConfig, vocab_size: int) -> Any:
    """The policy's modules on the meta device, no weight loaded or initialised: its names and
    shapes, to check a config against before any actor starts."""
    with torch.device("meta"):
        if config.path is None:
            return make_model(config, vocab_size, seed=0)
        from transformers import AutoConfig, AutoModelForCausalLM

        hf = AutoConfig.from_pretrained(
            config.path, revision=config.revision, trust_remote_code=config.trust_remote_code
        )
        return AutoModelForCausalLM.from_config(hf, trust_remote_code=config.trust_remote_code)


def eos_ids(tokenizer: Any, generation: Any = None) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's EOS first, then those of a checkpoint's
    generation config (chat models often end a turn with a token of their own)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(generation, "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, list) else {extra} if isinstance(extra, int) else set()
    first = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return tuple(first + sorted(ids - set(first)))


def set_threads(n: int) -> None:
    """torch threads of this process: one per actor beats several fighting over few cores."""
    torch.set_num_threads(n)
