"""A run survives its process: the same command continues it (stable run directory), SIGTERM
leaves a final checkpoint, and a cluster without room for an actor fails the run by name."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from asyncflow.config import load_config
from asyncflow.errors import ConfigError
from asyncflow.recipes.grpo import train
from asyncflow.rundir import RunDir
from tests.integration.test_rl_loop import EXAMPLE, assert_exactly_once

pytestmark = pytest.mark.integration
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each run starts a Ray of its own


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "asyncflow.cli", "run", *args], env=ENV, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for(proc: subprocess.Popen, ready, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not get there in time"
        time.sleep(0.05)


def _steps(run_dir: Path) -> int:
    file = run_dir / "metrics.jsonl"
    return len(file.read_text().splitlines()) if file.exists() else 0


def test_the_same_command_continues_a_killed_redis_run_from_its_checkpoint(tmp_path, redis_url):
    """SIGKILL before the first checkpoint (the store keeps the dead attempt's partition), again
    after it; each time the very same `--resume-if-exists` command runs next: the first restart
    drops the stale partition and starts clean, the second continues from the checkpoint. Nothing
    lost, nothing trained twice, every step logged once."""
    name = f"again-{uuid.uuid4().hex[:6]}"
    args = [str(EXAMPLE), "--resume-if-exists"] + [  # not --quiet: its notes say where it resumed
        arg for s in (f"output_dir={tmp_path}", f"dataplane.name={name}", "dataplane.backend=redis",
                      f"dataplane.redis.url={redis_url}", "trainer.steps=16", "trainer.checkpoint_every=4",
                      "task.eval_prompts=0") for arg in ("--set", s)
    ]  # fmt: skip
    run_dir = tmp_path / "sort"
    first = _start(args)
    _wait_for(first, lambda: _steps(run_dir) >= 2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").glob("step_*"))

    second = _start(args)  # the partition is the dead attempt's: dropped, a clean start
    _wait_for(second, lambda: (run_dir / "checkpoints" / "step_0000004" / "state.json").exists())
    os.killpg(second.pid, signal.SIGKILL)
    second.wait()

    third = _start(args)
    out, err = third.communicate(timeout=180)
    assert third.returncode == 0, err[-3000:]
    assert "an earlier attempt of this run; continuing it" in err
    assert re.search(r"resumed from \S+/checkpoints/step_\d+ \(step (4|8|12),", err), err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run_dir"] == str(run_dir)
    assert [m["step"] for m in RunDir(run_dir).metrics()] == list(range(1, 17))
    assert_exactly_once(summary)


def test_sigterm_stops_at_a_step_with_a_final_checkpoint(tmp_path):
    args = [str(EXAMPLE), "--quiet"] + [
        arg for s in (f"output_dir={tmp_path}", "trainer.steps=100000", "task.eval_prompts=0",
                      "trainer.checkpoint_every=0") for arg in ("--set", s)
    ]  # fmt: skip
    proc = _start(args)
    _wait_for(proc, lambda: any(_steps(p) >= 3 for p in tmp_path.iterdir()))
    proc.send_signal(signal.SIGTERM)  # the driver only, as `ray job stop` or the kubelet would
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    (run_dir,) = tmp_path.iterdir()
    assert "SIGTERM: stopped at step" in err and f"asyncflow run --resume {run_dir}" in err
    last = RunDir(run_dir).latest_checkpoint()
    assert last is not None and last[1]["step"] == RunDir(run_dir).metrics()[-1]["step"]
    assert json.loads((run_dir / "summary.json").read_text())["stopped_by"] == "sigterm"


def test_actors_the_cluster_has_no_room_for_fail_the_run_by_name(ray_session, tmp_path):
    config = load_config(
        EXAMPLE,
        [f"output_dir={tmp_path}", f"dataplane.name=room-{uuid.uuid4().hex[:6]}", "rollout.num_cpus=64",
         "start_timeout_s=20", "task.eval_prompts=0"],
    )  # fmt: skip
    with pytest.raises(ConfigError) as failed:
        train(config, display=False)
    message = str(failed.value)
    assert "no room within 20 s (start_timeout_s) for rollout worker 0 (64 CPUs);" in message, message
    assert "CPUs free" in message and "rollout.num_cpus" in message


def test_a_role_asking_for_a_resource_no_node_has_fails_the_run_naming_it(ray_session, tmp_path):
    """The ask reaches Ray: the reward worker waits for a custom resource and memory the session's
    Ray lacks, and the run's error names both with the role and the fields to change."""
    config = load_config(
        EXAMPLE,
        [f"output_dir={tmp_path}", f"dataplane.name=room-{uuid.uuid4().hex[:6]}", "start_timeout_s=20",
         "task.eval_prompts=0", "reward.resources={accelerator_x: 1}", "reward.memory_gb=0.5"],
    )  # fmt: skip
    with pytest.raises(ConfigError) as failed:
        train(config, display=False)
    message = str(failed.value)
    assert "for reward worker 0 (0.25 CPUs, 0.5 GiB, accelerator_x: 1);" in message, message
    assert "reward.num_cpus / num_gpus / memory_gb / resources or reward.num_workers" in message, message
    assert "trainer.num_cpus" not in message, message  # only the role that found no room


def test_sigterm_past_its_grace_period_exits_without_a_checkpoint_and_says_so(tmp_path):
    args = [str(EXAMPLE), "--quiet"] + [
        arg for s in (f"output_dir={tmp_path}", "trainer.steps=100000", "task.eval_prompts=0",
                      "trainer.checkpoint_every=0", "sigterm_grace_s=0") for arg in ("--set", s)
    ]  # fmt: skip
    proc = _start(args)
    _wait_for(proc, lambda: any(_steps(p) >= 1 for p in tmp_path.iterdir()))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    (run_dir,) = tmp_path.iterdir()
    assert "stopped by SIGTERM without a final checkpoint (none within sigterm_grace_s = 0 s)" in err, err
    assert f"from the start (no checkpoint yet) with: asyncflow run --resume {run_dir}" in err
    assert RunDir(run_dir).latest_checkpoint() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_example_trains_on_a_gpu(ray_session, tmp_path):
    """The trainer and the rollout engine share the session's one GPU (half each): the run trains,
    every sample exactly once."""
    config = load_config(
        EXAMPLE,
        [f"output_dir={tmp_path}", f"dataplane.name=gpu-{uuid.uuid4().hex[:6]}", "task.eval_prompts=0",
         "trainer.steps=6", "trainer.num_gpus=0.5", "rollout.num_gpus=0.5"],
    )  # fmt: skip
    summary = train(config, display=False)
    assert summary["steps"] == 6, summary
    assert_exactly_once(summary)
