"""Real checkpoints (Llama, Qwen2, GPT-2 shapes; a BPE tokenizer with a chat template): prompts
rendered with the template, stop on the end-of-turn token, token in and token out, and the trainer's
log-probs equal to the engine's."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from asyncflow.config import ModelConfig, RolloutConfig, parse_config
from asyncflow.errors import ConfigError
from asyncflow.tasks import Example
from workers.kinds import TokenKind, TokenSample
from workers.policy import check_body_and_head, enable_gradient_checkpointing, make_tokenizer

ARCHS = ("llama", "qwen2", "gpt2")


def kind_for(path: str, chunk_tokens: int = 0, **rollout) -> TokenKind:
    model = ModelConfig(path=path)
    return TokenKind(make_tokenizer(None, model), model, RolloutConfig(**rollout), chunk_tokens=chunk_tokens)


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_messages_use_the_checkpoints_template_and_stop_on_its_end_of_turn(checkpoints, arch):
    kind = kind_for(checkpoints[arch])
    ids = kind.prompt_ids([{"role": "user", "content": "What is 3 plus 4?"}])
    text = kind.tokenizer.decode(ids)
    assert text == "<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n"
    im_end = kind.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert kind.stop_ids[0] == kind.tokenizer.eos_token_id and im_end in kind.stop_ids
    assert kind.params().stop_token_ids == kind.stop_ids
    assert kind.prompt_ids("What is 3 plus 4?") == kind.tokenizer.encode("What is 3 plus 4?")  # no BOS to add


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (8, 0.9)])
def test_the_trainer_recomputes_what_the_engine_sampled_token_for_token(checkpoints, arch, top_k, top_p):
    kind = kind_for(checkpoints[arch], temperature=0.9, top_k=top_k, top_p=top_p, max_new_tokens=12)
    model = kind.model(0)  # the checkpoint's weights
    engine = kind.engine(seed=3)
    asyncio.run(engine.update_weights(0, model.state_dict()))
    examples = [
        Example([{"role": "user", "content": f"What is {a} plus {a}?"}], str(2 * a)) for a in range(4)
    ]
    prompts = kind.prompts(examples)["prompt_ids"]
    out = asyncio.run(
        engine.generate([kind.request(str(i), p, 3, kind.params()) for i, p in enumerate(prompts)])
    )
    fields = kind.results(out)
    data = {
        "prompt_ids": [prompts[int(c.request_id)] for c in out],
        **fields,
        "reward": np.zeros(len(out), np.float32),
    }
    rows = kind.rows(data, list(range(len(out))), reference=False)
    assert [r.response for r in rows] == [
        list(c.response_ids) for c in out
    ]  # the ids sampled are the ids trained
    with torch.no_grad():
        lp, mask = kind.logprobs(model, rows)
    behavior = torch.tensor([v for r in rows for v in r.behavior])
    assert (lp[mask] - behavior).abs().max().item() <= 1e-4
    text = kind.reward_args(prompts[0], fields["response_ids"][0], "x")[1]
    assert "<|im_end|>" not in text and "<|endoftext|>" not in text  # decoded once, without the stop token


def test_a_path_that_is_not_a_checkpoint_and_a_shape_beside_a_path_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="no config.json: it is not a Hugging Face model directory"):
        parse_config({"model": {"path": str(tmp_path)}})
    with pytest.raises(ConfigError, match="its shape comes from it; remove \\['hidden_size'\\]"):
        parse_config({"model": {"path": "org/model", "hidden_size": 128}})


def test_chat_messages_need_a_chat_template(checkpoints, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoints["llama"])
    tok.chat_template = None
    kind = TokenKind(tok, ModelConfig(path=checkpoints["llama"]), RolloutConfig())
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        kind.prompt_ids([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_logprobs_and_gradient_checkpointing_change_no_value_or_gradient(checkpoints, arch):
    """The memory settings cut the work differently, nothing more: on chat-templated samples the
    log-probs and the gradients are those of one whole pass, in train mode."""
    figures = []
    for chunk_tokens, checkpointing in [(0, False), (5, False), (0, True), (5, True)]:
        kind = kind_for(checkpoints[arch], chunk_tokens, temperature=0.9, top_k=8, top_p=0.9)
        tok = kind.tokenizer
        rows = [
            TokenSample(kind.prompt_ids([{"role": "user", "content": f"What is {a} plus {a}?"}]),
                        [*tok.encode(f"It is {2 * a}.", add_special_tokens=False), kind.stop_ids[-1]],
                        [], [], 0.0, None)
            for a in (3, 14, 159)
        ]  # fmt: skip
        model = kind.model(0).train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        lp, mask = kind.logprobs(model, rows)
        weights = torch.linspace(-1, 1, int(mask.sum()))  # a loss that weighs every token differently
        (lp[mask] * weights).sum().backward()
        figures.append((lp[mask].detach(), [p.grad for p in model.parameters()]))
    (want, want_grads), *others = figures
    for got, grads in others:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_trainers_model_has_no_dropout_so_train_mode_gives_the_engines_logprobs(checkpoints, arch):
    kind = kind_for(checkpoints[arch])
    model = kind.model(0)  # GPT-2's config asks for dropout 0.1 on embeddings, attention and residuals
    ids = torch.tensor([kind.prompt_ids([{"role": "user", "content": "What is 3 plus 4?"}])])
    with torch.no_grad():
        evaluated = model.eval()(ids).logits
        torch.manual_seed(0)
        assert torch.equal(model.train()(ids).logits, evaluated)


def test_a_model_whose_logits_are_not_its_heads_is_refused_for_chunking():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, final_logit_softcapping=0.5,
    )  # fmt: skip
    with pytest.raises(
        ValueError, match="computes its logits otherwise than LM head.*logprob_chunk_tokens: 0"
    ):
        check_body_and_head(Gemma2ForCausalLM(config))
    with pytest.raises(ValueError, match="Linear does not support transformers' gradient checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))
