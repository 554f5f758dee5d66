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

    # Many more steps than can run between the checkpoint and the kill: with 10 steps, a CI run
    # finished its last 7 steps within the second the test slept, and the kill met a run already closing.
    config = _config(
        tmp_path, "trainer.steps=20", "task.eval_prompts=0", "trainer.num_ranks=2",
        "trainer.checkpoint_every=3", "trainer.num_cpus=0.5",
    )  # fmt: skip
    runner, result = train_in_thread(config)
    wait_for_checkpoint(tmp_path, 3)
    time.sleep(0.3)  # into a later step
    ray.kill(ray.get_actor(f"{config.dataplane.name}.trainer1", namespace="asyncflow"))
    runner.join(timeout=300)
    assert "error" not in result, result.get("error")
    assert result["restarts"] == 1 and result["steps"] == 20
    assert_exactly_once(result)  # the steps after the checkpoint were trained again, from its rows


def bundles_in_use(name: str) -> dict[int, tuple[float, float]]:
    """Bundle index -> (free, total) CPUs of the run's placement group, as Ray accounts them."""
    import ray

    (group,) = [g for g in ray.util.placement_group_table().values() if g["name"] == f"{name}.placement"]
    total, free = ray.cluster_resources(), ray.available_resources()
    keys = {i: f"CPU_group_{i}_{group['placement_group_id']}" for i in group["bundles"]}
    return {i: (free.get(key, 0.0), total.get(key, 0.0)) for i, key in keys.items()}


def test_colocated_ranks_and_rollout_workers_share_their_bundles(ray_session, tmp_path):
    config = _config(
        tmp_path, "placement=colocated", "mode=sync", "trainer.steps=4", "task.eval_prompts=0",
        "trainer.num_ranks=2", "rollout.num_workers=2", "trainer.num_cpus=0.5",
    )  # fmt: skip
    runner, result = train_in_thread(config)
    seen: dict = {}
    while runner.is_alive() and not seen:
        try:
            use = bundles_in_use(config.dataplane.name)
        except ValueError:  # not made yet, or already removed
            use = {}
        if use and all(total > 0 and free == 0.0 for free, total in use.values()):  # placed, then taken
            seen = use
        time.sleep(0.05)
    runner.join(timeout=300)
    assert "error" not in result, result.get("error")
    assert result["steps"] == 4
    # rank i (0.5 CPUs) and rollout worker i (0.5) hold bundle i together, and nothing else does
    assert seen == {0: (0.0, 1.0), 1: (0.0, 1.0)}, seen


def test_a_colocated_pair_no_node_can_hold_is_named_with_the_fix(ray_session, tmp_path):
    from asyncflow.errors import ConfigError
    from asyncflow.recipes.grpo import train

    config = _config(
        tmp_path, "placement=colocated", "start_timeout_s=3", "task.eval_prompts=0",
        "rollout.resources={sandbox: 1}",
    )  # fmt: skip
    with pytest.raises(ConfigError) as e:
        train(config, display=False)
    message = str(e.value)
    assert "placement = 'colocated': bundles of a trainer rank and a rollout worker together, " in message
    assert "1 x (1.5 CPUs, sandbox: 1)" in message and "0 of its 0 sandbox free" in message, message
    assert "or set placement: split" in message
