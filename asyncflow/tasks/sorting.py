"""Digit sorting: "3142>" -> "1234". A verifiable task small enough for a 2-core CPU.

A randomly initialised model never sorts; a short supervised warm-start brings exact
success to about 0.2, and RL on the exact-match reward takes it past 0.8 in minutes.
`lengths: long_tail` draws list lengths from a heavy-tailed distribution, so response
lengths (and generation times) have the long tail that makes asynchronous RL pay off.
"""

from __future__ import annotations

import random
from typing import Literal

from asyncflow.tasks import Example

_EVAL_STREAM = 1 << 40  # eval indices live far from training indices: the sets never meet


class SortDigits:
    symbols = "0123456789>"

    def __init__(
        self, min_digits: int = 5, max_digits: int = 5, lengths: Literal["uniform", "long_tail"] = "uniform",
        seed: int = 0,
    ):  # fmt: skip
        if not 1 <= min_digits <= max_digits:
            raise ValueError(
                f"SortDigits needs 1 <= min_digits <= max_digits, got {min_digits} and {max_digits}; "
                "fix task.options"
            )
        if lengths not in ("uniform", "long_tail"):
            raise ValueError(f"SortDigits lengths={lengths!r}: expected 'uniform' or 'long_tail'")
        self.min_digits, self.max_digits, self.lengths, self.seed = min_digits, max_digits, lengths, seed

    @property
    def max_response_chars(self) -> int:
        return self.max_digits

    def _length(self, rng: random.Random) -> int:
        if self.lengths == "uniform":
            return rng.randint(self.min_digits, self.max_digits)
        # Pareto(1.2): most lists are short, a few are many times longer.
        span = self.max_digits - self.min_digits
        return self.min_digits + min(span, int(rng.paretovariate(1.2)) - 1)

    def example(self, index: int) -> Example:
        rng = random.Random(f"{self.seed}:{index}")  # str seeds hash deterministically across processes
        digits = [rng.randrange(10) for _ in range(self._length(rng))]
        return Example("".join(map(str, digits)) + ">", "".join(map(str, sorted(digits))))

    def eval_example(self, index: int) -> Example:
        return self.example(_EVAL_STREAM + index)


def reward(prompt: str, response: str, answer: str) -> float:
    """1 for the exactly sorted digits, else 0."""
    return float(response == answer)
