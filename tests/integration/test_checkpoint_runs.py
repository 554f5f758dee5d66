"""A Hugging Face checkpoint trained on a data set end to end (real Ray, the store, the torch engine
and vLLM), then exported: what a user gets from `model.path` + `task.dataset` + `asyncflow export`."""

from __future__ import annotations

import json
import uuid

import pytest
import torch
from safetensors.torch import load_model
from test_rl_loop import assert_exactly_once  # pytest puts this folder on sys.path

from asyncflow.config import parse_config
from asyncflow.export import export
from asyncflow.recipes.grpo import train
from asyncflow.rundir import RunDir

pytestmark = pytest.mark.integration


def write_data(path, start: int, count: int) -> str:
    lines = [
        {
            "messages": [{"role": "user", "content": f"What is {a} plus {a % 7}?"}],
            "answer": f"#### {a + a % 7}",
        }
        for a in range(start, start + count)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return str(path)


def config_for(tmp_path, checkpoint: str, **more):
    data = {
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": checkpoint},
        "task": {
            "source": "asyncflow.tasks.dataset:Dataset",
            "options": {
                "path": write_data(tmp_path / "train.jsonl", 0, 12),
                "messages": "messages",
                "eval_path": write_data(tmp_path / "eval.jsonl", 100, 8),
            },
            "reward": "asyncflow.tasks.rewards:final_number",
            "eval_prompts": 8,
        },  # fmt: skip
        "rollout": {"n": 4, "groups_per_call": 4, "max_new_tokens": 8, **more.pop("rollout", {})},
        "trainer": {"steps": 6, "batch_prompts": 4, "checkpoint_every": 3},
        "dataplane": {"name": f"ckpt-{uuid.uuid4().hex[:8]}", "capacity_rows": 256},
        **more,
    }
    return parse_config(data)


@pytest.mark.parametrize("engine", ["torch", "vllm"])
def test_a_checkpoint_trains_on_a_data_set_and_exports_what_it_trained(
    ray_session, tmp_path, checkpoints, engine
):
    config = config_for(tmp_path, checkpoints["qwen2"], rollout={"engine": engine})
    summary = train(config, display=False)
    assert summary["steps"] == 6 and summary["eval_reward_after"] is not None
    assert_exactly_once(summary, n=4)  # two epochs of 12 prompts, each prompt's 4 samples trained once
    metrics = RunDir(summary["run_dir"]).metrics()
    assert [m["step"] for m in metrics] == list(range(1, 7)) and all(m["response_len"] > 0 for m in metrics)

    out = export(summary["run_dir"], tmp_path / "exported")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    checkpoint = RunDir(summary["run_dir"]).latest_checkpoint()[0] / "trainer" / "model.safetensors"
    trained = AutoModelForCausalLM.from_pretrained(checkpoints["qwen2"])  # the base, then the run's weights
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        base = trained(ids).logits
    load_model(trained, str(checkpoint))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trained(ids).logits)  # the exported policy is the trained one
        assert not torch.allclose(trained(ids).logits, base)  # and the run did train it
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_vllm_serves_a_checkpoint_with_the_trainers_logprobs(tmp_path, checkpoints, arch):
    """vLLM loads the checkpoint directory and takes the trainer's weights (a tied head's name
    included); on chat-templated prompts, with temperature, top-k and top-p, its log-probs are the
    trainer's in float32 (whole logits, and chunked through the head)."""
    import asyncio

    from asyncflow.config import ModelConfig, RolloutConfig
    from asyncflow.tasks import Example
    from services.serving.vllm import VLLMEngine
    from workers.kinds import TokenKind
    from workers.policy import make_tokenizer

    model_config = ModelConfig(path=checkpoints[arch])
    rollout = RolloutConfig(temperature=0.9, top_k=8, top_p=0.9, max_new_tokens=8)
    kinds = [
        TokenKind(make_tokenizer(None, model_config), model_config, rollout, chunk_tokens=chunk)
        for chunk in (0, 3)
    ]
    kind, model = kinds[0], kinds[0].model(0)
    engine = VLLMEngine(checkpoints[arch], eos_token_id=kind.stop_ids[0], kv_cache_gib=0.0625)
    try:
        with torch.no_grad():  # the trainer's weights, not the checkpoint's
            for p in model.parameters():
                p.mul_(1.5)
        asyncio.run(engine.update_weights(1, model.state_dict()))
        examples = [Example([{"role": "user", "content": f"What is {a} plus 2?"}], "") for a in range(3)]
        prompts = kind.prompts(examples)["prompt_ids"]
        requests = [kind.request(str(i), p, 2, kind.params()) for i, p in enumerate(prompts)]
        out = asyncio.run(engine.generate(requests))
    finally:
        asyncio.run(engine.close())
    data = {
        "prompt_ids": [prompts[int(c.request_id)] for c in out],
        **kind.results(out),
        "reward": [0.0] * len(out),
    }
    rows = kind.rows(data, list(range(len(out))), reference=False)
    behavior = torch.tensor([v for r in rows for v in r.behavior])
    for k in kinds:
        with torch.no_grad():
            lp, mask = k.logprobs(model, rows)
        assert (lp[mask] - behavior).abs().max().item() <= 1e-4
