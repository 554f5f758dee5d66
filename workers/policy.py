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


def make_tokenizer(task: Any) -> Any:
    """A tokenizer with one token per symbol of the task (plus <pad>, <bos>, <eos>)."""
    return build_tokenizer(list(task.symbols))


def make_model(config: ModelConfig, vocab_size: int, seed: int) -> Any:
    """A freshly initialised model of the configured shape."""
    return build_model(
        vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_layers=config.num_layers, num_heads=config.num_heads, max_positions=config.max_positions,
        seed=seed,
    )  # fmt: skip


def set_threads(n: int) -> None:
    """torch threads of this process: one per actor beats several fighting over few cores."""
    torch.set_num_threads(n)
