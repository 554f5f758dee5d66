"""A reward function that raises, hangs or returns NaN is a recorded failure, not a dead worker;
named parts, per-group calls and the overlong penalty reach the store."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from asyncflow.config import ModelConfig, RolloutConfig
from asyncflow.tasks import Example
from asyncflow.tasks.sorting import SortDigits
from dataplane.client import StoreClient
from dataplane.memory.local import serve_locally
from workers.kinds import TokenKind
from workers.policy import make_tokenizer
from workers.reward import RewardWorker, overlong, parts_of
from workers.samples import PARTITION, REWARD, SCHEMA

_release = threading.Event()


def _raises(prompt: str, response: str, answer: str) -> float:
    raise ValueError(f"cannot parse {response!r}")


def _hangs(prompt: str, response: str, answer: str) -> float:
    _release.wait(10)
    return 1.0


def _exact(prompt: str, response: str, answer: str) -> float:
    return float(response == answer)


async def test_failures_are_recorded_and_scoring_goes_on():
    worker = RewardWorker(_raises, None, None, timeout_s=0.2, failure_reward=-1.0, batch_rows=8)
    assert await worker._score("1>", "x", "1") == (-1.0, "ValueError: cannot parse 'x'", {})
    worker.reward_fn = _hangs
    value, error, _ = await worker._score("1>", "1", "1")
    assert (value, error) == (-1.0, "timed out after 0.2 s")
    worker.reward_fn = _exact
    assert await worker._score("1>", "1", "1") == (1.0, "", {})  # the pool still has threads for new calls
    assert worker.stats["failures"] == 2 and worker.stats["timeouts"] == 1
    _release.set()
    worker.close()


async def test_a_nan_or_infinite_reward_is_a_failure():
    for bad in (float("nan"), float("inf"), "-inf"):
        worker = RewardWorker(
            lambda p, r, a, v=bad: v, None, None, timeout_s=1, failure_reward=-1.0, batch_rows=8
        )
        value, error, _ = await worker._score("1>", "1", "1")
        assert value == -1.0 and "not a finite number" in error
        assert worker.stats["failures"] == 1
        worker.close()


def test_a_dict_of_parts_sums_to_the_reward_and_bad_results_are_named():
    assert parts_of(0.5) == (0.5, {})
    assert parts_of({"correct": 1, "format": 0.25}) == (1.25, {"correct": 1.0, "format": 0.25})
    for bad, says in (({}, "empty dict"), ({"a": float("nan")}, "not a finite number")):
        with pytest.raises(ValueError, match=says):
            parts_of(bad)
    with pytest.raises(TypeError):
        parts_of(None)


def test_the_overlong_penalty_ramps_over_the_buffer():
    # max 20 tokens, buffer 8: free up to 12, then linear to -penalty at 20
    assert [overlong(n, 20, 8, 0.5) for n in (5, 12, 16, 20)] == [0.0, 0.0, -0.25, -0.5]


@pytest.fixture
async def store():
    address, stop = await serve_locally()
    client = await StoreClient.connect(address)
    await client.create_partition(PARTITION, SCHEMA, consumers=[REWARD, "probe"])
    yield client
    await client.close()
    await stop()


def _kind() -> TokenKind:
    task = SortDigits()
    return TokenKind(make_tokenizer(task), ModelConfig(), RolloutConfig(max_new_tokens=4))


async def _put_responses(store, kind: TokenKind, responses: list[str], n: int) -> None:
    """Groups of `n` rows of one prompt each, with responses already generated."""
    prompts = kind.prompts([Example("3>", "3")] * (len(responses) // n))["prompt_ids"]
    ids = [kind.tokenizer.encode(r) for r in responses]
    await store.put(PARTITION, {
        "prompt_ids": [prompts[i // n] for i in range(len(responses))],
        "prompt_index": [i // n for i in range(len(responses))],
        "sample_index": [i % n for i in range(len(responses))], "answer": ["3"] * len(responses),
        "admit_version": [0] * len(responses), "response_ids": [np.asarray(r, np.int64) for r in ids],
        "info": [json.dumps({"row": i}) for i in range(len(responses))],
        "behavior_logprobs": [np.zeros(len(r), np.float32) for r in ids],
        "token_versions": [np.zeros(len(r), np.int64) for r in ids], "finish": ["stop"] * len(responses),
    }, group_size=n)  # fmt: skip


def _group_rank(prompts: list, responses: list, answers: list) -> list:
    """A group-relative reward: 1 for the group's first correct response, parts for the rest."""
    first = next((i for i, (r, a) in enumerate(zip(responses, answers)) if r == a), None)
    return [
        {"first": float(i == first), "correct": float(r == a)}
        for i, (r, a) in enumerate(zip(responses, answers))
    ]


async def test_parts_per_group_calls_and_the_overlong_part_reach_the_store(store):
    kind = _kind()
    await _put_responses(store, kind, ["3", "3", "123", "3", "3333", "3"], n=3)
    calls: list[int] = []

    def counted(prompts, responses, answers):
        calls.append(len(responses))
        return _group_rank(prompts, responses, answers)

    # max_new_tokens 4, buffer 2: free up to 2 tokens, -0.5 at 3, -1 at 4
    worker = RewardWorker(counted, kind, store, timeout_s=5, failure_reward=-1.0, batch_rows=6,
                          per_group=3, overlong=(4, 2, 1.0))  # fmt: skip
    assert await worker.work(6) == 6
    assert calls == [3, 3]  # one call per group of three
    got = await store.get(PARTITION, ["reward", "reward_parts", "prompt_index", "sample_index"], 6, "probe")
    rows = sorted(zip(got["prompt_index"], got["sample_index"], got["reward"], got["reward_parts"]))
    parts = [json.loads(p) for *_, p in rows]
    assert [p["first"] for p in parts] == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert [p["correct"] for p in parts] == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert [p["overlong"] for p in parts] == [0.0, 0.0, -0.5, 0.0, -1.0, 0.0]
    assert [r for *_, r, _ in rows] == pytest.approx([sum(p.values()) for p in parts])
    worker.close()


async def test_a_per_group_function_returning_the_wrong_count_fails_its_rows(store):
    kind = _kind()
    await _put_responses(store, kind, ["3", "1"], n=2)
    worker = RewardWorker(lambda p, r, a: [1.0], kind, store, timeout_s=5, failure_reward=-1.0,
                          batch_rows=2, per_group=2)  # fmt: skip
    await worker.work(2)
    got = await store.get(PARTITION, ["reward", "reward_error"], 2, "probe")
    assert list(got["reward"]) == [-1.0, -1.0]
    assert all("must return a list of 2 rewards" in e for e in got["reward_error"])
    worker.close()


async def test_a_reward_function_that_takes_info_gets_the_records_metadata(store):
    kind = _kind()
    await _put_responses(store, kind, ["3", "1"], n=2)
    seen = []

    def with_meta(prompt, response, answer, info):
        seen.append(info)
        return float(info["row"])

    worker = RewardWorker(with_meta, kind, store, timeout_s=5, failure_reward=-1.0, batch_rows=2)
    await worker.work(2)
    got = await store.get(PARTITION, ["reward", "sample_index"], 2, "probe")
    assert sorted(zip(got["sample_index"], got["reward"])) == [(0, 0.0), (1, 1.0)]
    assert sorted(s["row"] for s in seen) == [0, 1]
    worker.close()
