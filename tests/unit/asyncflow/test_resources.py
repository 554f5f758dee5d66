"""Each role's resources from config (asyncflow.config.resources): what Ray is asked for per
actor, the run's sum, what a machine lacks, and the combinations refused at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncflow.config import load_config
from asyncflow.errors import ConfigError
from asyncflow.workflow.runtime import cpus_needed, missing_here

EXAMPLES = Path(__file__).parents[3] / "examples"


def _sort(*overrides: str):
    return load_config(EXAMPLES / "sort.yaml", list(overrides))


def test_a_role_asks_ray_for_what_its_section_says():
    config = _sort(
        "trainer.num_gpus=1", "trainer.memory_gb=16", "trainer.resources={H100: 1}", "rollout.num_gpus=0.5"
    )
    assert config.trainer.ray_options() == {
        "num_cpus": 1.0, "num_gpus": 1.0, "memory": 16 * 2**30, "resources": {"H100": 1.0}
    }  # fmt: skip
    assert config.trainer.bundle() == {"CPU": 1.0, "GPU": 1.0, "memory": 16 * 2**30, "H100": 1.0}
    assert config.trainer.asks() == "1 CPU, 1 GPU, 16 GiB, H100: 1"
    assert config.rollout.ray_options() == {"num_cpus": 0.5, "num_gpus": 0.5}
    assert config.reward.ray_options() == {"num_cpus": 0.25}  # nothing beyond CPUs unless asked


def test_the_runs_sum_counts_every_actor_of_every_role():
    config = _sort("trainer.num_gpus=1", "rollout.num_workers=3", "rollout.num_gpus=0.5",
                   "reward.resources={sandbox: 2}", "reward.num_workers=2")  # fmt: skip
    need = config.resources_needed()
    assert need["GPU"] == 1 + 3 * 0.5 and need["sandbox"] == 2 * 2
    d = config.dataplane
    cpus = 1.0 + 3 * 0.5 + 2 * 0.25 + 0.2 + d.controller_num_cpus + d.storage_num_cpus * d.num_storage_units
    assert need["CPU"] == pytest.approx(cpus) and cpus_needed(config) == need["CPU"]


def test_a_machine_without_what_the_run_asks_for_is_named_with_the_fields():
    config = _sort("trainer.num_gpus=1", "rollout.resources={H100: 1}", "reward.memory_gb=2")
    message = missing_here(config, {"CPU": 2.0, "memory": 2**31})
    assert "1 GPU (asked by trainer 1 x (1 CPU, 1 GPU); this machine has 0)" in message, message
    assert "1 H100 (asked by rollout 1 x (0.5 CPUs, H100: 1); this machine has 0)" in message, message
    assert "memory" not in message  # 2 GiB asked, 2 GiB there
    assert missing_here(_sort(), {"CPU": 1.0}) == ""  # CPUs: Ray started here offers what the run needs


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer.resources={GPU: 1}"], "resources names Ray's own 'GPU'; set num_gpus instead"),
        (["reward.resources={memory: 1}"], "resources names Ray's own 'memory'; set memory_gb instead"),
        (["rollout.resources={H100: 0}"], "resources['H100'] = 0.0; a custom resource is a positive amount"),
        (["rollout.num_gpus=-1"], "rollout.num_gpus"),
        (["trainer.num_gpus=1", "trainer.num_ranks=2"], "trainer.num_gpus = 1 with trainer.num_ranks = 2"),
        (
            ["rollout.engine=vllm", "rollout.vllm.tensor_parallel_size=2", "rollout.num_gpus=1"],
            "tensor_parallel_size = 2 runs a vLLM worker per GPU, but rollout.num_gpus = 1",
        ),
        (["rollout.vllm.tensor_parallel_size=2"], "splits vLLM's model, but engine='torch'"),
        (["rollout.num_gpus=1.5"], "num_gpus = 1.5: Ray gives an actor a fraction of one GPU or whole GPUs"),
        (
            ["placement=colocated", "trainer.num_gpus=1", "rollout.num_gpus=0.5"],
            "puts trainer.num_gpus = 1 and rollout.num_gpus = 0.5 on one bundle, 1.5 GPUs",
        ),
        (
            ["trainer.num_gpus=1", "trainer.estimator=gae", "trainer.critic={}"],
            "trainer.num_gpus = 1 with trainer.estimator = 'gae'",
        ),
    ],
)
def test_bad_resource_settings_are_refused_with_the_fix(overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("(", r"\(")):
        _sort(*overrides)


def test_flow_policies_refuse_gpus():
    with pytest.raises(ConfigError, match="rollout.num_gpus = 1: flow policies run on the CPU"):
        load_config(EXAMPLES / "flow-2d.yaml", ["rollout.num_gpus=1"])


def test_a_role_without_gpus_runs_on_the_cpu_and_one_with_gpus_needs_cuda(ray_session):
    import torch

    from workers.policy import device_for

    assert device_for("rollout", 0) == "cpu"
    if torch.cuda.is_available():
        assert device_for("rollout", 1) == "cuda:0"
    else:
        with pytest.raises(ConfigError, match=r"rollout.num_gpus = 1: Ray assigned this actor GPU \[\]"):
            device_for("rollout", 1)  # the driver holds no GPU: the message still says what Ray gave


def test_environment_actors_are_counted_per_rollout_worker():
    config = load_config(EXAMPLES / "calculator.yaml", ["rollout.num_workers=2", "env.num_workers=3"])
    plain = load_config(EXAMPLES / "calculator.yaml", ["rollout.num_workers=2", "env.source=null"])
    e = config.env
    assert config.roles()["env"] == (e, 6) and "env" not in plain.roles()
    assert cpus_needed(config) == pytest.approx(cpus_needed(plain) + 6 * e.num_cpus)
    assert config.env.ray_options() == {"num_cpus": e.num_cpus}


def test_colocated_pairs_each_trainer_rank_with_a_rollout_worker_in_one_bundle():
    config = _sort(
        "placement=colocated", "trainer.num_ranks=2", "rollout.num_workers=3", "trainer.num_cpus=0.5"
    )
    pair, alone = {"CPU": 0.5 + 0.5}, {"CPU": 0.5}
    assert config.bundles() == [pair, pair, alone]  # the third worker has no rank beside it
    assert config.resources_needed() == _sort("trainer.num_ranks=2", "rollout.num_workers=3",
                                              "trainer.num_cpus=0.5").resources_needed()  # fmt: skip
    shared = _sort(
        "placement=colocated", "trainer.num_gpus=0.5", "rollout.num_gpus=0.5", "rollout.num_workers=2"
    )
    assert shared.bundles() == [{"CPU": 1.5, "GPU": 1.0}, {"CPU": 0.5, "GPU": 0.5}]  # one GPU, shared
    assert _sort("trainer.num_ranks=2").bundles() == [{"CPU": 1.0}] * 2  # split: the ranks' own group
    assert _sort().bundles() == []  # split, one rank: Ray places every actor freely


def test_joining_a_cluster_that_lacks_what_the_run_asks_for_says_so_at_once(ray_session, caplog):
    from asyncflow.workflow.runtime import warn_if_missing

    have = ray_session.cluster_resources()  # the session's Ray: 8 CPUs, no GPU
    caplog.set_level("WARNING", logger="asyncflow")
    warn_if_missing(_sort())
    assert not caplog.records  # everything there
    config = _sort("trainer.num_gpus=1", "rollout.num_workers=20")
    warn_if_missing(config)
    (record,) = caplog.records
    message = record.getMessage()
    assert "1 GPU (asked by trainer 1 x (1 CPU, 1 GPU); the cluster has 0)" in message, message
    assert f"{cpus_needed(config):g} CPU (asked by " in message  # 20 workers' CPUs: more than it has
    assert f"the cluster has {have['CPU']:g})" in message
    assert "waits up to start_timeout_s = 600 s" in message
