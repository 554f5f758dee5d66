"""Reward functions the reward-process tests name by spec ('pool_rewards:NAME'): each runs in a
reward process, which imports this module by the test's sys.path."""

from __future__ import annotations

import os
import time

import numpy as np


def exact(prompt: str, response: str, answer: str) -> float:
    return float(response == answer)


def hangs(prompt: str, response: str, answer: str) -> float:
    """Hangs on a response "hang" (past any deadline), else scores like `exact`."""
    if response == "hang":
        time.sleep(3600)
    return float(response == answer)


def allocates(prompt: str, response: str, answer: str) -> float:
    """Allocates (and touches) `response` megabytes, then scores 1."""
    block = np.ones(int(response) * 2**20, np.uint8)
    return float(block[-1])


def raises(prompt: str, response: str, answer: str) -> float:
    raise ValueError(f"cannot parse {response!r}")


def pid(prompt: str, response: str, answer: str) -> float:
    return float(os.getpid())


def echo(prompt, response, answer, info=None) -> dict:
    """What arrived, as parts: the arrays' sums and lengths, and the metadata's keys."""
    return {
        "prompt": float(np.asarray(prompt).sum()),
        "response": float(len(response)),
        "info": float(len(info or {})),
    }


class Scaled:
    """A reward made from task.reward_options: `scale` x exact."""

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, prompt: str, response: str, answer: str) -> float:
        return self.scale * float(response == answer)


def unencodable(prompt: str, response: str, answer: str) -> object:
    return object()
