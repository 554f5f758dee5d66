"""Digit inpainting: fill a hidden square of an 8 x 8 digit (asyncflow.tasks.digits) so that it
reads as the intended digit and agrees with the pixels that were not hidden.

A prompt's condition is the masked image and the mask, concatenated: c = [m * x, m] (128
values; m = 1 on known pixels, 0 on the `mask_size` x `mask_size` square hidden at a random
place). The answer is the digit's label. The policy generates all 64 pixels.

Rewards (`reward`, `agreement`) judge with the digits classifier of
asyncflow.tasks.digit_classifier, trained once per process from `CLASSIFIER_SEED` (a few
seconds; the digits benchmarks judge with another seed, so a policy cannot be tuned to the
judge it is measured by):

    reward(c, x, label)    = {"label": p(label | x), "consistency": -mean over known pixels of (x - c)^2}
    agreement(c, x, label) = 1 if the classifier's most likely digit for x is label, else 0

`InpaintingReward` is `reward` made once per reward worker (task.reward_options), so the
classifier trains when the worker starts rather than inside the first call.

Knows nothing about models or engines; torch only inside the rewards.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np

from asyncflow.tasks import FlowExample
from asyncflow.tasks.digits import SIDE, split, square_masks

__all__ = [
    "CLASSIFIER_SEED",
    "DigitInpainting",
    "InpaintingReward",
    "agreement",
    "classifier",
    "condition",
    "reward",
]

CLASSIFIER_SEED = 1
PIXELS = SIDE * SIDE


def condition(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[m * x, m] for rows of images and masks (B, 64): (B, 128) float32."""
    return np.concatenate([mask * x, mask], axis=1).astype(np.float32)


class DigitInpainting:
    dim = PIXELS
    condition_dim = 2 * PIXELS

    def __init__(self, mask_size: int = 4, seed: int = 0):
        if not 1 <= mask_size <= SIDE:
            raise ValueError(
                f"DigitInpainting: mask_size={mask_size}, expected 1 to {SIDE} (the side of the hidden "
                "square); fix task.options.mask_size"
            )
        self.mask_size, self.seed = mask_size, seed
        (self.train, self.train_labels), (self.test, self.test_labels) = split()
        self._order = np.random.default_rng([seed, 3]).permutation(len(self.train))  # training prompts' order

    def _example(self, images: np.ndarray, labels: np.ndarray, index: int, stream: int) -> FlowExample:
        row = index % len(images)
        mask = square_masks(1, np.random.default_rng([self.seed, stream, index]), self.mask_size)
        cond = condition(images[row : row + 1], mask)[0]
        return FlowExample(tuple(float(v) for v in cond), str(int(labels[row])))

    def example(self, index: int) -> FlowExample:
        """Training digit number `index` (cycling over the 1,297), a mask of its own."""
        row = self._order[index % len(self._order)]
        return self._example(self.train[row : row + 1], self.train_labels[row : row + 1], index, 1)

    def eval_example(self, index: int) -> FlowExample:
        """Held-out digit number `index` of the 500 test digits, a fixed mask."""
        return self._example(self.test, self.test_labels, index, 2)

    def data(self, index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Pre-training batch `index`: clean training digits (count, 64) and their conditions (count, 128)."""
        rng = np.random.default_rng([self.seed, 4, index])
        x = self.train[rng.integers(0, len(self.train), count)]
        return x, condition(x, square_masks(count, rng, self.mask_size))


_training = threading.Lock()  # a reward worker calls from a thread pool: one call trains it, once


def classifier() -> Any:
    """The reward's digit classifier, trained on first use in this process (then kept)."""
    with _training:
        return _trained()


@functools.cache
def _trained() -> Any:
    import torch

    from asyncflow.tasks.digit_classifier import train_classifier

    with torch.random.fork_rng():  # and with one thread of its own: the same weights wherever it trains
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return train_classifier(CLASSIFIER_SEED)
        finally:
            torch.set_num_threads(threads)


def _probabilities(sample: Any) -> np.ndarray:
    import torch

    x = torch.as_tensor(np.asarray(sample, np.float32).reshape(1, PIXELS))
    with torch.no_grad():
        return torch.softmax(classifier()(x), dim=-1)[0].numpy()


def _check(condition: Any, sample: Any, answer: str) -> tuple[np.ndarray, np.ndarray, int]:
    c, x = np.asarray(condition, np.float32).reshape(-1), np.asarray(sample, np.float32).reshape(-1)
    if c.shape != (2 * PIXELS,) or x.shape != (PIXELS,) or not answer.strip().isdigit():
        raise ValueError(
            f"inpainting reward: expected a condition of {2 * PIXELS} values, a sample of {PIXELS} and a "
            f"digit label as the answer; got {c.shape}, {x.shape} and {answer!r} (use task.source "
            "asyncflow.tasks.inpainting:DigitInpainting)"
        )
    return c, x, int(answer)


def reward(condition: Any, sample: Any, answer: str) -> dict[str, float]:
    """The classifier's probability of the intended digit, and minus the squared error on the
    known pixels (see the module docstring); the reward is their sum."""
    c, x, label = _check(condition, sample, answer)
    known = c[PIXELS:]
    error = float((known * (x - c[:PIXELS]) ** 2).sum() / max(known.sum(), 1.0))
    return {"label": float(_probabilities(x)[label]), "consistency": -error}


class InpaintingReward:
    """`reward`, with the squared error on the known pixels weighted by `consistency_weight`, made
    once per reward worker (task.reward_options): the classifier trains when the worker starts,
    before it takes any rows, so no row waits on it past its lease."""

    def __init__(self, consistency_weight: float = 1.0):
        if not consistency_weight >= 0:
            raise ValueError(
                f"InpaintingReward: consistency_weight={consistency_weight}, expected >= 0; fix "
                "task.reward_options"
            )
        self.consistency_weight = consistency_weight
        classifier()

    def __call__(self, condition: Any, sample: Any, answer: str) -> dict[str, float]:
        parts = reward(condition, sample, answer)
        return {"label": parts["label"], "consistency": self.consistency_weight * parts["consistency"]}


def agreement(condition: Any, sample: Any, answer: str) -> float:
    """1 if the classifier reads the sample as the intended digit, else 0."""
    _, x, label = _check(condition, sample, answer)
    return float(_probabilities(x).argmax() == label)
