"""Eight Gaussians in the plane: pre-train a 2-D flow on all eight modes, then steer it by RL
to one of them. Also the 2-D data sets of the flow-matching benchmarks (eight Gaussians,
moons), sampled as torchcfm samples them.

The generator is unconditional (empty condition); every prompt asks for the same thing, so
a group is n samples of one policy. The reward is the negative distance to the target mode,
whose coordinates travel as the example's answer ("x,y"); `hit` scores 1 inside radius 1 of
it, about 1/8 of the pre-trained policy's samples.
"""

from __future__ import annotations

import math

import numpy as np

from asyncflow.tasks import FlowExample

__all__ = ["EightGaussians", "eight_gaussians", "hit", "moons", "reward"]


def _centers(radius: float) -> np.ndarray:
    angles = np.arange(8) * (2 * math.pi / 8)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (8, 2), mode 0 at (radius, 0)


def eight_gaussians(count: int, rng: np.random.Generator, *, radius: float, std: float) -> np.ndarray:
    """`count` points from the equal mixture of N(c_k, std^2 I) on a circle of `radius`: (count, 2)."""
    modes = rng.integers(0, 8, count)
    return (_centers(radius)[modes] + std * rng.standard_normal((count, 2))).astype(np.float32)


def moons(count: int, rng: np.random.Generator, *, noise: float = 0.2) -> np.ndarray:
    """Two interleaved half circles with Gaussian noise, scaled as torchcfm's (x * 3 - 1): (count, 2)."""
    upper = rng.random(count) < 0.5
    angle = rng.random(count) * math.pi
    x = np.where(upper, np.cos(angle), 1 - np.cos(angle))
    y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
    points = np.stack([x, y], axis=1) + noise * rng.standard_normal((count, 2))
    return (points * 3 - 1).astype(np.float32)


class EightGaussians:
    dim = 2
    condition_dim = 0

    def __init__(self, radius: float = 3.0, std: float = 0.3, target: int = 0, seed: int = 0):
        if not (radius > 0 and std > 0 and 0 <= target < 8):
            raise ValueError(
                f"EightGaussians needs radius > 0, std > 0 and target in 0..7, got radius={radius}, "
                f"std={std}, target={target}; fix task.options"
            )
        self.radius, self.std, self.target, self.seed = radius, std, target, seed
        cx, cy = _centers(radius)[target]
        self._answer = f"{cx:.6f},{cy:.6f}"

    def example(self, index: int) -> FlowExample:
        return FlowExample((), self._answer)

    def eval_example(self, index: int) -> FlowExample:
        return FlowExample((), self._answer)

    def data(self, index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Pre-training batch number `index`: (count, 2) points of all eight modes, no condition."""
        rng = np.random.default_rng([self.seed, index])
        return eight_gaussians(count, rng, radius=self.radius, std=self.std), np.zeros((count, 0), np.float32)


def _distance(sample, answer: str) -> float:
    target = [float(v) for v in answer.split(",")]
    return math.dist([float(v) for v in sample], target)


def reward(condition, sample, answer: str) -> float:
    """Minus the distance from the sample to the target mode (answer "x,y")."""
    return -_distance(sample, answer)


def hit(condition, sample, answer: str) -> float:
    """1 if the sample lies within distance 1 of the target mode, else 0."""
    return float(_distance(sample, answer) < 1.0)
