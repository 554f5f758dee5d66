"""A reward function that raises, hangs or returns NaN is a recorded failure, not a dead worker."""

from __future__ import annotations

import threading

from workers.reward import RewardWorker

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
    assert await worker._score("1>", "x", "1") == (-1.0, "ValueError: cannot parse 'x'")
    worker.reward_fn = _hangs
    value, error = await worker._score("1>", "1", "1")
    assert (value, error) == (-1.0, "timed out after 0.2 s")
    worker.reward_fn = _exact
    assert await worker._score("1>", "1", "1") == (1.0, "")  # the pool still has threads for new calls
    assert worker.stats["failures"] == 2 and worker.stats["timeouts"] == 1
    _release.set()
    worker.close()


async def test_a_nan_or_infinite_reward_is_a_failure():
    for bad in (float("nan"), float("inf"), "-inf"):
        worker = RewardWorker(
            lambda p, r, a, v=bad: v, None, None, timeout_s=1, failure_reward=-1.0, batch_rows=8
        )
        value, error = await worker._score("1>", "1", "1")
        assert value == -1.0 and "not a finite number" in error
        assert worker.stats["failures"] == 1
        worker.close()
