"""Tiny causal language models and symbol-level tokenizers, built in code.

Nothing is downloaded: examples and tests build their model and tokenizer here, save them
as an ordinary Hugging Face directory, and every engine (the torch engine in process,
vLLM from disk) loads that directory. The tokenizer maps each single-character symbol to
one token, so "12+3=" is five tokens and decoding gives the text back without spaces.

This module knows nothing about RL, engines or the data store; it only makes weights and
vocabularies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

if TYPE_CHECKING:  # the model classes load on first use: a role that only tokenizes never pays for them
    from transformers import LlamaForCausalLM, PreTrainedModel

__all__ = [
    "BOS_ID",
    "CHAT_TEMPLATE",
    "EOS_ID",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "SUPPORTED_HEAD_DIMS",
    "build_bpe_tokenizer",
    "build_checkpoint",
    "build_model",
    "build_tokenizer",
    "mixed_precision",
    "save_model",
]

# Special tokens come first, so their ids are the same for every symbol set.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# Head sizes vLLM's CPU attention kernels accept; a model outside this set would train
# here and then fail to load in vLLM, so the builder refuses it up front.
SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def build_tokenizer(symbols: Sequence[str]) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per symbol: ids 0, 1, 2 are <pad>, <bos>, <eos>, then the symbols in order.

    Encoding adds no special tokens (a prompt is exactly its characters); a character
    outside `symbols` is an error at encode time rather than a silent unknown token.
    """
    symbols = list(symbols)
    bad = [s for s in symbols if not isinstance(s, str) or len(s) != 1]
    if bad:
        raise ValueError(
            f"build_tokenizer: symbols must be single characters, got {bad!r}; "
            "split multi-character symbols into characters"
        )
    dupes = sorted({s for s in symbols if symbols.count(s) > 1})
    if dupes:
        raise ValueError(f"build_tokenizer: symbols must be unique, got duplicates {dupes!r}; drop them")
    if not symbols:
        raise ValueError(
            "build_tokenizer: got no symbols; pass the characters your task uses, e.g. '0123456789+='"
        )
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *symbols])}
    # WordLevel needs an unknown token name; it is not in the vocabulary, so an unknown
    # character fails loudly instead of mapping to a token the model was never given.
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.FixedLength(length=1)  # every character is a word
    tok.decoder = decoders.Fuse()  # join tokens with no separator
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL_TOKENS[PAD_ID],
        bos_token=SPECIAL_TOKENS[BOS_ID],
        eos_token=SPECIAL_TOKENS[EOS_ID],
        clean_up_tokenization_spaces=False,
    )
    return hf


def build_model(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int | None = None,
    max_positions: int = 64,
    seed: int = 0,
    tie_embeddings: bool = False,
) -> LlamaForCausalLM:
    """A randomly initialised float32 Llama; the same arguments and seed give the same weights.

    The global torch RNG is left as it was, so building a model inside a test or a recipe
    does not shift anyone else's random stream.
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"build_model: vocab_size={vocab_size} leaves no room beside the {len(SPECIAL_TOKENS)} special "
            "tokens; pass len(tokenizer)"
        )
    if hidden_size % num_heads:
        raise ValueError(
            f"build_model: hidden_size={hidden_size} is not divisible by num_heads={num_heads}; "
            "pick num_heads that divides hidden_size"
        )
    head_dim = hidden_size // num_heads
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"build_model: head_dim = hidden_size // num_heads = {hidden_size} // {num_heads} = {head_dim}, "
            f"but vLLM supports head_dim in {SUPPORTED_HEAD_DIMS}; change num_heads or hidden_size "
            f"(e.g. num_heads={max(1, hidden_size // 32)} for head_dim 32)"
        )
    from transformers import LlamaConfig, LlamaForCausalLM

    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if kv_heads < 1 or num_heads % kv_heads:
        raise ValueError(
            f"build_model: num_kv_heads={num_kv_heads} must divide num_heads={num_heads}; "
            "use a divisor of num_heads or None (one kv head per head)"
        )
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=tie_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float().eval()  # float32 even if the caller changed torch's default dtype


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: str | Path) -> Path:
    """Write a Hugging Face directory (config, safetensors, tokenizer) that transformers and vLLM load."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


# A ChatML-style template (as Qwen's): each turn between <|im_start|>role and <|im_end|>.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_bpe_tokenizer(
    texts: Sequence[str], vocab_size: int = 512, chat_template: str | None = CHAT_TEMPLATE
):
    """A byte-level BPE tokenizer trained on `texts`, with <|endoftext|>, <|im_start|> and <|im_end|>
    and a chat template: the kind of tokenizer a real checkpoint ships, made in seconds."""
    from tokenizers import trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(texts), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:], clean_up_tokenization_spaces=False,
    )  # fmt: skip
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


def build_checkpoint(
    arch: str, tokenizer: PreTrainedTokenizerFast, path: str | Path, *, hidden_size: int = 64,
    num_layers: int = 2, num_heads: int = 2, max_positions: int = 256, seed: int = 0,
    eos_token_ids: Sequence[int] = (),
) -> Path:  # fmt: skip
    """A tiny randomly initialised checkpoint of architecture `arch` ("llama", "qwen2" or "gpt2")
    with `tokenizer`, saved as a Hugging Face directory that transformers and vLLM load.
    `eos_token_ids` go into its generation config (a chat model's end-of-turn token)."""
    from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config, LlamaConfig, Qwen2Config

    vocab = len(tokenizer)
    common: dict[str, Any] = {
        "vocab_size": vocab,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    decoder: dict[str, Any] = {
        "hidden_size": hidden_size, "intermediate_size": 4 * hidden_size, "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": num_heads,
        "max_position_embeddings": max_positions,
    }  # fmt: skip
    if arch == "llama":
        config: object = LlamaConfig(tie_word_embeddings=False, **decoder, **common)
    elif arch == "qwen2":
        config = Qwen2Config(tie_word_embeddings=True, **decoder, **common)
    elif arch == "gpt2":
        config = GPT2Config(
            n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_positions,
            bos_token_id=tokenizer.eos_token_id, **common,
        )  # fmt: skip
    else:
        raise ValueError(f"build_checkpoint: arch {arch!r} is not one of 'llama', 'qwen2', 'gpt2'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).float()
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id, *eos_token_ids])
    return save_model(model, tokenizer, path)


def mixed_precision(module: torch.nn.Module, dtype: str) -> contextlib.AbstractContextManager:
    """torch.autocast to `dtype` ("bfloat16") on the device of `module`'s parameters: matmuls in
    `dtype`, parameters untouched; "off": a context that changes nothing."""
    if dtype == "off":
        return contextlib.nullcontext()
    return torch.autocast(next(module.parameters()).device.type, dtype=getattr(torch, dtype))
