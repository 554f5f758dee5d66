"""What the trainer trains (`trainer.trainable`): every parameter, LoRA adapters, or the
parameters some patterns name."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from asyncflow.config._base import Section


class LoraConfig(Section):
    """Low-rank adapters (LoRA, Hu et al. 2021) on some linear layers, through `peft`: each target
    W (out x in) trains as W + (alpha / rank) * B @ A, with A (rank x in) and B (out x rank, zeros at
    start); W itself stays frozen. Engines receive the merged W + (alpha / rank) * B @ A."""

    rank: int = Field(8, ge=1, le=4096, description="Rank r of the adapters A (r x in) and B (out x r).")
    alpha: float = Field(
        16.0, gt=0, le=1e6, description="Scale numerator: the update is (alpha / rank) * B @ A."
    )
    targets: tuple[str, ...] = Field(
        ("q_proj", "v_proj"),
        min_length=1,
        max_length=256,
        description="Module names to adapt, matched as peft matches them: a module whose name is a target "
        "or ends with '.' + target (e.g. q_proj, v_proj; c_attn for GPT-2). Each must match a module.",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input (0: off).")


class Lora(Section):
    """`trainable: {lora: {...}}`: train low-rank adapters only."""

    lora: LoraConfig = Field(default_factory=LoraConfig, description="The adapters.")


class Patterns(Section):
    """`trainable: {patterns: [...]}`: train the parameters these patterns name, freeze the rest."""

    patterns: tuple[str, ...] = Field(
        min_length=1,
        max_length=1024,
        description="fnmatch patterns (`*`, `?`, `[seq]`; `*` crosses dots) over parameter names as in "
        "model.named_parameters(), e.g. 'model.layers.1.*' or '*.mlp.*'. A parameter that no pattern "
        "matches is frozen; each pattern must match a parameter.",
    )


def _trainable_kind(value: Any) -> str | None:
    """Which form of `trainable` a value is ("all", {lora: ...}, {patterns: ...}), by its one key."""
    if isinstance(value, str):
        return value if value == "all" else None
    if isinstance(value, Lora | Patterns):
        return "lora" if isinstance(value, Lora) else "patterns"
    keys = list(value) if isinstance(value, dict) else []
    return keys[0] if len(keys) == 1 and keys[0] in ("lora", "patterns") else None


# What the trainer trains. Anything but "all" publishes only what changes (a partial update).
Trainable = Annotated[
    Annotated[Literal["all"], Tag("all")]
    | Annotated[Lora, Tag("lora")]
    | Annotated[Patterns, Tag("patterns")],
    Discriminator(
        _trainable_kind,
        custom_error_type="trainable",
        custom_error_message="expected all, {lora: {rank, alpha, targets, dropout}} or {patterns: [...]}",
    ),
]
