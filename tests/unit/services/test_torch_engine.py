"""The torch engine against the model it wraps: every sampled token and log-prob is checked
with a plain teacher-forced forward of the same weights."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

import services.serving
from services.models import EOS_ID, PAD_ID, build_model
from services.serving import Engine, Request, SamplingParams
from services.serving.torch_engine import TorchEngine, sample_tokens

VOCAB = 20
GREEDY = SamplingParams(top_k=1, max_new_tokens=10)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_a():
    return build_model(VOCAB, seed=0)


@pytest.fixture(scope="module")
def model_b():
    return build_model(VOCAB, seed=1)


def engine_for(model, **kwargs) -> TorchEngine:
    return TorchEngine(model, eos_token_id=EOS_ID, pad_token_id=PAD_ID, **kwargs)


def prompts(count: int) -> list[list[int]]:
    """Prompts of different lengths (1..5), so a batch is left-padded."""
    return [[3 + (i * 7 + j) % (VOCAB - 3) for j in range(1 + i % 5)] for i in range(count)]


@torch.no_grad()
def teacher_logprobs(model, prompt: list[int], response: list[int], temperature: float = 1.0) -> torch.Tensor:
    """(len(response), V) log-probs of the positions that predict each response token, unpadded."""
    ids = torch.tensor([prompt + response])
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # (R, V)
    return torch.log_softmax(logits / temperature, -1)


def test_public_api_and_protocol(model_a):
    assert sorted(services.serving.__all__) == [
        "Completion", "Engine", "FinishReason", "Request", "SamplingParams", "check_fits",
    ]  # fmt: skip
    assert isinstance(engine_for(model_a), Engine)


async def test_completions_grouped_with_lengths_and_finish_reasons(model_a):
    engine = engine_for(model_a)
    stop = SamplingParams(max_new_tokens=7, stop_token_ids=(5, 6))
    requests = [Request(f"r{i}", p, n=1 + i % 3, params=stop) for i, p in enumerate(prompts(6))]
    out = await engine.generate(requests)
    assert [(c.request_id, c.index) for c in out] == [(r.request_id, i) for r in requests for i in range(r.n)]
    for c in out:
        assert c.prompt_ids == requests[int(c.request_id[1:])].prompt_ids
        assert 1 <= len(c.response_ids) <= 7
        assert len(c.logprobs) == len(c.versions) == len(c.response_ids)
        assert c.versions == [0] * len(c.response_ids)
        stops = {EOS_ID, 5, 6}
        assert not stops & set(c.response_ids[:-1])  # nothing is returned after a stop token
        if c.finish_reason == "stop":
            assert c.response_ids[-1] in stops
        else:
            assert (c.finish_reason, len(c.response_ids)) == ("length", 7)
    assert {c.finish_reason for c in out} == {"stop", "length"}
    assert engine.stats["tokens_generated"] == sum(len(c.response_ids) for c in out)


async def test_eos_stops_and_max_new_tokens_caps(model_a):
    (first,) = await engine_for(model_a).generate([Request("a", [4, 5], params=GREEDY)])
    greedy_first = first.response_ids[0]
    # The engine's EOS always stops, and the stop token is kept.
    (c,) = await TorchEngine(model_a, eos_token_id=greedy_first, pad_token_id=PAD_ID).generate(
        [Request("a", [4, 5], params=GREEDY)]
    )
    assert (c.response_ids, c.finish_reason) == ([greedy_first], "stop")
    (c,) = await engine_for(model_a).generate(
        [Request("a", [4, 5], params=SamplingParams(top_k=1, max_new_tokens=3))]
    )
    assert c.response_ids == first.response_ids[:3]
    assert c.finish_reason == ("stop" if c.response_ids[-1] == EOS_ID else "length")


async def test_same_seed_same_samples(model_a):
    requests = [Request(f"r{i}", p, n=4) for i, p in enumerate(prompts(3))]
    a = await engine_for(model_a, seed=7).generate(requests)
    b = await engine_for(model_a, seed=7).generate(requests)
    c = await engine_for(model_a, seed=8).generate(requests)
    assert [x.response_ids for x in a] == [x.response_ids for x in b]
    assert [x.logprobs for x in a] == [x.logprobs for x in b]
    assert [x.response_ids for x in a] != [x.response_ids for x in c]


async def test_logprobs_match_a_teacher_forced_forward(model_a):
    # Left padding (prompt lengths 1..5), n > 1, responses of different lengths, T != 1.
    params = SamplingParams(temperature=0.7, max_new_tokens=12, stop_token_ids=(7,))
    requests = [Request(f"r{i}", p, n=3, params=params) for i, p in enumerate(prompts(5))]
    out = await engine_for(model_a, seed=3).generate(requests)
    assert len({len(c.response_ids) for c in out}) > 1
    worst = 0.0
    for c in out:
        ref = teacher_logprobs(model_a, c.prompt_ids, c.response_ids, 0.7)
        ref = ref.gather(-1, torch.tensor(c.response_ids)[:, None]).squeeze(-1)
        worst = max(worst, (ref - torch.tensor(c.logprobs)).abs().max().item())
    assert worst <= 1e-5


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (3, 1.0), (0, 0.8), (5, 0.9)])
async def test_the_trainer_recomputes_the_engine_logprobs_for_every_sampler_setting(model_a, top_k, top_p):
    """At lag 0 the importance ratio is 1 whatever the sampler keeps: the trainer truncates too."""
    from asyncflow.algorithms import pack, token_logprobs

    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, max_new_tokens=12)
    out = await engine_for(model_a, seed=5).generate(
        [Request(f"r{i}", p, n=4, params=params) for i, p in enumerate(prompts(6))]
    )
    ids, targets, mask = pack([c.prompt_ids for c in out], [c.response_ids for c in out])
    with torch.no_grad():
        lp = token_logprobs(model_a(ids).logits[:, :-1], targets, 0.8, top_k, top_p)  # (B, L-1)
    ratios = torch.cat([(lp[i][mask[i]] - torch.tensor(c.logprobs)).exp() for i, c in enumerate(out)])
    assert (ratios - 1).abs().max().item() < 1e-4


async def test_top_k_one_is_argmax(model_a):
    out = await engine_for(model_a).generate(
        [Request(f"r{i}", p, n=2, params=GREEDY) for i, p in enumerate(prompts(4))]
    )
    for c in out:
        ref = teacher_logprobs(model_a, c.prompt_ids, c.response_ids)
        assert c.response_ids == ref.argmax(-1).tolist()
        assert c.logprobs == [0.0] * len(c.response_ids)  # all mass on one token
    assert out[0].response_ids == out[1].response_ids


def test_sample_tokens_top_p_keeps_the_nucleus_and_renormalises():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).repeat(4000, 1)  # (B, V)
    tokens, logprobs = sample_tokens(
        logits,
        torch.ones(4000),
        top_k=torch.zeros(4000, dtype=torch.long),
        top_p=torch.full((4000,), 0.7),
        generator=torch.Generator().manual_seed(0),
    )
    # Mass before token 1 is 0.5 < 0.7, before token 2 it is 0.8: the nucleus is {0, 1}.
    assert set(tokens.tolist()) == {0, 1}
    expected = torch.log(torch.tensor([0.5, 0.3]) / 0.8)
    torch.testing.assert_close(logprobs, expected[tokens], rtol=0, atol=1e-6)
    assert abs((tokens == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    # top-k then top-p: k=3 renormalises to (0.526, 0.316, 0.158); p=0.9 keeps all three.
    tokens, logprobs = sample_tokens(
        logits[:1000], torch.ones(1000), top_k=torch.full((1000,), 3), top_p=torch.full((1000,), 0.9)
    )
    assert set(tokens.tolist()) == {0, 1, 2}
    torch.testing.assert_close(logprobs, torch.log(torch.tensor([0.5, 0.3, 0.15]) / 0.95)[tokens])


async def test_engine_top_p_samples_lie_in_the_nucleus(model_a):
    params = SamplingParams(temperature=0.5, top_p=0.4, max_new_tokens=8)
    out = await engine_for(model_a).generate(
        [Request(f"r{i}", p, n=4, params=params) for i, p in enumerate(prompts(4))]
    )
    for c in out:
        full = teacher_logprobs(model_a, c.prompt_ids, c.response_ids, 0.5)  # (R, V)
        for pos, (token, logprob) in enumerate(zip(c.response_ids, c.logprobs)):
            probs, order = full[pos].exp().sort(descending=True)
            nucleus = order[(probs.cumsum(0) - probs) < 0.4]
            assert token in nucleus.tolist()
            mass = full[pos, nucleus].exp().sum().item()
            assert mass < 1 and logprob > full[pos, token].item()  # renormalised upward
            assert abs(logprob - (full[pos, token].item() - math.log(mass))) <= 1e-5


async def test_update_weights_switches_outputs_to_the_new_model(model_a, model_b):
    requests = [Request(f"r{i}", p, params=GREEDY) for i, p in enumerate(prompts(4))]
    on_b = await engine_for(build_model(VOCAB, seed=1)).generate(requests)
    engine = engine_for(build_model(VOCAB, seed=0))
    on_a = await engine.generate(requests)
    assert [c.response_ids for c in on_a] != [c.response_ids for c in on_b]
    await engine.update_weights(1, model_b.state_dict())  # idle, not paused
    after = await engine.generate(requests)
    assert engine.version == 1
    assert [c.response_ids for c in after] == [c.response_ids for c in on_b]
    assert all(c.versions == [1] * len(c.response_ids) for c in after)


@pytest.mark.parametrize("paused", [True, False])
async def test_update_mid_generate_switches_version_once(model_a, model_b, paused):
    engine = engine_for(build_model(VOCAB, seed=0))
    prompt, params = [4, 9, 11], SamplingParams(top_k=1, max_new_tokens=12)
    task = asyncio.create_task(engine.generate([Request("r", prompt, params=params)]))
    for _ in range(5):  # each yield lets the generate task run one step
        await asyncio.sleep(0)
    if paused:
        await engine.pause()
        for _ in range(5):
            await asyncio.sleep(0)  # paused: no step runs however often we yield
    await engine.update_weights(1, model_b.state_dict())
    if paused:
        await engine.resume()
    (c,) = await task
    switch = c.versions.index(1)
    assert 0 < switch < len(c.versions) and c.versions == [0] * switch + [1] * (len(c.versions) - switch)
    # Before the switch model A chose each token, after it model B (teacher-forced on the same prefix).
    by_a = teacher_logprobs(model_a, prompt, c.response_ids).argmax(-1).tolist()
    by_b = teacher_logprobs(model_b, prompt, c.response_ids).argmax(-1).tolist()
    assert c.response_ids[:switch] == by_a[:switch]
    assert c.response_ids[switch:] == by_b[switch:]


async def test_update_weights_rejects_unknown_names_and_shapes(model_a):
    model = build_model(VOCAB, seed=0)
    engine = engine_for(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = {"model.norm.weight": torch.zeros(64)}
    with pytest.raises(ValueError, match=r"unknown names \['nope'\]"):
        await engine.update_weights(1, {**good, "nope": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"lm_head.weight: got \(3,\), expected \(20, 64\)"):
        await engine.update_weights(1, {**good, "lm_head.weight": torch.zeros(3)})
    assert engine.version == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


async def test_requests_beyond_max_batch_size_run_in_chunks(model_a):
    requests = [Request(f"r{i}", p, n=3, params=GREEDY) for i, p in enumerate(prompts(4))]
    whole = await engine_for(model_a).generate(requests)
    chunked = await engine_for(model_a, max_batch_size=5).generate(requests)
    assert [(c.request_id, c.index, c.response_ids) for c in chunked] == [
        (c.request_id, c.index, c.response_ids) for c in whole
    ]


def counted(prefill, rows: list[int]):
    """`prefill`, noting the rows of each call in `rows`."""

    def call(ids, mask):
        rows.append(len(ids))
        return prefill(ids, mask)

    return call


async def test_a_requests_rows_share_one_prefill_of_its_prompt(model_a):
    """GRPO asks for n samples of each prompt: the prompt is prefilled once and its cache copied to
    the n rows (the first forward holds one row per request), in chunks that split a request too;
    the samples are those of a prefill per row, which test_logprobs_match_a_teacher_forced_forward
    checks token by token."""
    requests = [Request(f"r{i}", p, n=8, params=GREEDY) for i, p in enumerate(prompts(4))]
    for max_batch_size, first_rows in ((256, [4]), (12, [2, 2, 1])):  # chunks of r0 + r1, r1 + r2, r3
        engine = engine_for(model_a, max_batch_size=max_batch_size)
        rows: list[int] = []
        engine._prefill = counted(engine._prefill, rows)
        out = await engine.generate(requests)
        assert rows == first_rows
        assert len(out) == 32
        for request in requests:  # greedy: a request's rows are alike
            assert len({tuple(c.response_ids) for c in out if c.request_id == request.request_id}) == 1


async def test_rows_that_finish_early_leave_the_forward_without_changing_the_others(model_a):
    """Caps of 1..12 tokens in one batch: the batch shrinks as rows finish, and every row's tokens
    and log-probs are what it gets alone."""
    requests = [
        Request(f"r{i}", p, params=SamplingParams(top_k=1, max_new_tokens=1 + i))
        for i, p in enumerate(prompts(12))
    ]
    together = await engine_for(model_a).generate(requests)
    assert len({len(c.response_ids) for c in together}) > 3  # rows left at different steps
    for request, c in zip(requests, together):
        (alone,) = await engine_for(model_a).generate([request])
        assert c.response_ids == alone.response_ids
        assert c.logprobs == pytest.approx(alone.logprobs, abs=1e-5)
        assert c.finish_reason == alone.finish_reason


async def test_bad_inputs_name_the_value_and_the_fix(model_a):
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        Request("r", [])
    with pytest.raises(ValueError, match="n=0"):
        Request("r", [3], n=0)
    with pytest.raises(ValueError, match="greedy is not supported.*small temperature"):
        SamplingParams(temperature=0.0)
    for top_p in (0.0, 1.5):
        with pytest.raises(ValueError, match=rf"top_p={top_p}: must be in \(0, 1\]"):
            SamplingParams(top_p=top_p)
    engine = engine_for(model_a)
    with pytest.raises(ValueError, match="= 74 exceeds the model's 64 positions"):
        await engine.generate([Request("r", [3] * 10, params=SamplingParams(max_new_tokens=64))])
    with pytest.raises(ValueError, match="prompt id 20 is outside the vocabulary of 20"):
        await engine.generate([Request("r", [3, 20])])


async def test_close_aborts_in_flight_and_refuses_later_calls(model_a):
    engine = engine_for(model_a)
    task = asyncio.create_task(
        engine.generate([Request("r", [3, 4], n=2, params=SamplingParams(max_new_tokens=20))])
    )
    for _ in range(3):
        await asyncio.sleep(0)
    await engine.pause()
    await engine.close()
    out = await task
    assert all(c.finish_reason in ("abort", "stop") for c in out)
    assert "abort" in {c.finish_reason for c in out} or all(c.response_ids[-1] == EOS_ID for c in out)
    for call in (engine.generate([Request("r", [3])]), engine.update_weights(1, {}), engine.pause()):
        with pytest.raises(RuntimeError, match="TorchEngine is closed"):
            await call


async def test_bfloat16_autocast_samples_with_float32_logprobs_near_the_float32_forward():
    model = build_model(VOCAB, seed=0)  # its own: the engine wraps this model's forward in autocast
    params = SamplingParams(temperature=0.7, max_new_tokens=12)
    requests = [Request(f"r{i}", p, n=3, params=params) for i, p in enumerate(prompts(5))]
    out = await engine_for(model, seed=3, autocast="bfloat16").generate(requests)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay float32
    float32 = build_model(VOCAB, seed=0)
    worst = 0.0
    for c in out:
        assert all(isinstance(lp, float) for lp in c.logprobs)
        ref = teacher_logprobs(float32, c.prompt_ids, c.response_ids, 0.7)
        ref = ref.gather(-1, torch.tensor(c.response_ids)[:, None]).squeeze(-1)
        worst = max(worst, (ref - torch.tensor(c.logprobs)).abs().max().item())
    assert 1e-4 < worst < 0.1  # bfloat16's rounding shows, and is small
