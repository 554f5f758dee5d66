"""The eight-Gaussians flow task, its rewards, and the config rules of `policy: flow`."""

from __future__ import annotations

import math

import numpy as np
import pytest

from asyncflow.config import parse_config
from asyncflow.errors import ConfigError
from asyncflow.tasks.gaussians import EightGaussians, eight_gaussians, hit, moons, reward


def test_examples_and_data_are_deterministic():
    task = EightGaussians(radius=3.0, std=0.3, target=2, seed=1)
    assert task.example(0) == task.example(99) == task.eval_example(5)
    assert task.example(0).condition == () and task.dim == 2 and task.condition_dim == 0
    x, cond = task.data(7, 4000)
    assert x.shape == (4000, 2) and x.dtype == np.float32 and cond.shape == (4000, 0)
    assert np.array_equal(x, task.data(7, 4000)[0]) and not np.array_equal(x, task.data(8, 4000)[0])
    radii = np.linalg.norm(x, axis=1)
    assert abs(radii.mean() - 3.0) < 0.05
    angles = np.round(np.arctan2(x[:, 1], x[:, 0]) / (2 * math.pi / 8)) % 8
    assert np.bincount(angles.astype(int), minlength=8).min() > 400  # all eight modes, about equally


def test_reward_is_minus_the_distance_to_the_target_mode():
    answer = EightGaussians(radius=3.0, target=2).example(0).answer  # mode 2 is at (0, 3)
    assert reward((), np.array([0.0, 3.0]), answer) == pytest.approx(0.0, abs=1e-5)
    assert reward((), np.array([0.0, 0.0]), answer) == pytest.approx(-3.0, abs=1e-5)
    assert hit((), np.array([0.5, 2.5]), answer) == 1.0 and hit((), np.array([3.0, 0.0]), answer) == 0.0


def test_benchmark_data_sets():
    rng = np.random.default_rng(0)
    g = eight_gaussians(1000, rng, radius=5.0, std=0.1**0.25)
    assert abs(np.linalg.norm(g, axis=1).mean() - 5.0) < 0.2
    m = moons(4000, rng)
    assert m.shape == (4000, 2) and np.abs(m.mean(0) - [0.5, -0.25]).max() < 0.1  # (x * 3 - 1) of the centre


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="target in 0..7"):
        EightGaussians(target=8)


def test_policy_and_task_kind_must_agree():
    flow_task = {
        "source": "asyncflow.tasks.gaussians:EightGaussians",
        "reward": "asyncflow.tasks.gaussians:reward",
    }
    with pytest.raises(ConfigError, match="is a flow task; set policy: flow"):
        parse_config({"task": flow_task})
    with pytest.raises(ConfigError, match="is a token task; set policy: token"):
        parse_config({"policy": "flow"})
    config = parse_config(
        {"policy": "flow", "task": {**flow_task, "eval_reward": "asyncflow.tasks.gaussians:hit"}}
    )
    assert config.flow.steps == 10 and config.flow.noise_level == 0.7
    with pytest.raises(ConfigError, match="flow.noise_level"):
        parse_config({"policy": "flow", "task": flow_task, "flow": {"noise_level": 0}})
    with pytest.raises(ConfigError, match="task.eval_reward"):
        parse_config({"task": {"eval_reward": "asyncflow.tasks.sorting:nothing"}})
