"""The RL loop with a trainer of two ranks (Ray actors, one gloo group), end to end: each rank
reads its share from the store, the published shards make the engine's policy exactly the
trainer's, every sample is trained once, and a rank killed mid-run restarts the run from its
last checkpoint without training a sample twice."""

from __future__ import annotations

import time

import pytest

from asyncflow.rundir import RunDir
from tests.integration.test_rl_loop import _config, assert_exactly_once, train_in_thread, wait_for_checkpoint

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_ranks_train_on_policy_in_sync_mode(ray_session, tmp_path, parallel):
    from asyncflow.recipes.grpo import train

    config = _config(
        tmp_path, "mode=sync", "trainer.steps=6", "task.eval_prompts=0", "trainer.num_ranks=2",
        f"trainer.parallel={parallel}", "trainer.num_cpus=0.5",
    )  # fmt: skip
    summary = train(config, display=False)
    assert summary["steps"] == 6 and summary["restarts"] == 0
    assert_exactly_once(summary)
    metrics = RunDir(summary["run_dir"]).metrics()
    # the engine samples from the weights the ranks published in parts: on-policy, the importance
    # weights are 1 and the mismatch is 0 only if every shard landed where it belongs
    assert all(abs(m["is_weight_mean"] - 1) <= 1e-4 for m in metrics), [m["is_weight_mean"] for m in metrics]
    assert all(abs(m["mismatch_kl"]) <= 1e-6 for m in metrics)
    assert all(m["balance/imbalance"] >= 1.0 for m in metrics)  # both ranks' times were measured


def test_a_killed_rank_restarts_the_run_from_its_checkpoint(ray_session, tmp_path):
    import ray

    config = _config(
        tmp_path, "trainer.steps=10", "task.eval_prompts=0", "trainer.num_ranks=2",
        "trainer.checkpoint_every=3", "trainer.num_cpus=0.5",
    )  # fmt: skip
    runner, result = train_in_thread(config)
    wait_for_checkpoint(tmp_path, 3)
    time.sleep(1.0)  # into a later step
    ray.kill(ray.get_actor(f"{config.dataplane.name}.trainer1", namespace="asyncflow"))
    runner.join(timeout=300)
    assert "error" not in result, result.get("error")
    assert result["restarts"] == 1 and result["steps"] == 10
    assert_exactly_once(result)  # the steps after the checkpoint were trained again, from its rows
