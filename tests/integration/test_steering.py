"""Steering a live run with asyncflow.Client: every verb on one running run, then a resume.

Each change is checked by its effect, not by its reply: a paused run takes no step; after
set_staleness(0) every trained sample has lag 0; after scale_rollout(2) both workers
generate; after stop() and --resume every admitted sample is trained exactly once.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest

from asyncflow.config import load_config
from asyncflow.control import Client
from asyncflow.errors import ControlError
from asyncflow.recipes.grpo import train
from asyncflow.rundir import RunDir

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).parents[2] / "examples" / "sort.yaml"


def assert_exactly_once(summary: dict, n: int = 8) -> None:
    trained = RunDir(summary["run_dir"]).trained()
    assert len(trained) == len(set(trained)), "a sample was trained twice"
    assert len(trained) + summary["untrained_rows"] == summary["admitted_prompts"] * n, "a sample was lost"


def until(stream, step: int) -> list[dict]:
    """Metrics lines from the stream up to and including `step`."""
    lines = []
    for m in stream:
        lines.append(m)
        if m["step"] >= step:
            return lines
    raise AssertionError(f"the run ended before step {step}")


def samples(ray, name: str, worker: str) -> int:
    return ray.get(ray.get_actor(f"{name}.{worker}", namespace="asyncflow").stats.remote())["samples"]


def test_every_verb_takes_effect_on_a_live_run_and_a_stopped_run_resumes_losing_nothing(
    ray_session, tmp_path
):
    ray, name = ray_session, f"steer-{uuid.uuid4().hex[:8]}"
    overrides = [f"output_dir={tmp_path}", f"dataplane.name={name}", "trainer.steps=300",
                 "task.eval_prompts=0", "warmup.steps=5", "rollout.groups_per_call=4",
                 "trainer.checkpoint_every=0", "dataplane.num_storage_units=1"]  # fmt: skip
    result: dict = {}

    def run() -> None:
        try:
            result.update(train(load_config(EXAMPLE, overrides), display=False))
        except BaseException as e:  # handed to the test thread
            result["error"] = e

    runner = threading.Thread(target=run)
    runner.start()
    try:
        client = Client(name, wait_s=120, timeout_s=120)
        assert client.status()["steps"] == 300
        until(client.metrics(), 2)

        paused = client.pause()
        assert client.status()["state"] == "paused"
        time.sleep(1.5)
        assert client.status()["step"] == paused["step"], "a paused run took a step"
        client.resume()

        k0 = client.set_staleness(0)
        assert client.scale_rollout(2) == {"rollout_workers": 2}
        before = samples(ray, name, "rollout0")
        lines = until(client.metrics(after_step=k0["from_step"] - 1), client.status()["step"] + 10)
        assert all(m["staleness"] == {"0": 16 * 8} for m in lines), [m["staleness"] for m in lines]
        assert client.status()["staleness"] == 0
        assert samples(ray, name, "rollout1") > 0 and samples(ray, name, "rollout0") > before, (
            "both must generate"
        )

        assert client.scale_rollout(1) == {"rollout_workers": 1}
        until(client.metrics(after_step=client.status()["step"]), client.status()["step"] + 2)
        with pytest.raises(ValueError):  # the removed worker's actor is gone; the run goes on without it
            ray.get_actor(f"{name}.rollout1", namespace="asyncflow")

        saved = client.checkpoint()
        assert Path(saved["checkpoint"], "state.json").exists()
        stopped = client.stop()
        runner.join(timeout=120)
    finally:
        if runner.is_alive():  # a failed check: end the run rather than leave it running
            Client(name).stop()
            runner.join(timeout=120)
    if "error" in result:
        raise result["error"]
    assert result["stopped_at_step"] == stopped["step"] == result["steps"]
    assert_exactly_once(result)  # at the stop: what was not trained is in the checkpoint
    with pytest.raises(ControlError, match="no run named"):
        Client(name)  # the run has ended; its control actor with it

    run_dir = result["run_dir"]
    final = stopped["step"] + 4
    resumed = train(RunDir.open(run_dir).config([f"trainer.steps={final}"]), resume=run_dir, display=False)
    assert [m["step"] for m in RunDir(run_dir).metrics()] == list(range(1, final + 1))
    assert_exactly_once(resumed)
