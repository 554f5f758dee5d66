"""Fault injection: each role in turn is frozen (SIGSTOP: a real process that stops answering)
or killed mid-run, through real mechanisms only. Each run either finishes, with nothing lost and
nothing trained twice, or stops with a diagnosis in <run_dir>/stalls/ that names the stage and
holds its actors' stacks and the samples in flight.

Deadlines are small here (floor 10 s, a factor of 4 over measured waits) so that a case takes
seconds; the defaults are minutes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from asyncflow.errors import AsyncFlowError
from asyncflow.rundir import RunDir
from tests.integration.test_rl_loop import _config, assert_exactly_once, train_in_thread

pytestmark = pytest.mark.integration

FAST = (
    "trainer.steps=14", "task.eval_prompts=0", "warmup.steps=5", "trainer.checkpoint_every=3",
    "dataplane.lease_s=8", "watchdog.floor_s=10", "watchdog.factor=4", "watchdog.first_deadline_s=60",
    "watchdog.check_every_s=0.5", "watchdog.probe_timeout_s=2",
)  # fmt: skip


def _pid(actor) -> int:
    from ray._private import state

    return int(state.actors(actor._actor_id.hex())["Pid"])


def _actor(config, name: str):
    import ray

    return ray.get_actor(f"{config.dataplane.name}.{name}", namespace="asyncflow")


def _wait_for_step(tmp_path: Path, result: dict, step: int, timeout_s: float = 150) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not result:
        for metrics in Path(tmp_path).glob("*/metrics.jsonl"):
            if len(metrics.read_text().splitlines()) >= step:
                return metrics.parent
        time.sleep(0.1)
    raise AssertionError(f"the run did not reach step {step}: {result}")


@contextlib.contextmanager
def _frozen(pid: int):
    """SIGSTOP `pid` (a process this test froze); whatever happens, it does not stay frozen."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):  # the watchdog had it killed
            os.kill(pid, signal.SIGKILL)


def _diagnoses(run_dir: Path, stage: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "stalls").glob(f"*-{stage}.json"))]


def _finish(runner, result: dict, timeout_s: float = 240) -> dict:
    runner.join(timeout=timeout_s)
    assert not runner.is_alive(), "the run did not end"
    if "error" in result:
        raise result["error"]
    return result


def _wait_for_diagnosis(run_dir: Path, stage: str, result: dict, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not result:
        found = _diagnoses(run_dir, stage)
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no diagnosis of the {stage} stage: {result}")


def _freeze_in_turn(config, tmp_path: Path, result: dict, stages: tuple[str, ...]) -> contextlib.ExitStack:
    """Freeze each stage's worker in turn; each is diagnosed (its stack, the rows waiting for it)
    and restarted, and the run trains again before the next. The frozen processes stay frozen
    until the returned stack closes (the watchdog has had them killed by then)."""
    run_dir = _wait_for_step(tmp_path, result, 4)  # the stages' waits are measured by then
    frozen = contextlib.ExitStack()
    for stage in stages:
        frozen.enter_context(_frozen(_pid(_actor(config, f"{stage}0"))))
        diagnosis = _wait_for_diagnosis(run_dir, stage, result)
        assert diagnosis["action"] == "restart" and "no progress for" in diagnosis["reason"]
        (actor,) = diagnosis["actors"]
        assert stage in actor["name"] and actor["pid"] > 0
        assert "Thread" in actor["stack"] and ".py" in actor["stack"], actor["stack"]  # py-spy's dump
        # a frozen process cannot answer: its calls in flight are the last trace collection's
        assert actor["in_flight"]["as_of"] == "last trace collection"
        assert all(span["for_s"] >= 0 and "name" in span for span in actor["in_flight"]["spans"])
        assert diagnosis["queues"][stage]["ready"] + diagnosis["queues"][stage]["leased"] > 0
        assert stage in diagnosis["samples_in_flight"]
        assert f"stage: {stage}" in next((run_dir / "stalls").glob(f"*-{stage}.txt")).read_text()
        _wait_for_step(tmp_path, result, len(RunDir(run_dir).metrics()) + 2)  # it trains again
    return frozen


def test_frozen_reward_then_rollout_workers_are_restarted_and_lose_no_sample(ray_session, tmp_path):
    config = _config(tmp_path, *FAST)
    runner, result = train_in_thread(config)
    with _freeze_in_turn(config, tmp_path, result, ("reward", "rollout")):
        summary = _finish(runner, result)
    assert summary["steps"] == 14
    assert_exactly_once(summary)


def test_a_frozen_reference_then_every_killed_worker_is_restarted_and_loses_no_sample(ray_session, tmp_path):
    import ray

    config = _config(tmp_path, *FAST, "reference.enabled=true")
    runner, result = train_in_thread(config)
    with _freeze_in_turn(config, tmp_path, result, ("reference",)):
        for stage in ("reward", "rollout", "reference"):  # as if their processes died
            ray.kill(_actor(config, f"{stage}0"), no_restart=False)
        summary = _finish(runner, result)
    assert summary["steps"] == 14
    assert_exactly_once(summary)


def test_a_frozen_trainer_restarts_the_run_from_its_last_checkpoint(ray_session, tmp_path):
    config = _config(tmp_path, *FAST, "trainer.steps=8")  # every actor starts twice: few steps
    runner, result = train_in_thread(config)
    run_dir = _wait_for_step(tmp_path, result, 4)
    with _frozen(_pid(_actor(config, "trainer0"))):
        summary = _finish(runner, result)
    assert summary["steps"] == 8
    assert summary.get("restarts") == 1, summary
    assert_exactly_once(summary)
    (diagnosis,) = _diagnoses(run_dir, "trainer")
    assert diagnosis["action"] == "restart"
    assert "the trainer: step" in diagnosis["calls_in_flight"]
    assert "Thread" in diagnosis["actors"][0]["stack"]


def test_a_frozen_worker_with_policy_stop_stops_the_run_with_its_diagnosis(ray_session, tmp_path):
    config = _config(tmp_path, *FAST, "watchdog.policy={reward: stop}")
    runner, result = train_in_thread(config)
    run_dir = _wait_for_step(tmp_path, result, 3)
    with _frozen(_pid(_actor(config, "reward0"))):
        runner.join(timeout=240)
    error = result.get("error")
    assert isinstance(error, AsyncFlowError), result
    message = str(error)
    assert "the reward stage stalled: no progress for" in message, message
    assert "watchdog.policy.reward is stop" in message and "asyncflow run --resume" in message
    (diagnosis,) = _diagnoses(run_dir, "reward")
    assert str(run_dir / "stalls") in message
    assert "Thread" in diagnosis["actors"][0]["stack"]


def test_a_killed_storage_unit_stops_the_run_with_a_diagnosis_naming_the_store(ray_session, tmp_path):
    import ray

    config = _config(tmp_path, *FAST)
    runner, result = train_in_thread(config)
    run_dir = _wait_for_step(tmp_path, result, 3)
    ray.kill(_actor(config, "unit0"))
    runner.join(timeout=240)
    assert isinstance(result.get("error"), AsyncFlowError), result
    assert "asyncflow run --resume" in str(result["error"])
    (diagnosis,) = _diagnoses(run_dir, "store")
    assert diagnosis["action"].startswith("stop")
    assert any(a["name"].endswith("controller") for a in diagnosis["actors"]), diagnosis["actors"]


def test_a_killed_redis_server_stops_the_run_with_a_diagnosis_naming_the_store(ray_session, tmp_path):
    from tests.conftest import free_port, start_redis

    (tmp_path / "redis").mkdir()
    port = free_port()
    server = start_redis(str(tmp_path / "redis"), port)  # this test's own server: it kills it
    try:
        config = _config(
            tmp_path / "runs", *FAST, "dataplane.backend=redis", f"dataplane.redis.url=redis://127.0.0.1:{port}/0",
            "dataplane.redis.retry_deadline_s=2", "dataplane.redis.socket_timeout_s=2",
        )  # fmt: skip
        runner, result = train_in_thread(config)
        run_dir = _wait_for_step(tmp_path / "runs", result, 3)
        server.kill()
        runner.join(timeout=240)
    finally:
        server.kill()
        server.wait()
    assert isinstance(result.get("error"), AsyncFlowError), result
    assert "asyncflow run --resume" in str(result["error"])
    (diagnosis,) = _diagnoses(run_dir, "store")[:1]
    assert diagnosis["action"].startswith("stop")
    assert "store" in diagnosis["stage"] and diagnosis["reason"]
