"""The autoscale rule: grow while the trainer waits and rows queue for the pool, shrink while the
pool would still be idle with one worker fewer, always within bounds; the autoscaler decides
every `every_steps` steps from what happened since its last decision, and applies sizes through
the scaling methods it was given, in the background."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncflow.config import ConfigError, load_config, parse_config
from asyncflow.config.pools import AutoscaleConfig
from asyncflow.workflow.elastic import Autoscaler, decide
from asyncflow.workflow.health import deadline_s

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "sort.yaml"
BOUNDS = AutoscaleConfig(min=1, max=3, trainer_wait_frac=0.2, shrink_idle_frac=0.6)


def _next(size: int, idle: float, queue: int, wait: float, bounds: AutoscaleConfig = BOUNDS) -> int:
    return decide(size, bounds, idle_frac=idle, queue_rows=queue, trainer_wait_frac=wait, batch_rows=128)


def test_a_pool_grows_only_while_the_trainer_waits_and_rows_queue_for_it():
    assert _next(1, idle=0.1, queue=300, wait=0.5) == 2
    assert _next(1, idle=0.1, queue=300, wait=0.1) == 1  # the trainer has data: no need
    assert _next(1, idle=0.1, queue=50, wait=0.5) == 1  # the wait is elsewhere: nothing queues here
    assert _next(3, idle=0.1, queue=300, wait=0.5) == 3  # at its max
    custom = AutoscaleConfig(min=1, max=3, grow_queue_rows=40)
    assert _next(1, idle=0.1, queue=50, wait=0.5, bounds=custom) == 2


def test_an_idle_pool_shrinks_to_its_min_and_a_size_out_of_bounds_is_brought_back():
    assert _next(3, idle=0.8, queue=0, wait=0.0) == 2  # two workers would still idle 70% of the time
    assert _next(2, idle=0.65, queue=0, wait=0.0) == 2  # one would idle 30%: it stays (no flapping)
    assert _next(1, idle=0.9, queue=0, wait=0.0) == 1
    assert _next(2, idle=0.85, queue=300, wait=0.9) == 1  # idle despite a queue: it is not the bottleneck
    assert _next(5, idle=0.3, queue=0, wait=0.0) == 3
    assert _next(1, idle=0.3, queue=0, wait=0.0, bounds=AutoscaleConfig(min=2, max=4)) == 2


def test_bounds_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match="autoscale.min = 3 exceeds autoscale.max = 2"):
        parse_config({"reward": {"autoscale": {"min": 3, "max": 2}}})


async def test_the_autoscaler_decides_every_few_steps_from_the_window_since_its_last_decision():
    config = load_config(
        EXAMPLE, ["reward.autoscale.max=2", "reward.autoscale.every_steps=2", "trainer.batch_prompts=4"]
    )
    sizes: list[int] = []

    async def scale(n: int) -> int:
        sizes.append(n)
        return n

    loops: dict = {}
    scaler = Autoscaler(config, {"reward": scale}, loops)
    busy_trainer = {"wait_s": 0.0}
    stats = {"workers": 1, "busy_s": 10.0, "idle_s": 0.0, "idle_frac": 0.0}
    workers = {"reward": stats, "queues": {"reward": 100}}
    assert await scaler.after_step(busy_trainer, workers) == {}  # one step: not yet
    assert await scaler.after_step(busy_trainer, workers) == {}  # the trainer never waited
    waiting = {"wait_s": 1e6}  # it waited the whole time; 100 rows queue for reward (a batch is 32)
    assert await scaler.after_step(waiting, workers) == {}
    assert await scaler.after_step(waiting, workers) == {"reward": 2}
    assert list(loops) == ["reward resize"]  # applied in the background, stopped with the streams
    await scaler.resizing["reward"]
    assert sizes == [2] and not loops
    idle = {"workers": 2, "busy_s": 11.0, "idle_s": 9.0, "idle_frac": 0.45}  # 90% idle since then
    workers = {"reward": idle, "queues": {"reward": 0}}
    await scaler.after_step(busy_trainer, workers)
    assert await scaler.after_step(busy_trainer, workers) == {"reward": 1}
    await scaler.resizing["reward"]
    assert sizes == [2, 1]


def test_a_probe_deadline_leaves_room_for_the_longest_call():
    config = load_config(EXAMPLE, ["rollout.health.timeout_s=5", "rollout.health.slowdown=4"])
    assert deadline_s(config.rollout.health, 0.1) == 5
    assert deadline_s(config.rollout.health, 3.0) == 12
