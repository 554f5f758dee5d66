"""What every worker builds the same way: the task, its tokenizer, the policy's architecture
(and, for memory, its split into body and LM head and its gradient checkpointing).

Weights never come from here: the trainer makes version 0 and every other worker pulls
its weights from the weight store, so all of them run the same policy.
"""

from __future__ import annotations

from typing import Any

import torch

from asyncflow.config import ModelConfig, TaskConfig, import_string
from asyncflow.errors import ConfigError
from services.models import build_model, build_tokenizer


def make_task(config: TaskConfig, seed: int) -> Any:
    factory = import_string(config.source)
    options = {"seed": seed, **config.options}
    try:
        return factory(**options)
    except TypeError as e:
        raise ValueError(f"task {config.source} rejected task.options {config.options}: {e}") from None


def make_reward_fn(config: TaskConfig, *, evaluation: bool = False) -> Any:
    """The training reward, or with evaluation=True the held-out one (task.eval_reward, if set).
    With task.reward_options, `task.reward` names a factory (a reward model) made here with them."""
    if evaluation and config.eval_reward:
        return import_string(config.eval_reward)
    reward = import_string(config.reward)
    return reward(**config.reward_options) if config.reward_options else reward


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

        checkpoint = AutoModelForCausalLM.from_pretrained(
            config.path, revision=config.revision, trust_remote_code=config.trust_remote_code,
            dtype=getattr(torch, config.dtype),
        )  # fmt: skip
        return without_dropout(checkpoint).eval()
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


def without_dropout(model: Any) -> Any:
    """`model` with every dropout probability set to 0. The trainer runs in train mode and its
    log-probs are compared token by token with the engine's (importance ratios, the on-policy check):
    a checkpoint's dropout would make them differ at random (GPT-2's 0.1 moves a log-prob by ~0.4)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # Llama, Qwen2: a float
            module.attention_dropout = 0.0
    return model


def body_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A transformers causal LM as its body (ids -> final hidden states, final norm included:
    `model.base_model`) and its LM head (hidden states -> logits: `get_output_embeddings()`), so
    that log-probs can be computed a chunk of positions at a time."""
    if hasattr(model, "get_base_model"):  # LoRA (peft): the model with its adapters in place
        model = model.get_base_model()
    body = getattr(model, "base_model", model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is model or head is None:
        raise ValueError(
            f"{type(model).__name__} has no separate body (base_model) and LM head "
            "(get_output_embeddings()), which chunked log-probs need; set trainer.logprob_chunk_tokens: 0"
        )
    return body, head


@torch.no_grad()
def check_body_and_head(model: Any) -> None:
    """Refuse a model whose logits are not head(body(ids)) (a final soft-cap or logit scale, as
    Gemma 2 and Cohere apply after the head): chunked log-probs would silently differ from its own."""
    body, head = body_and_head(model)
    device = next(model.parameters()).device
    ids = torch.arange(4, device=device)[None] % int(model.config.vocab_size)  # (1, 4)
    whole = model(input_ids=ids, use_cache=False).logits.float()  # (1, 4, V)
    split = head(body(input_ids=ids, use_cache=False).last_hidden_state).float()
    if not torch.allclose(whole, split):
        raise ValueError(
            f"{type(model).__name__} computes its logits otherwise than LM head(base_model(ids)) (max diff "
            f"{(whole - split).abs().max().item():.3g}), so chunked log-probs would differ from its own; "
            "set trainer.logprob_chunk_tokens: 0"
        )


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each block's activations in the backward instead of keeping them (transformers'
    gradient_checkpointing_enable, non-reentrant: the recomputation sees the same RNG state).
    transformers applies it in train mode only."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"trainer.gradient_checkpointing is true, but {type(model).__name__} does not support "
            "transformers' gradient checkpointing; set trainer.gradient_checkpointing: false"
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def eos_ids(tokenizer: Any, generation: Any = None) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's EOS first, then those of a checkpoint's
    generation config (chat models often end a turn with a token of their own)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(generation, "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, list) else {extra} if isinstance(extra, int) else set()
    first = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return tuple(first + sorted(ids - set(first)))


def device_for(role: str, num_gpus: float) -> str:
    """Where this actor's models run: the GPU Ray assigned it when its role asks for some
    (`<role>.num_gpus`; Ray's CUDA_VISIBLE_DEVICES shows it as cuda:0), else the CPU."""
    if not num_gpus:
        return "cpu"
    if not torch.cuda.is_available():
        import os

        import ray

        raise ConfigError(
            f"{role}.num_gpus = {num_gpus:g}: Ray assigned this actor GPU {ray.get_gpu_ids()} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}), but torch "
            f"{torch.__version__} finds no CUDA device. Install a CUDA build of torch on the GPU nodes (the "
            f"image's cuda target), or set {role}.num_gpus: 0 to run it on the CPU"
        )
    return "cuda:0"


def set_threads(n: int) -> None:
    """torch threads of this process: one per actor beats several fighting over few cores."""
    torch.set_num_threads(n)
