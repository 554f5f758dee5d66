"""What a run checks before any actor starts: the task, its data set, the model and the tokenizer,
built here as every worker builds them, so that a bad input fails with its own message."""

from __future__ import annotations

from typing import Any

from asyncflow.config import AsyncFlowConfig
from asyncflow.errors import ConfigError


def check(config: AsyncFlowConfig) -> dict:
    """Build what every worker builds (the task, its kind, the tokenizer) and render the first
    training and held-out prompts, so that a missing file or column, an empty data set, a path
    that is not a checkpoint, chat messages without a chat template or a data set with no prompt
    short enough fail with their own message before any actor starts. Returns what a data set
    dropped as too long for the model (empty for other tasks), for the run's log and summary."""
    from workers.kinds import make_kind
    from workers.policy import make_task
    from workers.trainable import check_trainable

    try:
        task = make_task(config.task, config.seed)
        kind = make_kind(config, task)
        kind.prompts([task.example(0)])
        if config.task.eval_prompts:
            kind.prompts([task.eval_example(0)])
        if config.trainer.trainable != "all":  # LoRA targets and patterns name modules of this model
            check_trainable(_outline(config, kind), config.trainer.trainable)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{config.task.source} with model {config.model.path or 'built-in'}: {e}") from None
    if getattr(task, "limit", None) is None:
        return {}
    return {"max_prompt_tokens": task.limit, "prompts_dropped": dict(task.dropped)}


def _outline(config: AsyncFlowConfig, kind: Any) -> Any:
    """The policy's modules, without loading a checkpoint's weights."""
    from workers.policy import model_outline

    if config.policy == "token":
        return model_outline(config.model, len(kind.tokenizer))
    return kind.model(config.seed)
