"""Digit generation: an unconditional flow over 8 x 8 digits (asyncflow.tasks.digits), steered
by RL towards one target digit, as examples/flow-2d.yaml steers eight Gaussians towards one mode.

Every prompt is the empty condition; the answer is the target digit. Pre-training data: the
1,297 clean training digits. Rewards judge with the digits classifier of
asyncflow.tasks.inpainting (trained once per process from its CLASSIFIER_SEED):

    reward(c, x, target)  = p(target | x)
    hit(c, x, target)     = 1 if the classifier's most likely digit for x is the target, else 0
    legible(c, x, target) = 1 if the classifier reads x as some digit with probability >= 0.9

`DigitReward` is `reward` plus, weighted by `legibility_weight`, the classifier's probability of
its most likely digit (a part that keeps samples legible), made once per reward worker from
task.reward_options, so the classifier trains as the worker starts, not inside a call.

Knows nothing about models or engines; torch only inside the rewards.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from asyncflow.tasks import FlowExample
from asyncflow.tasks.digits import SIDE, split
from asyncflow.tasks.inpainting import _probabilities, classifier

__all__ = ["DigitGeneration", "DigitReward", "hit", "legible", "reward"]

PIXELS = SIDE * SIDE


class DigitGeneration:
    dim = PIXELS
    condition_dim = 0

    def __init__(self, target: int = 3, seed: int = 0):
        if not 0 <= target <= 9:
            raise ValueError(
                f"DigitGeneration: target={target}, expected a digit 0 to 9; fix task.options.target"
            )
        self.target, self.seed = target, seed
        (self.train, _), _ = split()

    def example(self, index: int) -> FlowExample:
        return FlowExample((), str(self.target))

    def eval_example(self, index: int) -> FlowExample:
        return FlowExample((), str(self.target))

    def data(self, index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Pre-training batch `index`: clean training digits (count, 64), no condition (count, 0)."""
        rng = np.random.default_rng([self.seed, 4, index])
        return self.train[rng.integers(0, len(self.train), count)], np.zeros((count, 0), np.float32)


def _check(sample: Any, answer: str) -> tuple[np.ndarray, int]:
    x = np.asarray(sample, np.float32).reshape(-1)
    if x.shape != (PIXELS,) or not answer.strip().isdigit():
        raise ValueError(
            f"digit generation reward: expected a sample of {PIXELS} values and a digit as the answer, got "
            f"{x.shape} and {answer!r} (use task.source asyncflow.tasks.generation:DigitGeneration)"
        )
    return x, int(answer)


def reward(condition: Any, sample: Any, answer: str) -> float:
    """The classifier's probability of the target digit."""
    x, target = _check(sample, answer)
    return float(_probabilities(x)[target])


class DigitReward:
    """{"target": p(target | x), "legible": legibility_weight * max_k p(k | x)}, made once per reward
    worker (task.reward_options): the classifier trains when the worker starts."""

    def __init__(self, legibility_weight: float = 0.0):
        if not legibility_weight >= 0:
            raise ValueError(
                f"DigitReward: legibility_weight={legibility_weight}, expected >= 0; fix task.reward_options"
            )
        self.legibility_weight = legibility_weight
        classifier()

    def __call__(self, condition: Any, sample: Any, answer: str) -> dict[str, float]:
        x, target = _check(sample, answer)
        p = _probabilities(x)
        return {"target": float(p[target]), "legible": self.legibility_weight * float(p.max())}


def hit(condition: Any, sample: Any, answer: str) -> float:
    """1 if the classifier reads the sample as the target digit, else 0."""
    x, target = _check(sample, answer)
    return float(_probabilities(x).argmax() == target)


def legible(condition: Any, sample: Any, answer: str) -> float:
    """1 if the classifier reads the sample as some digit with probability >= 0.9, else 0."""
    x, _ = _check(sample, answer)
    return float(_probabilities(x).max() >= 0.9)
