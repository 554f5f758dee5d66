"""Tiny model and tokenizer builder: ids, round trips, saved directories, refused shapes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from services.models import BOS_ID, EOS_ID, PAD_ID, build_model, build_tokenizer, save_model

SYMBOLS = "0123456789+= "


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_tokenizer_one_id_per_character_and_round_trip():
    tok = build_tokenizer(SYMBOLS)
    ids = tok.encode("12+3=")
    assert ids == [3 + SYMBOLS.index(c) for c in "12+3="]
    assert tok.decode(ids) == "12+3="
    assert tok.decode(tok.encode("1 + 2")) == "1 + 2"  # spaces are symbols, not separators
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert len(tok) == 3 + len(SYMBOLS)
    assert tok.decode([BOS_ID, *ids, EOS_ID], skip_special_tokens=True) == "12+3="


def test_tokenizer_rejects_bad_symbols():
    with pytest.raises(ValueError, match="single characters"):
        build_tokenizer(["1", "12"])
    with pytest.raises(ValueError, match="duplicates"):
        build_tokenizer("112")
    with pytest.raises(ValueError, match="no symbols"):
        build_tokenizer("")


def test_model_is_seeded_float32_with_special_ids():
    a, b, c = build_model(16, seed=0), build_model(16, seed=0), build_model(16, seed=1)
    assert a.dtype == torch.float32
    assert (a.config.pad_token_id, a.config.bos_token_id, a.config.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    state = torch.random.get_rng_state()
    build_model(16, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # the global stream is untouched


def test_model_rejects_head_dim_vllm_cannot_run():
    with pytest.raises(ValueError, match=r"head_dim .* = 16.*change num_heads"):
        build_model(16, hidden_size=64, num_heads=4)
    with pytest.raises(ValueError, match="not divisible"):
        build_model(16, hidden_size=64, num_heads=3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        build_model(16, hidden_size=128, num_heads=4, num_kv_heads=3)


def test_saved_directory_loads_in_transformers(tmp_path):
    tok = build_tokenizer(SYMBOLS)
    model = build_model(len(tok), num_kv_heads=1, tie_embeddings=True)
    save_model(model, tok, tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded_tok.encode("7+8=") == tok.encode("7+8=")
    assert loaded_tok.decode(loaded_tok.encode("7+8=")) == "7+8="
    ids = torch.tensor([tok.encode("12+3=")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
