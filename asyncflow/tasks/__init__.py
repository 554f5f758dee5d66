"""Tasks: prompts with verifiable answers, addressed by index, and their reward functions.

A task knows nothing about tokens, models or the data store: it maps an index to a prompt
and an answer (deterministically, so a resumed run picks up at a cursor) and scores text.
Tasks and rewards are plugged in by "module:attr" strings in `task.source` / `task.reward`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Example:
    prompt: str  # what the policy sees
    answer: str  # what the reward checks against; also the warm-start target


class Task(Protocol):
    symbols: str  # every character prompts and answers use; the tokenizer is built from them

    def example(self, index: int) -> Example: ...  # training prompt number `index`

    def eval_example(self, index: int) -> Example: ...  # held-out prompt number `index`


__all__ = ["Example", "Task"]
