"""examples/flow-2d.yaml end to end at toy size: a flow-matching policy post-trained by the same
workflow as the token examples (Ray actors, store, weight store, staleness bound)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from asyncflow.config import load_config
from asyncflow.recipes.grpo import train
from asyncflow.rundir import RunDir
from tests.integration.test_rl_loop import assert_exactly_once

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).parents[2] / "examples" / "flow-2d.yaml"


@pytest.mark.parametrize("staleness", [0, 4])
def test_flow_policy_learns_to_hit_the_target_mode(ray_session, tmp_path, staleness):
    config = load_config(
        EXAMPLE,
        [
            f"output_dir={tmp_path}", f"dataplane.name=flow-{uuid.uuid4().hex[:8]}", f"staleness={staleness}",
            "flow.hidden_size=64", "warmup.steps=1500", "trainer.steps=80", "trainer.lr=1e-3",
            "trainer.checkpoint_every=40", "task.eval_prompts=1000",
        ],
    )  # fmt: skip
    summary = train(config, display=False)
    assert summary["eval_reward_before"] <= 0.3, summary  # about 1/8 of the samples hit the mode
    assert summary["eval_reward_after"] >= 0.8, summary
    assert summary["reward_last_10pct"] > summary["reward_first_10pct"] + 1.0, summary
    assert set(summary["staleness_histogram"]) <= {str(k) for k in range(staleness + 1)}
    assert_exactly_once(summary)
    metrics = RunDir(summary["run_dir"]).metrics()
    assert [m["step"] for m in metrics] == list(range(1, 81))
    assert all(m["tokens"] == 64 * 10 for m in metrics)  # 64 samples x 10 denoising steps
    if staleness == 0:  # rollout and trainer agree bit for bit: every ratio is exactly 1
        assert all(m["logprob_diff_max"] == 0.0 and m["is_weight_max"] == 1.0 for m in metrics)
    else:
        assert max(m["logprob_diff_max"] for m in metrics) > 0


def test_the_context_encoder_alone_trains_and_travels(ray_session, tmp_path):
    """examples/flow-inpaint.yaml: the backbone is bit-identical in every checkpoint, the encoder
    moves, and every update publishes the encoder's bytes alone."""
    from safetensors.torch import load_file

    config = load_config(
        EXAMPLE.with_name("flow-inpaint.yaml"),
        [
            f"output_dir={tmp_path}", f"dataplane.name=inpaint-{uuid.uuid4().hex[:8]}", "staleness=0",
            "warmup.steps=200", "flow.encoder.supervised_steps=200", "trainer.steps=20",
            "trainer.checkpoint_every=10", "task.eval_prompts=64",
        ],
    )  # fmt: skip
    summary = train(config, display=False)
    assert_exactly_once(summary)
    run = RunDir(summary["run_dir"])
    metrics = run.metrics()
    first, last = (load_file(str(run.checkpoint_dir(s) / "trainer" / "model.safetensors")) for s in (10, 20))
    encoder = {k for k in first if k.startswith("encoder.") and k != "encoder.freqs"}
    assert all(torch.equal(first[k], last[k]) for k in first if k.startswith("backbone."))
    assert all(not torch.equal(first[k], last[k]) for k in encoder)
    encoder_bytes = sum(first[k].numel() * first[k].element_size() for k in encoder)
    assert all(m["publish_bytes"] == encoder_bytes for m in metrics)
    assert all(
        m["logprob_diff_max"] == 0.0 for m in metrics
    )  # on-policy: the engine's encoder is the trainer's


def test_pmrf_restoration_trains_the_refiner_alone_and_the_reward_sees_the_image(ray_session, tmp_path):
    """examples/flow-restore.yaml: PMRF's mean head is bit-identical in every checkpoint, the
    refiner moves and alone travels, the ratios are exact on-policy, and the reward's MSE part is
    the restored image's (a residual z would be about 1 / sigma_s^2 = 100 x farther)."""
    from safetensors.torch import load_file

    config = load_config(
        EXAMPLE.with_name("flow-restore.yaml"),
        [
            f"output_dir={tmp_path}", f"dataplane.name=restore-{uuid.uuid4().hex[:8]}", "staleness=0",
            "flow.hidden_size=64", "flow.pmrf.hidden_size=64", "flow.pmrf.mean_steps=200", "warmup.steps=200",
            "trainer.steps=20", "trainer.checkpoint_every=10", "task.eval_prompts=64",
        ],
    )  # fmt: skip
    summary = train(config, display=False)
    assert_exactly_once(summary)
    run = RunDir(summary["run_dir"])
    metrics = run.metrics()
    first, last = (load_file(str(run.checkpoint_dir(s) / "trainer" / "model.safetensors")) for s in (10, 20))
    refiner = {k for k in first if k.startswith("flow.") and k != "flow.freqs"}
    assert all(torch.equal(first[k], last[k]) for k in first if k.startswith("mean."))
    assert all(not torch.equal(first[k], last[k]) for k in refiner)
    assert all(
        m["publish_bytes"] == sum(first[k].numel() * first[k].element_size() for k in refiner)
        for m in metrics
    )
    assert all(m["logprob_diff_max"] == 0.0 for m in metrics)
    assert all(-0.5 < m["reward/mse"] < 0 and 0 <= m["reward/label"] <= 1 for m in metrics)
    assert 0.3 <= summary["eval_reward_before"] <= 1.0  # f(y) alone reads most digits right
