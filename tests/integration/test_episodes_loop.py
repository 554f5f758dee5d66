"""examples/calculator.yaml end to end at toy size, sync and async: multi-turn episodes whose
environment runs in its own Ray actor, the real store, the torch engine and the trainer."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from asyncflow.config import load_config
from asyncflow.recipes.grpo import train
from asyncflow.rundir import RunDir

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]
EXAMPLE = Path(__file__).parents[2] / "examples" / "calculator.yaml"


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_the_calculator_example_trains_on_episodes(tmp_path, ray_session, mode):
    config = load_config(EXAMPLE, [
        f"output_dir={tmp_path}", f"dataplane.name=episodes-{uuid.uuid4().hex[:8]}", f"mode={mode}",
        "trainer.steps=2", "trainer.batch_prompts=2", "rollout.groups_per_call=2", "rollout.n=4",
        "warmup.steps=130", "task.eval_prompts=8", "trainer.checkpoint_every=0",
    ])  # fmt: skip
    summary = train(config, display=False)
    assert summary["steps"] == 2
    metrics = RunDir(summary["run_dir"]).metrics()
    # warm-started on demonstrations: the model calls the tool and some episodes succeed
    assert any(m["reward_mean"] > 0 for m in metrics)
    on_policy = metrics if mode == "sync" else metrics[:1]  # async: later steps may train older episodes
    assert all(m["logprob_diff_max"] < 1e-3 for m in on_policy)  # mask and positions line up
    assert "reward/correct" in metrics[0]
