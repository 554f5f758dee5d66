"""Reward functions that misbehave, for the self-healing runs ('tests.integration.faulty_rewards:NAME')."""

from __future__ import annotations

import time
import zlib


def hangs_sometimes(prompt: str, response: str, answer: str) -> float:
    """The example's reward (the sorted digits), except that about 1 sample in 128 hangs for good."""
    if zlib.crc32(f"{prompt}|{response}".encode()) % 128 == 0:
        time.sleep(3600)
    return float(response == answer)


def slow(prompt: str, response: str, answer: str) -> float:
    """The example's reward, 10 ms per sample: one reward process scores 100 samples a second."""
    time.sleep(0.01)
    return float(response == answer)


def constant(prompt: str, response: str, answer: str) -> float:
    """A reward that never varies: every group's rewards are all equal."""
    return 1.0
