"""What the trainer trains (`trainer.trainable`): every parameter, LoRA adapters, or the
parameters some fnmatch patterns name; and what it publishes for engines to load.

Engines hold the base model, named as in its state_dict. A publication of a partly trained
model carries only what training changes, under those names: the trainable parameters
(patterns), or the merged weight W + (alpha / rank) * B @ A of each adapted module (LoRA).
Everything it leaves out is frozen, so it still holds the value every engine started from
(or took from the first, whole, publication). This module knows nothing about engines,
the weight store or Ray.
"""

from __future__ import annotations

import copy
import fnmatch
from typing import Any

import torch
from torch import Tensor

from asyncflow.config import Lora, Patterns, Trainable

__all__ = ["check_trainable", "make_trainable", "plain_model", "publication", "trainable_parameters"]


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ImportError(
            "trainer.trainable: lora trains adapters with peft, which is not installed; install the "
            "`lora` extra (pip install -e '.[lora]' in an AsyncFlow checkout, or pip install "
            "'peft>=0.21'), or set trainer.trainable: all"
        ) from None
    return peft


def _adaptable(model: torch.nn.Module) -> list[str]:
    """Names of the modules peft can put an adapter on (linear, embedding, GPT-2's Conv1D)."""
    kinds = (torch.nn.Linear, torch.nn.Embedding)
    return [n for n, m in model.named_modules() if isinstance(m, kinds) or type(m).__name__ == "Conv1D"]


def _targeted(name: str, targets: tuple[str, ...]) -> bool:
    """Whether peft puts an adapter on the module `name`: it is a target or ends with '.' + one."""
    return any(name == t or name.endswith(f".{t}") for t in targets)


def check_trainable(model: torch.nn.Module, trainable: Trainable) -> None:
    """Raise ValueError if a LoRA target or a pattern matches nothing in `model`, naming it and
    some names that exist."""
    if isinstance(trainable, Lora):
        _peft()  # missing, it fails here: before any actor starts
        modules = _adaptable(model)
        targets = trainable.lora.targets
        unmatched = [t for t in targets if not any(_targeted(n, (t,)) for n in modules)]
        if unmatched:
            leaves = sorted({n.rpartition(".")[2] for n in modules})
            raise ValueError(
                f"trainer.trainable.lora.targets {list(targets)}: {unmatched} match no linear or embedding "
                f"module of the model; its modules are named {leaves[:20]} (e.g. {modules[:3]}). "
                "Pick targets among them"
            )
    elif isinstance(trainable, Patterns):
        names = [n for n, _ in model.named_parameters()]
        unmatched = [p for p in trainable.patterns if not fnmatch.filter(names, p)]
        if unmatched:
            raise ValueError(
                f"trainer.trainable.patterns {list(trainable.patterns)}: {unmatched} match no parameter "
                f"of the model (fnmatch over names such as {names[:6]}, {len(names)} in all); fix them"
            )


def make_trainable(model: torch.nn.Module, trainable: Trainable) -> torch.nn.Module:
    """`model` ready to train as configured: as it is (all), its unmatched parameters frozen
    (patterns), or wrapped by peft with adapters on the targets (lora)."""
    check_trainable(model, trainable)
    if isinstance(trainable, Patterns):
        for name, p in model.named_parameters():
            p.requires_grad_(any(fnmatch.fnmatchcase(name, pattern) for pattern in trainable.patterns))
    elif isinstance(trainable, Lora):
        peft, c = _peft(), trainable.lora
        # GPT-2's Conv1D stores its weight transposed (in x out): peft must know to merge it so
        transposed = any(
            type(m).__name__ == "Conv1D" and _targeted(n, c.targets) for n, m in model.named_modules()
        )
        config = peft.LoraConfig(
            r=c.rank, lora_alpha=c.alpha, target_modules=list(c.targets), lora_dropout=c.dropout,
            fan_in_fan_out=transposed,
        )  # fmt: skip
        model = peft.get_peft_model(model, config)
    return model


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


@torch.no_grad()
def _merged(model: Any) -> dict[str, Tensor]:
    """Each adapted module's merged weight W + (alpha / rank) * B @ A, under the base model's name."""
    out = {}
    for name, module in model.get_base_model().named_modules():
        if hasattr(module, "get_delta_weight"):  # a peft LoRA layer around the base one
            weight = module.get_base_layer().weight
            # the merged weight in W's own layout (peft transposes for GPT-2's Conv1D)
            out[f"{name}.weight"] = weight + module.get_delta_weight("default").to(weight.dtype)
    return out


def publication(model: torch.nn.Module, trainable: Trainable, *, whole: bool) -> dict[str, Tensor]:
    """The tensors an engine holding the base model needs, named as in the base model's
    state_dict: all of them (`whole`), or those that training changes."""
    if not _is_peft(model):
        if whole or trainable == "all":
            return model.state_dict()
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    merged = _merged(model)
    if not whole:
        return merged
    base: Any = model
    state = {
        k.replace(".base_layer.", "."): v
        for k, v in base.get_base_model().state_dict().items()
        if ".lora_" not in k
    }
    return {**state, **merged}


@torch.no_grad()
def plain_model(model: torch.nn.Module) -> Any:
    """The model in its base architecture (what transformers and vLLM load): a copy with the
    adapters merged for LoRA, `model` itself otherwise."""
    if not _is_peft(model):
        return model
    wrapped: Any = copy.deepcopy(model)
    return wrapped.merge_and_unload()
