"""Reward processes: a hung call is killed within its deadline and the next call runs; a call
past the memory limit, one that raises and one whose value msgpack cannot carry fail alone;
arguments and results cross the pipe as msgpack; a reward that cannot load stops the worker."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from asyncflow.errors import WorkerError
from workers.reward import RewardWorker
from workers.reward_pool import RewardFailed, RewardProcesses


@pytest.fixture
async def pool():
    processes = RewardProcesses("pool_rewards:hangs", processes=1, memory_limit_mb=64)
    yield processes
    processes.close()


async def test_a_hung_call_is_killed_within_its_deadline_and_the_next_call_runs(pool):
    await pool.start()
    assert await pool.call(["p", "1", "1"], "", 5.0) == 1.0
    start = time.perf_counter()
    with pytest.raises(TimeoutError):
        await pool.call(["p", "hang", "1"], "", 0.5)
    assert time.perf_counter() - start < 0.5 + 0.5  # killed at its deadline, not left running
    assert pool.restarts == 1
    assert await pool.call(["p", "2", "1"], "", 10.0) == 0.0  # a fresh process answers


async def test_a_batch_goes_as_one_message_and_a_hung_call_in_it_fails_alone(pool):
    """call_many: every call answered in order; the hung one is killed at its own deadline and the
    calls after it run in a fresh process."""
    await pool.start()
    first = next(iter(pool._live)).proc.pid
    start = time.perf_counter()
    results = await pool.call_many([(["p", r, "1"], "") for r in ("1", "0", "hang", "1", "2")], 0.5)
    assert time.perf_counter() - start < 0.5 + 1.0
    assert results[:2] == [1.0, 0.0] and results[3:] == [1.0, 0.0]
    assert isinstance(results[2], TimeoutError) and pool.restarts == 1
    assert next(iter(pool._live)).proc.pid != first


async def test_a_batch_with_an_allocation_past_the_limit_or_a_value_the_wire_cannot_carry():
    pool = RewardProcesses("pool_rewards:allocates", processes=1, memory_limit_mb=64)
    try:
        results = await pool.call_many(
            [(["p", "8", ""], ""), (["p", "512", ""], ""), (["p", "8", ""], "")], 10.0
        )
        assert results[0] == 1.0 and results[2] == 1.0
        assert isinstance(results[1], RewardFailed) and "MemoryError" in str(results[1])
        results = await pool.call_many(
            [(["p", "8", ""], ""), (["p", object(), ""], ""), (["p", "8", ""], "")], 10.0
        )
        assert results[0] == 1.0 and results[2] == 1.0
        assert isinstance(results[1], RewardFailed) and "cannot be sent" in str(results[1])
    finally:
        pool.close()


async def test_a_call_past_the_memory_limit_fails_that_call_only():
    pool = RewardProcesses("pool_rewards:allocates", processes=1, memory_limit_mb=64)
    try:
        with pytest.raises(RewardFailed, match="MemoryError: .*reward.memory_limit_mb"):
            await pool.call(["p", "512", ""], "", 10.0)
        assert await pool.call(["p", "8", ""], "", 10.0) == 1.0
        assert pool.restarts == 1  # the process that ran out of memory was replaced
    finally:
        pool.close()


async def test_a_reward_that_raises_or_returns_what_msgpack_cannot_carry_fails_alone():
    for spec, match in [("pool_rewards:raises", "ValueError: cannot parse 'x'"),
                        ("pool_rewards:unencodable", "object")]:  # fmt: skip
        pool = RewardProcesses(spec, processes=1)
        try:
            with pytest.raises(RewardFailed, match=match):
                await pool.call(["p", "x", ""], "", 10.0)
            assert pool.restarts == 0  # the process answered: it keeps serving
        finally:
            pool.close()


async def test_arguments_and_metadata_round_trip_as_msgpack():
    pool = RewardProcesses("pool_rewards:echo", processes=1)
    try:
        condition = np.arange(6, dtype=np.float32).reshape(2, 3)  # a flow policy's condition: an array
        value = await pool.call([condition, "abcd", "x"], '{"a": 1, "b": [2]}', 10.0)
        assert value == {"prompt": 15.0, "response": 4.0, "info": 2.0}
    finally:
        pool.close()


async def test_calls_run_in_parallel_across_the_processes():
    pool = RewardProcesses("pool_rewards:pid", processes=2)
    try:
        pids = set(await asyncio.gather(*(pool.call(["p", "r", "a"], "", 10.0) for _ in range(4))))
        assert len(pids) == 2
    finally:
        pool.close()


async def test_a_reward_made_from_options_is_made_in_each_process():
    pool = RewardProcesses("pool_rewards:Scaled", {"scale": 2.5}, processes=1)
    try:
        assert await pool.call(["p", "1", "1"], "", 10.0) == 2.5
    finally:
        pool.close()


async def test_a_reward_that_cannot_load_stops_the_worker_with_its_cause():
    pool = RewardProcesses("pool_rewards:missing", processes=1)
    try:
        with pytest.raises(
            WorkerError, match="could not load 'pool_rewards:missing'.*no attribute 'missing'"
        ):
            await pool.start()
        with pytest.raises(WorkerError):  # every later call says the same
            await pool.call(["p", "1", "1"], "", 1.0)
    finally:
        pool.close()


async def test_the_worker_records_a_killed_call_as_a_failure_and_goes_on():
    pool = RewardProcesses("pool_rewards:hangs", processes=2)
    worker = RewardWorker(pool, None, None, timeout_s=0.5, failure_reward=-1.0, batch_rows=8)
    try:
        await worker.start()
        scored = [await worker._score("p", r, "1") for r in ("1", "hang", "1")]
        assert scored == [(1.0, "", {}), (-1.0, "timed out after 0.5 s", {}), (1.0, "", {})]
        assert worker.stats["failures"] == 1 and worker.stats["timeouts"] == 1
        assert worker.stats["restarts"] == 1
    finally:
        worker.close()


def test_a_reward_process_dies_with_the_worker_that_started_it(tmp_path):
    """A worker killed mid-call (SIGKILL: no close) leaves no hung reward process behind."""
    import os
    import signal
    import subprocess
    import sys

    script = (
        "import asyncio, sys\n"
        "from workers.reward_pool import RewardProcesses\n"
        "async def main():\n"
        "    pool = RewardProcesses('pool_rewards:hangs', processes=1)\n"
        "    await pool.start()\n"
        "    print(next(iter(pool._live)).proc.pid, flush=True)\n"
        "    await pool.call(['p', 'hang', '1'], '', 3600)\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    child = int(worker.stdout.readline())
    time.sleep(0.2)  # the call is in flight
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the reward process outlived its worker")
