"""PPO with a learned critic (trainer.estimator: gae) end to end on the sort example: sync and
async k = 1 finish, every sample is trained exactly once, the critic's value loss falls and its
figures are logged each step; a run resumed from its checkpoint continues with the critic it saved."""

from __future__ import annotations

import statistics
import uuid
from pathlib import Path

import pytest
from test_rl_loop import assert_exactly_once  # pytest puts this folder on sys.path

from asyncflow.config import load_config
from asyncflow.recipes.grpo import train
from asyncflow.rundir import RunDir

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).parents[2] / "examples" / "sort.yaml"
PPO = ["trainer.estimator=gae", "trainer.critic={lr: 2.0e-3}"]
CRITIC_FIGURES = ("value_loss", "explained_variance", "value_mean", "value_clip_fraction", "policy_loss")


def _config(tmp_path, *overrides: str):
    name = f"ppo-{uuid.uuid4().hex[:8]}"
    return load_config(
        EXAMPLE,
        [f"output_dir={tmp_path}", f"dataplane.name={name}", "task.eval_prompts=0", *PPO, *overrides],
    )  # fmt: skip


@pytest.mark.parametrize(
    "overrides", [["mode=sync", "staleness=0"], ["staleness=1"]], ids=["sync", "async-k1"]
)
def test_ppo_trains_each_sample_once_and_its_value_loss_falls(ray_session, tmp_path, overrides):
    steps = 16
    config = _config(tmp_path, f"trainer.steps={steps}", "trainer.checkpoint_every=0", *overrides)
    summary = train(config, display=False)
    assert summary["steps"] == steps
    trained = assert_exactly_once(summary)
    assert len(trained) == steps * 16 * 8
    metrics = RunDir(summary["run_dir"]).metrics()
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for m in metrics:
        assert all(key in m for key in CRITIC_FIGURES), sorted(m)
    # step 1's critic predicts 0 (loss ½E[R²]); it learns the returns' level within a few steps, and
    # what is left is mostly the rewards' own variance
    losses = [m["value_loss"] for m in metrics]
    assert statistics.mean(losses[-8:]) < 0.8 * losses[0], losses
    assert metrics[0]["value_mean"] == 0.0  # the value head starts at zero
    if "staleness=0" in overrides:
        assert all(m["ratio_mean"] == 1.0 for m in metrics)  # lag 0, one minibatch: exactly on-policy


def test_a_ppo_run_resumes_with_its_critic(ray_session, tmp_path):
    first = train(_config(tmp_path, "trainer.steps=4", "trainer.checkpoint_every=2"), display=False)
    run_dir = first["run_dir"]
    assert (Path(run_dir) / "checkpoints" / "step_0000004" / "trainer" / "critic.safetensors").is_file()
    resumed = train(_config(tmp_path, "trainer.steps=8", "trainer.checkpoint_every=2"), resume=run_dir,
                    display=False)  # fmt: skip
    assert resumed["steps"] == 8
    assert_exactly_once(resumed)
    metrics = RunDir(run_dir).metrics()
    assert [m["step"] for m in metrics] == list(range(1, 9))
    # the resumed critic predicts as the saved one did, not from a zero head
    assert metrics[4]["value_mean"] != 0.0 and abs(metrics[4]["value_mean"] - metrics[3]["value_mean"]) < 0.2
