"""The RL loop end to end on real Ray actors, the real store and the torch engine.

Exactly-once is checked by conservation: every admitted prompt's n samples were either
trained exactly once (the trained ledger) or are still in the store for the trainer.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from asyncflow.config import load_config
from asyncflow.recipes.grpo import train
from asyncflow.rundir import RunDir

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).parents[2] / "examples" / "sort.yaml"


def _config(tmp_path, *overrides: str):
    name = f"rl-{uuid.uuid4().hex[:8]}"
    return load_config(EXAMPLE, [f"output_dir={tmp_path}", f"dataplane.name={name}", *overrides])


def train_in_thread(config) -> tuple[threading.Thread, dict]:
    """`train(config)` started in a thread; its summary, or the error it raised ("error"), lands in
    the dict."""
    result: dict = {}

    def run() -> None:
        try:
            result.update(train(config, display=False))
        except BaseException as e:  # handed to the test thread
            result["error"] = e

    runner = threading.Thread(target=run)
    runner.start()
    return runner, result


def wait_for_checkpoint(output_dir, step: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not list(Path(output_dir).glob(f"*/checkpoints/step_{step:07d}")):
        time.sleep(0.1)


def assert_exactly_once(summary: dict, n: int = 8) -> list[tuple[int, int]]:
    trained = RunDir(summary["run_dir"]).trained()
    assert len(trained) == len(set(trained)), "a sample was trained twice"
    assert len(trained) + summary["untrained_rows"] == summary["admitted_prompts"] * n, "a sample was lost"
    per_prompt = collections.Counter(p for p, _ in trained)
    assert set(per_prompt.values()) == {n}, "groups must be trained whole"
    return trained


def store_partitions(config) -> dict:
    """The partitions the run's store holds now, by name (their stats)."""
    import asyncio

    from dataplane import StoreClient
    from dataplane.store import start_store

    async def read() -> dict:
        client = await StoreClient.connect(start_store(config.dataplane).address)
        try:
            return (await client.store_stats())["partitions"]
        finally:
            await client.close()

    return asyncio.run(read())


def test_example_learns_at_toy_size(ray_session, tmp_path):
    config = _config(tmp_path, "trainer.steps=150", "task.eval_prompts=256", "trainer.checkpoint_every=0")
    summary = train(config, display=False)
    assert summary["steps"] == 150
    assert summary["eval_reward_before"] <= 0.35
    assert summary["eval_reward_after"] >= summary["eval_reward_before"] + 0.15, summary
    assert summary["reward_last_10pct"] > summary["reward_first_10pct"] + 0.1, summary
    assert set(summary["staleness_histogram"]) <= {"0", "1"}  # k = 1 holds for every trained sample
    assert_exactly_once(summary)
    metrics = RunDir(summary["run_dir"]).metrics()
    assert [m["step"] for m in metrics] == list(range(1, 151))


@pytest.mark.parametrize(
    "overrides",
    [
        ["mode=sync", "reference.enabled=true", "trainer.kl_coef=0.05"],
        ["staleness=0", "rollout.top_k=6", "rollout.top_p=0.9"],  # the trainer truncates as the engine did
        # the scheduled engine, its KV budget short enough to preempt: log-probs still the trainer's
        ["staleness=0", "rollout.scheduler.policy=rl", "rollout.scheduler.kv_budget_tokens=256"],
    ],
    ids=["sync-with-kl", "async-k0-top-k-top-p", "async-k0-rl-scheduler"],
)
def test_on_policy_modes_train_only_lag_zero(ray_session, tmp_path, overrides):
    config = _config(tmp_path, "trainer.steps=12", "task.eval_prompts=0", "rollout.num_workers=2", *overrides)
    summary = train(config, display=False)
    assert summary["staleness_histogram"] == {"0": 12 * 16 * 8}
    assert_exactly_once(summary)
    metrics = RunDir(summary["run_dir"]).metrics()
    assert all(m["is_weight_max"] <= 1 + 1e-4 for m in metrics)  # on-policy: behaviour = trainer's policy
    assert all(abs(m["is_weight_mean"] - 1) <= 1e-4 for m in metrics)
    assert all(abs(m["mismatch_kl"]) <= 1e-6 for m in metrics)
    if config.mode == "async":  # the workers' stats (at the last step always), with NanoFlow's yardstick
        assert 0 < metrics[-1]["workers"]["rollout"]["engine_optimal_pct"] < 100
    if config.reference.enabled:
        assert metrics[0]["kl_ref"] == pytest.approx(0, abs=1e-6)  # the reference is the policy at step 1
        assert metrics[-1]["kl_ref"] > 0


def test_admission_on_demand_keeps_a_slow_trainer_s_queue_short(ray_session, tmp_path):
    """admit_ahead = 1 at k = 4 with a trainer slowed to be the bottleneck: admission pauses while a
    batch waits, so the run admits far fewer than the (steps + k + 1) batches the bound allows, and
    still trains every sample once."""
    steps = 12
    config = _config(
        tmp_path, f"trainer.steps={steps}", "task.eval_prompts=0", "staleness=4", "admit_ahead=1",
        "trainer.simulated_step_s_per_ktoken=0.5", "trainer.checkpoint_every=0",
    )  # fmt: skip
    summary = train(config, display=False)
    assert summary["steps"] == steps
    assert summary["admitted_prompts"] <= (steps + 3) * 16 < (steps + 4 + 1) * 16, summary
    assert set(summary["staleness_histogram"]) <= {"0", "1", "2", "3", "4"}
    assert_exactly_once(summary)


def test_a_killed_rollout_worker_loses_no_sample(ray_session, tmp_path):
    import ray

    config = _config(
        tmp_path,
        "trainer.steps=60",
        "task.eval_prompts=0",
        "rollout.num_workers=2",
        "rollout.groups_per_call=4",
    )
    runner, result = train_in_thread(config)
    deadline = time.monotonic() + 120
    metrics = Path()
    while time.monotonic() < deadline and not result:
        found = list(Path(tmp_path).glob("*/metrics.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 15:
            metrics = found[0]
            break
        time.sleep(0.1)
    assert metrics.exists(), "the run did not reach step 15"
    victim = ray.get_actor(f"{config.dataplane.name}.rollout0", namespace="asyncflow")
    ray.kill(victim, no_restart=False)  # as if its process died; Ray restarts it, the loop re-runs it
    runner.join(timeout=300)
    if "error" in result:
        raise result["error"]
    assert result["steps"] == 60
    assert_exactly_once(result)


def test_a_partly_trained_policy_reaches_a_restarted_rollout_worker_whole(ray_session, tmp_path):
    """Only layer 1 trains, so versions after 0 carry its tensors alone. A rollout worker restarted
    mid-run builds its engine afresh (other initial weights: seed 1 here, 0 there) and takes the
    whole version 0 under the newest partial one: its samples stay on-policy to the bit."""
    import ray

    config = _config(
        tmp_path, "seed=1", "staleness=0", "trainer.steps=40", "task.eval_prompts=0", "rollout.num_workers=2",
        "trainer.trainable={patterns: ['model.layers.1.*']}",
    )  # fmt: skip
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(train(config, display=False)))
    runner.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not result:
        found = list(Path(tmp_path).glob("*/metrics.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 10:
            break
        time.sleep(0.1)
    ray.kill(ray.get_actor(f"{config.dataplane.name}.rollout0", namespace="asyncflow"), no_restart=False)
    runner.join(timeout=300)
    assert result["steps"] == 40
    assert_exactly_once(result)
    metrics = RunDir(result["run_dir"]).metrics()
    assert all(abs(m["mismatch_kl"]) <= 1e-6 for m in metrics), [m["mismatch_kl"] for m in metrics]
    assert {m["publish_bytes"] for m in metrics} == {262656}  # layer 1 of 2 (whole: 532,224 bytes)


def test_resume_after_the_process_is_killed(tmp_path):
    """Stop a run hard mid-way (SIGKILL to the driver and its Ray), damage its newest checkpoint and
    cut its ledger's last line short, resume it from the run directory: it falls back to the
    checkpoint before, no sample lost, none trained twice, every step logged once."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cli = [sys.executable, "-m", "asyncflow.cli", "run"]
    args = [str(EXAMPLE), "--quiet", "--set", f"output_dir={tmp_path}", "--set", "trainer.steps=40",
            "--set", "trainer.checkpoint_every=10", "--set", "task.eval_prompts=0"]  # fmt: skip
    first = subprocess.Popen(
        cli + args, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not list(
        Path(tmp_path).glob("*/checkpoints/step_0000020/state.json")
    ):
        assert first.poll() is None, first.communicate()
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    (run_dir,) = Path(tmp_path).iterdir()
    assert not (run_dir / "summary.json").exists()
    newest = sorted(run_dir.glob("checkpoints/step_*"))[-1]
    model = newest / "trainer" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # as a crash mid-copy would
    with open(run_dir / "trained.jsonl", "a") as f:
        f.write('{"step": 999, "rows": [[1, ')  # a line the kill cut short
    resume = cli + ["--resume", str(run_dir)]
    done = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        f"checkpoint {newest.name} is not usable (trainer/model.safetensors has" in done.stdout + done.stderr
    )
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [m["step"] for m in RunDir(run_dir).metrics()]
    assert steps == list(range(1, 41))
    resumed_from = int(json.loads(sorted(run_dir.glob("checkpoints/*/state.json"))[0].read_text())["step"])
    assert resumed_from >= 10
    assert_exactly_once(summary)


def test_a_run_on_the_redis_store_cleans_up_after_itself(ray_session, tmp_path, redis_url):
    """The same loop on the durable store: exactly once, and the run's partition is gone at the end
    (its rows live on in the final checkpoint), so the next run with that store name starts clean."""

    config = _config(
        tmp_path,
        "trainer.steps=8",
        "task.eval_prompts=0",
        "dataplane.backend=redis",
        f"dataplane.redis.url={redis_url}",
    )
    summary = train(config, display=False)
    assert summary["steps"] == 8
    assert_exactly_once(summary)
    assert "samples" not in store_partitions(config)


def test_ctrl_c_stops_at_a_step_with_a_checkpoint_and_says_how_to_resume(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = [sys.executable, "-m", "asyncflow.cli", "run", str(EXAMPLE), "--quiet", "--set",
            f"output_dir={tmp_path}", "--set", "trainer.steps=100000", "--set", "task.eval_prompts=0",
            "--set", "trainer.checkpoint_every=0"]  # fmt: skip
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not any(
        len(p.read_text().splitlines()) >= 3 for p in Path(tmp_path).glob("*/metrics.jsonl")
    ):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    (run_dir,) = Path(tmp_path).iterdir()
    assert f"continue with: asyncflow run --resume {run_dir}" in err
    last = RunDir(run_dir).latest_checkpoint()
    assert last is not None and last[1]["step"] == RunDir(run_dir).metrics()[-1]["step"]


def test_a_dead_trainer_is_named_with_how_to_resume(ray_session, tmp_path):
    import ray

    from asyncflow.errors import WorkerError

    config = _config(
        tmp_path, "trainer.steps=100000", "task.eval_prompts=0", "trainer.checkpoint_every=5",
        "trainer.max_restarts=0",
    )  # fmt: skip
    runner, result = train_in_thread(config)
    wait_for_checkpoint(tmp_path, 5)
    ray.kill(ray.get_actor(f"{config.dataplane.name}.trainer0", namespace="asyncflow"))
    runner.join(timeout=120)
    error = result.get("error")
    assert isinstance(error, WorkerError), result
    assert "the trainer died" in str(error) and "asyncflow run --resume" in str(error)
    assert "its last checkpoint is step" in str(error)
