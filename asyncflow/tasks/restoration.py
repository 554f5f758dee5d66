"""Digit restoration: recover an 8 x 8 digit (asyncflow.tasks.digits) from a degraded copy y
(noise, blur or a hidden square, `degrade`), so that it reads as the clean digit's label and
lies close to the clean digit.

A prompt's condition is y (64 values); the policy generates the 64 pixels of x. The answer
carries what the reward checks against: the label and the clean digit, "label:pixels", the
pixels as 64 characters of "0123456789abcdefg" (the data set's 0..16 levels; pixel = level /
8 - 1, exact), so the reward needs nothing but its arguments.

Rewards judge with the digits classifier of asyncflow.tasks.inpainting (trained once per
process from its CLASSIFIER_SEED; the benchmarks judge with another seed):

    reward(y, x, answer)    = {"label": p(label | x), "mse": -mean over pixels of (x - x_clean)^2}
    agreement(y, x, answer) = 1 if the classifier's most likely digit for x is the label, else 0
    mse(y, x, answer)       = mean over pixels of (x - x_clean)^2

`RestorationReward` is `reward` with the MSE weighted (task.reward_options), made once per
reward worker so the classifier trains as the worker starts.

Knows nothing about models or engines; torch only inside the rewards.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from asyncflow.tasks import FlowExample
from asyncflow.tasks.digits import DEGRADATIONS, SIDE, degrade, split
from asyncflow.tasks.inpainting import _probabilities, classifier

__all__ = ["DigitRestoration", "RestorationReward", "agreement", "answer_of", "mse", "parse_answer", "reward"]

PIXELS = SIDE * SIDE
LEVELS = "0123456789abcdefg"  # the data set's 17 grey levels, 0..16


def answer_of(image: np.ndarray, label: int) -> str:
    """ "label:pixels" for one clean digit (64,) in [-1, 1] (see the module docstring)."""
    levels = np.rint((np.asarray(image, np.float64).reshape(-1) + 1.0) * 8.0).astype(int)
    if levels.shape != (PIXELS,) or levels.min() < 0 or levels.max() > 16:
        raise ValueError(f"answer_of: expected a clean digit of {PIXELS} pixels in [-1, 1], got {image!r}")
    return f"{int(label)}:" + "".join(LEVELS[v] for v in levels)


def parse_answer(answer: str) -> tuple[int, np.ndarray]:
    """(label, clean digit (64,) float32) from `answer_of`'s string."""
    label, _, pixels = answer.strip().partition(":")
    if not label.isdigit() or len(pixels) != PIXELS or any(c not in LEVELS for c in pixels):
        raise ValueError(
            f"restoration reward: answer {answer!r} is not 'label:<64 levels of {LEVELS}>'; use task.source "
            "asyncflow.tasks.restoration:DigitRestoration, whose answers carry the clean digit"
        )
    return int(label), np.array([LEVELS.index(c) / 8.0 - 1.0 for c in pixels], np.float32)


class DigitRestoration:
    dim = PIXELS
    condition_dim = PIXELS

    def __init__(self, degradation: str = "mask", seed: int = 0):
        if degradation not in DEGRADATIONS:
            raise ValueError(
                f"DigitRestoration: degradation={degradation!r}, expected one of {DEGRADATIONS}; fix "
                "task.options.degradation"
            )
        self.degradation, self.seed = degradation, seed
        (self.train, self.train_labels), (self.test, self.test_labels) = split()
        self._order = np.random.default_rng([seed, 3]).permutation(len(self.train))  # training prompts' order

    def _example(
        self, images: np.ndarray, labels: np.ndarray, row: int, index: int, stream: int
    ) -> FlowExample:
        clean = images[row : row + 1]
        y = degrade(clean, self.degradation, np.random.default_rng([self.seed, stream, index]))[0]
        return FlowExample(tuple(float(v) for v in y), answer_of(clean[0], int(labels[row])))

    def example(self, index: int) -> FlowExample:
        """Training digit number `index` (cycling over the 1,297), degraded afresh per index."""
        return self._example(
            self.train, self.train_labels, int(self._order[index % len(self._order)]), index, 1
        )

    def eval_example(self, index: int) -> FlowExample:
        """Held-out digit number `index` of the 500 test digits, a fixed degradation."""
        return self._example(self.test, self.test_labels, index % len(self.test), index, 2)

    def data(self, index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Pre-training batch `index`: clean training digits x (count, 64), degraded as y (count, 64)."""
        rng = np.random.default_rng([self.seed, 4, index])
        x = self.train[rng.integers(0, len(self.train), count)]
        return x, degrade(x, self.degradation, rng)


def _check(condition: Any, sample: Any, answer: str) -> tuple[np.ndarray, int, np.ndarray]:
    y, x = np.asarray(condition, np.float32).reshape(-1), np.asarray(sample, np.float32).reshape(-1)
    if y.shape != (PIXELS,) or x.shape != (PIXELS,):
        raise ValueError(
            f"restoration reward: expected a degraded digit and a sample of {PIXELS} values each, got "
            f"{y.shape} and {x.shape} (use task.source asyncflow.tasks.restoration:DigitRestoration)"
        )
    label, clean = parse_answer(answer)
    return x, label, clean


def reward(condition: Any, sample: Any, answer: str) -> dict[str, float]:
    """The classifier's probability of the clean digit's label, and minus the MSE to the clean digit."""
    x, label, clean = _check(condition, sample, answer)
    return {"label": float(_probabilities(x)[label]), "mse": -float(np.mean((x - clean) ** 2))}


class RestorationReward:
    """`reward` with the MSE weighted by `mse_weight`, made once per reward worker
    (task.reward_options): the classifier trains when the worker starts."""

    def __init__(self, mse_weight: float = 1.0):
        if not mse_weight >= 0:
            raise ValueError(
                f"RestorationReward: mse_weight={mse_weight}, expected >= 0; fix task.reward_options"
            )
        self.mse_weight = mse_weight
        classifier()

    def __call__(self, condition: Any, sample: Any, answer: str) -> dict[str, float]:
        parts = reward(condition, sample, answer)
        return {"label": parts["label"], "mse": self.mse_weight * parts["mse"]}


def agreement(condition: Any, sample: Any, answer: str) -> float:
    """1 if the classifier reads the sample as the clean digit's label, else 0."""
    x, label, _ = _check(condition, sample, answer)
    return float(_probabilities(x).argmax() == label)


def mse(condition: Any, sample: Any, answer: str) -> float:
    """Mean squared error per pixel to the clean digit (pixels in [-1, 1])."""
    x, _, clean = _check(condition, sample, answer)
    return float(np.mean((x - clean) ** 2))
