"""Self-healing worker pools on real Ray, real processes and the torch engine: a reward that hangs
on some samples is killed sample by sample and the run finishes with them counted as failures; a
rollout engine that stops answering is found by its health probe and replaced; an elastic pool
grows while the trainer waits for it. Every run keeps the exactly-once ledger."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from test_rl_loop import _config, assert_exactly_once, train_in_thread

from asyncflow.recipes.grpo import train
from asyncflow.rundir import RunDir

pytestmark = pytest.mark.integration


def test_a_reward_that_hangs_on_some_samples_is_killed_and_the_run_finishes(ray_session, tmp_path):
    config = _config(
        tmp_path, "trainer.steps=4", "task.eval_prompts=0", "trainer.checkpoint_every=0", "warmup.steps=5",
        "task.reward=tests.integration.faulty_rewards:hangs_sometimes", "reward.isolation=process",
        "reward.timeout_s=0.5",
    )  # fmt: skip
    summary = train(config, display=False)
    assert summary["steps"] == 4
    assert_exactly_once(summary)
    last = RunDir(summary["run_dir"]).metrics()[-1]["workers"]["reward"]
    assert last["failures"] >= 1 and last["failures"] == last["timeouts"] == last["restarts"], last


STEPS = 60


def test_a_rollout_engine_that_stops_answering_is_replaced(ray_session, tmp_path):
    import ray

    config = _config(
        tmp_path, f"trainer.steps={STEPS}", "task.eval_prompts=0", "trainer.checkpoint_every=0",
        "warmup.steps=5", "rollout.groups_per_call=4", "dataplane.lease_s=5",
        "rollout.health.every_s=1", "rollout.health.timeout_s=4",
    )  # fmt: skip
    runner, result = train_in_thread(config)
    deadline, metrics = time.monotonic() + 180, Path()
    while time.monotonic() < deadline and not result:
        found = list(Path(tmp_path).glob("*/metrics.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 5:
            metrics = found[0]
            break
        time.sleep(0.1)
    assert metrics.exists(), f"the run did not reach step 5: {result}"
    # probes (every second) have found its engine working: its deadline is the probe's. A quiet
    # machine trains ~8 steps a second: the freeze lands early in the run's STEPS, not after its end.
    time.sleep(1.5)
    victim = ray.get_actor(f"{config.dataplane.name}.rollout0", namespace="asyncflow")
    pid = ray.get(victim.start.remote())
    os.kill(pid, signal.SIGSTOP)  # the only rollout worker: alive to Ray, answering nothing
    try:
        runner.join(timeout=300)
        if "error" in result:
            raise result["error"]
        assert result["steps"] == STEPS
        assert_exactly_once(result)
        assert RunDir(result["run_dir"]).metrics()[-1]["workers"]["rollout"]["replaced"] == 1
    finally:
        try:
            os.kill(pid, signal.SIGKILL)  # our own stopped process, should the test fail before
        except ProcessLookupError:
            pass


def test_a_reward_pool_that_holds_the_trainer_back_grows(ray_session, tmp_path):
    config = _config(
        tmp_path, "trainer.steps=30", "task.eval_prompts=0", "trainer.checkpoint_every=0", "warmup.steps=5",
        "task.reward=tests.integration.faulty_rewards:slow", "reward.processes=1",
        "reward.autoscale.max=2", "reward.autoscale.every_steps=2",
    )  # fmt: skip
    summary = train(config, display=False)
    assert summary["steps"] == 30
    assert_exactly_once(summary)
    sizes = [
        m["workers"]["reward"]["workers"] for m in RunDir(summary["run_dir"]).metrics() if "workers" in m
    ]
    assert sizes[0] == 1 and max(sizes) == 2, sizes  # it grew (a new worker takes seconds to join)
