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
            "reward": more.pop("task_reward", "asyncflow.tasks.rewards:final_number"),
            "reward_options": more.pop("reward_options", {}),
            "eval_prompts": 8,
        },  # fmt: skip
        "rollout": {"n": 4, "groups_per_call": 4, "max_new_tokens": 8, **more.pop("rollout", {})},
        "trainer": more.pop("trainer", {"steps": 6, "batch_prompts": 4, "checkpoint_every": 3}),
        "dataplane": {"name": f"ckpt-{uuid.uuid4().hex[:8]}", "capacity_rows": 256},
        **more,
    }
    return parse_config(data)


@pytest.mark.parametrize("engine", ["torch", "vllm"])
def test_a_checkpoint_trains_on_a_data_set_and_exports_what_it_trained(
    ray_session, tmp_path, checkpoints, engine
):
    graded = "asyncflow.tasks.rewards:graded"  # named parts: correct, format (+ overlong)
    config = config_for(
        tmp_path,
        checkpoints["qwen2"],
        rollout={"engine": engine},
        reward={"overlong_buffer": 4},
        task_reward=graded,
    )
    summary = train(config, display=False)
    assert summary["steps"] == 6 and summary["eval_reward_after"] is not None
    assert_exactly_once(summary, n=4)  # two epochs of 12 prompts, each prompt's 4 samples trained once
    metrics = RunDir(summary["run_dir"]).metrics()
    assert [m["step"] for m in metrics] == list(range(1, 7)) and all(m["response_len"] > 0 for m in metrics)
    for m in metrics:  # every part is logged, and the reward is their sum
        parts = [m["reward/correct"], m["reward/format"], m["reward/overlong"]]
        assert m["reward/overlong"] <= 0 and sum(parts) == pytest.approx(m["reward_mean"], abs=1e-5)
    assert min(m["reward/overlong"] for m in metrics) < 0  # random 8-token responses run into the buffer

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


def test_a_data_set_run_resumed_mid_epoch_trains_every_kept_prompt_exactly_once(
    ray_session, tmp_path, checkpoints
):
    """A Parquet data set with prompts the checkpoint has no room for (256 positions, 8 for the
    response): they never reach an engine (which would refuse them), the run stops after 3 steps
    mid-epoch and --resume continues it to 7; at k = 0, where the trainer waits for whole batches,
    the dropped prompts cost no step. Every admitted prompt is trained once, and each epoch of
    prompt indices is the kept records, each once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workers.kinds import make_kind
    from workers.policy import make_task

    long = [{"role": "user", "content": "What is 1 plus 1? " * 40}]  # ~360 tokens
    rows = [
        {
            "messages": long if a in (3, 8) else [{"role": "user", "content": f"What is {a} plus 1?"}],
            "answer": a + 1,
        }
        for a in range(12)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet", row_group_size=5)
    options = {"path": str(tmp_path / "train.parquet"), "messages": "messages"}
    task = {"source": "asyncflow.tasks.dataset:Dataset", "options": options, "eval_prompts": 0,
            "reward": "asyncflow.tasks.rewards:final_number"}  # fmt: skip
    trainer = {"steps": 3, "batch_prompts": 4, "checkpoint_every": 3}
    config = config_for(tmp_path, checkpoints["qwen2"], task=task, trainer=trainer, staleness=0)
    first = train(config, display=False)
    assert first["prompts_dropped"] == {"train": 2} and first["max_prompt_tokens"] == 248
    assert first["admitted_prompts"] % 10 != 0  # the checkpoint is mid-epoch (10 kept prompts)
    run_dir = first["run_dir"]
    resumed = train(RunDir.open(run_dir).config(["trainer.steps=7"]), resume=run_dir, display=False)
    assert [m["step"] for m in RunDir(run_dir).metrics()] == list(range(1, 8))
    trained = assert_exactly_once(resumed, n=4)
    assert resumed["admitted_prompts"] in (28, 32)  # k = 0: at most the next step's batch ahead

    data = make_task(config.task, config.seed)  # the prompts as every worker of the run indexes them
    make_kind(config, data)
    indices = sorted({p for p, _ in trained})
    assert indices == list(range(28))  # at k = 0, step s trains prompts 4(s - 1) .. 4s - 1
    records = [data.example(i).answer for i in indices]
    assert "4" not in records and "9" not in records  # the long prompts (answers 4, 9) were dropped
    for epoch in range(2):
        assert sorted(records[epoch * 10 : epoch * 10 + 10], key=int) == [
            str(a + 1) for a in range(12) if a not in (3, 8)
        ]


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


def test_a_lora_run_publishes_only_the_adapted_weights_and_exports_them_merged(
    ray_session, tmp_path, checkpoints
):
    """LoRA on q_proj and v_proj of the Qwen2 checkpoint, rolled out by vLLM on-policy: every step
    publishes the four merged weights alone and vLLM's log-probs stay the trainer's; the export is
    the base with those four weights merged, and vLLM serves it with transformers' log-probs."""
    from transformers import AutoModelForCausalLM

    from workers.trainable import make_trainable, plain_model

    lora = {"lora": {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}}
    trainer = {"steps": 4, "batch_prompts": 4, "checkpoint_every": 2, "lr": 1e-2, "trainable": lora}
    config = config_for(
        tmp_path, checkpoints["qwen2"], rollout={"engine": "vllm"}, staleness=0, trainer=trainer
    )
    summary = train(config, display=False)
    assert summary["steps"] == 4
    metrics = RunDir(summary["run_dir"]).metrics()
    base = AutoModelForCausalLM.from_pretrained(checkpoints["qwen2"])
    targets = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")]
    state = base.state_dict()
    whole = sum(t.numel() * t.element_size() for t in state.values())
    lora_bytes = sum(state[n].numel() * state[n].element_size() for n in targets)  # q and v, merged
    assert {m["publish_bytes"] for m in metrics} == {lora_bytes} and lora_bytes < whole / 4
    assert all(0 <= m["mismatch_kl"] < 1e-6 for m in metrics), [m["mismatch_kl"] for m in metrics]

    out = export(summary["run_dir"], tmp_path / "exported")
    exported = AutoModelForCausalLM.from_pretrained(out)
    trained = make_trainable(
        AutoModelForCausalLM.from_pretrained(checkpoints["qwen2"]), config.trainer.trainable
    )
    load_model(
        trained, str(RunDir(summary["run_dir"]).latest_checkpoint()[0] / "trainer" / "model.safetensors")
    )
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, plain_model(trained)(ids).logits)
    changed = [n for n, t in exported.state_dict().items() if not torch.equal(t, state[n])]
    assert sorted(changed) == sorted(targets)  # the adapters merged into their targets, nothing else moved
    assert_served_by_vllm_with_the_logprobs_of(exported, str(out))


def assert_served_by_vllm_with_the_logprobs_of(model, path: str) -> None:
    import asyncio

    from asyncflow.algorithms import pack, token_logprobs
    from asyncflow.config import ModelConfig, RolloutConfig
    from services.serving import Request, SamplingParams
    from services.serving.vllm import VLLMEngine
    from workers.kinds import TokenKind
    from workers.policy import make_tokenizer

    kind = TokenKind(make_tokenizer(None, ModelConfig(path=path)), ModelConfig(path=path), RolloutConfig())
    engine = VLLMEngine(path, eos_token_id=kind.stop_ids[0], kv_cache_gib=0.0625)
    try:
        prompt = kind.prompt_ids([{"role": "user", "content": "What is 2 plus 2?"}])
        params = SamplingParams(max_new_tokens=6, stop_token_ids=kind.stop_ids)
        out = asyncio.run(engine.generate([Request("0", prompt, 2, params)]))
        ids, targets, mask = pack([c.prompt_ids for c in out], [c.response_ids for c in out])
        with torch.no_grad():
            lp = token_logprobs(model(ids).logits[:, :-1], targets)
        behavior = torch.tensor([v for c in out for v in c.logprobs])
        assert (lp[mask] - behavior).abs().max().item() <= 1e-4
    finally:
        asyncio.run(engine.close())


def test_a_lora_run_resumes_from_its_checkpoint(ray_session, tmp_path, checkpoints):
    """Adapters and their optimizer state come back from the checkpoint; the resumed run goes on
    publishing the adapted weights alone, and every sample is trained once across the two."""
    lora = {"lora": {"rank": 4, "targets": ["q_proj", "v_proj"]}}
    trainer = {"batch_prompts": 4, "checkpoint_every": 2, "lr": 1e-2, "trainable": lora}
    first = train(config_for(tmp_path, checkpoints["llama"], trainer={"steps": 2, **trainer}), display=False)
    run_dir = first["run_dir"]
    resumed = train(
        config_for(tmp_path, checkpoints["llama"], trainer={"steps": 4, **trainer}),
        resume=run_dir,
        display=False,
    )
    assert resumed["steps"] == 4
    assert_exactly_once(resumed, n=4)
    metrics = RunDir(run_dir).metrics()
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert len({m["publish_bytes"] for m in metrics}) == 1 and metrics[0]["publish_bytes"] == 4 * 64 * 64 * 4


def test_a_reward_model_scores_whole_groups_in_its_own_stage(
    ray_session, tmp_path, checkpoints, reward_model
):
    """A sequence-classifier checkpoint as the reward, made once per reward worker (two of them),
    one forward per group: every sample gets its score (a random classifier scores every response
    differently), none fails, and the run trains every sample exactly once."""
    task_reward = "asyncflow.tasks.reward_models:RewardModel"
    config = config_for(
        tmp_path, checkpoints["qwen2"], task_reward=task_reward, reward={"per_group": True, "num_workers": 2},
        trainer={"steps": 3, "batch_prompts": 4}, reward_options={"path": reward_model},
    )  # fmt: skip
    summary = train(config, display=False)
    assert summary["steps"] == 3
    assert_exactly_once(summary, n=4)
    metrics = RunDir(summary["run_dir"]).metrics()
    reward = metrics[-1]["workers"]["reward"]  # the last step always reports the workers
    assert reward["failures"] == 0 and reward["samples"] >= 3 * 4 * 4
    assert len({m["reward_mean"] for m in metrics}) == 3  # scores of the model, not a constant
