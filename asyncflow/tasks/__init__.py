"""Tasks: prompts with verifiable answers, addressed by index, and their reward functions.

A task knows nothing about tokens, models or the data store: it maps an index to a prompt
and an answer (deterministically, so a resumed run picks up at a cursor) and scores text.
Tasks and rewards are plugged in by "module:attr" strings in `task.source` / `task.reward`.
Token tasks map an index to text; flow tasks (`FlowTask`) to a condition vector, and also
give data to pre-train the flow on. A task read from data (`tasks.dataset`) may also define
`limit_prompts(count_tokens, room)`: the token kind calls it so that prompts too long for the model
leave the task's index before any index is read (workers.kinds.make_kind).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Example:
    prompt: str | list[dict[str, str]]  # what the policy sees: text, or chat messages
    answer: str  # what the reward checks against; also the warm-start target
    info: str = ""  # more of the record for the reward (a JSON object; "": none)


@dataclass(frozen=True)
class FlowExample:
    condition: tuple[float, ...]  # what a flow-matching policy is conditioned on (empty: nothing)
    answer: str  # what the reward checks against


class Task(Protocol):
    symbols: str  # every character prompts and answers use; the tokenizer is built from them

    def example(self, index: int) -> Example: ...  # training prompt number `index`

    def eval_example(self, index: int) -> Example: ...  # held-out prompt number `index`


class FlowTask(Protocol):
    """A task for a flow-matching policy: conditions in, points of R^dim out."""

    dim: int  # dimension of a sample
    condition_dim: int  # length of every condition vector (0: unconditional)

    def example(self, index: int) -> FlowExample: ...

    def eval_example(self, index: int) -> FlowExample: ...

    def data(
        self, index: int, count: int
    ) -> tuple[Any, Any]: ...  # pre-training batch: (count, dim), (count, condition_dim)


__all__ = ["Example", "FlowExample", "FlowTask", "Task"]
