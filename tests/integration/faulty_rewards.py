"""Reward functions that misbehave, for the self-healing runs ('faulty_rewards:NAME')."""

from __future__ import annotations

import time
import zlib


def hangs_sometimes(prompt: str, response: str, answer: str) -> float:
    """The example's reward (the sorted digits), except that about 1 sample in 48 hangs for good."""
    if zlib.crc32(f"{prompt}|{response}".encode()) % 48 == 0:
        time.sleep(3600)
    return float(response == answer)
