"""The cost-model engine: the Engine protocol's records, a heavy tail of lengths and of call
times, versions, pause and close. Time scales are microseconds, so the module runs in well
under a second."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time

import pytest
import torch

from services.serving import Engine, Request, SamplingParams
from services.serving.simulated import SimulatedEngine, response_length

VOCAB, EOS, STOP = 14, 2, 5


def engine(**kwargs) -> SimulatedEngine:
    options = {
        "vocab_size": VOCAB,
        "eos_token_id": EOS,
        "time_per_token_s": 1e-6,
        "min_tokens": 4,
        "alpha": 1.5,
    }
    return SimulatedEngine(**(options | kwargs))


def requests(count: int, n: int = 4, max_new_tokens: int = 64) -> list[Request]:
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=(STOP,))
    return [Request(f"r{i}", [1, 3 + i % 5], n, params) for i in range(count)]


async def test_protocol_records():
    e = engine(version=3)
    assert isinstance(e, Engine)
    completions = await e.generate(requests(5, n=3, max_new_tokens=16))
    assert [(c.request_id, c.index) for c in completions] == [
        (f"r{i}", j) for i in range(5) for j in range(3)
    ]
    for c in completions:
        assert 1 <= len(c.response_ids) <= 16
        assert len(c.logprobs) == len(c.versions) == len(c.response_ids)
        assert all(0 <= t < VOCAB for t in c.response_ids)
        assert all(t not in (EOS, STOP) for t in c.response_ids[:-1])  # only the last token may stop
        assert c.finish_reason == ("stop" if c.response_ids[-1] == EOS else "length")
        assert c.finish_reason == "stop" or len(c.response_ids) == 16
        assert c.logprobs == pytest.approx([-math.log(VOCAB)] * len(c.response_ids))
        assert set(c.versions) == {3}
        assert c.prompt_ids == [1, 3 + int(c.request_id[1:]) % 5]


def test_lengths_have_a_heavy_tail():
    rng = random.Random(0)
    lengths = [response_length(rng, min_tokens=8, alpha=1.5, max_new_tokens=100_000) for _ in range(20_000)]
    assert min(lengths) == 8
    assert 11 <= statistics.median(lengths) <= 14  # 8 * 2^(2/3) = 12.7
    p99 = sorted(lengths)[int(0.99 * len(lengths))]
    assert p99 > 10 * statistics.median(lengths)  # Pareto(1.5): the 99th percentile is 13.6x the median
    capped = [response_length(rng, min_tokens=8, alpha=1.5, max_new_tokens=32) for _ in range(1000)]
    assert max(capped) == 32


async def test_a_call_lasts_as_long_as_its_slowest_row():
    e = engine(time_per_token_s=2e-4, min_tokens=2, alpha=1.2)
    start = time.perf_counter()
    completions = await e.generate(requests(8, n=4, max_new_tokens=200))
    elapsed = time.perf_counter() - start
    longest = max(len(c.response_ids) for c in completions)
    assert elapsed >= 2e-4 * longest
    assert e.stats["generate_s"] == pytest.approx(2e-4 * longest)
    assert e.stats["tokens_generated"] == sum(len(c.response_ids) for c in completions)


async def test_versions_follow_update_weights():
    e = engine(version=-1, update_s=1e-4)
    await e.update_weights(7, {"w": torch.zeros(2)})
    assert e.version == 7
    assert {v for c in await e.generate(requests(2)) for v in c.versions} == {7}


async def test_same_seed_same_completions():
    a, b = engine(seed=1), engine(seed=1)
    ids = lambda cs: [c.response_ids for c in cs]  # noqa: E731
    assert ids(await a.generate(requests(4))) == ids(await b.generate(requests(4)))
    assert ids(await engine(seed=2).generate(requests(4))) != ids(await a.generate(requests(4)))


async def test_pause_holds_generation_until_resume():
    e = engine()
    await e.pause()
    call = asyncio.ensure_future(e.generate(requests(1)))
    await asyncio.sleep(0.01)
    assert not call.done()
    await e.resume()
    assert len(await call) == 4


async def test_close_then_calls_fail():
    e = engine()
    await e.close()
    with pytest.raises(RuntimeError, match="closed"):
        await e.generate(requests(1))


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="eos_token_id=20"):
        SimulatedEngine(vocab_size=VOCAB, eos_token_id=20, time_per_token_s=0.0)
    with pytest.raises(ValueError, match="alpha=0"):
        engine(alpha=0)
