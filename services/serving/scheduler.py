"""The rollout scheduling policy: which sequences decode next step, which wait, which are preempted.

RL serving differs from chat serving: nobody waits for one answer, the trainer waits for
groups (a prompt's n samples are scored together, so a group is trainable only when its
last sample finishes) and drops samples that fall out of the staleness window. So the RL
priority orders sequences by

  1. the group's unfinished samples, fewest first (finish what is nearly trainable),
  2. the oldest policy version (the sample closest to the staleness bound),
  3. arrival (first come, first served).

`plan_step` turns priorities and a KV budget into one step's decisions. It is pure (no
torch, no engine), so the torch engine and the cluster-scale simulator in
benchmarks/rollout_scheduler.py run the very same policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Policy", "Plan", "Slot", "fcfs_priority", "plan_step", "priority_key", "vllm_priority"]

Policy = Literal["fcfs", "rl"]
POLICIES: tuple[Policy, ...] = ("fcfs", "rl")
_VERSION_SPAN = 1 << 32  # versions (from -1) fit below this in vllm_priority's packing


def priority_key(*, remaining: int, version: int, arrival: int) -> tuple[int, int, int]:
    """The RL priority of a sequence; smaller runs first.

    remaining: unfinished samples of its group (this one included), version: the oldest policy
    version its group was admitted at or sampled with, arrival: submission order of the group.
    """
    if remaining < 1:
        raise ValueError(
            f"priority_key: remaining={remaining}, expected >= 1 (the sequence itself is unfinished); "
            "count the group's samples that have not finished"
        )
    return (remaining, version, arrival)


def fcfs_priority(*, remaining: int, version: int, arrival: int) -> tuple[int, int, int]:
    """First come, first served: arrival alone orders (the baseline the RL priority is measured against)."""
    return (0, 0, arrival)


def vllm_priority(key: Sequence[int]) -> int:
    """One integer for vLLM's `priority` policy (smaller first; vLLM breaks ties by arrival)."""
    remaining, version = int(key[0]), int(key[1])
    if not (0 <= remaining < 1 << 20 and -1 <= version < _VERSION_SPAN - 1):
        raise ValueError(
            f"vllm_priority: key {tuple(key)} has remaining outside [0, 2**20) or version outside "
            f"[-1, 2**32 - 1); pass a key from priority_key"
        )
    return remaining * _VERSION_SPAN + version + 1


@dataclass(frozen=True)
class Slot:
    """What the policy knows of one unfinished sequence."""

    key: tuple[int, ...]  # its priority; smaller runs first
    tokens: int  # KV tokens it holds once it runs next step (prompt + generated so far + 1)
    running: bool  # decoded last step (its KV is in the batch)


@dataclass
class Plan:
    """One step's decisions, as indices into the slots handed to plan_step."""

    run: list[int] = field(default_factory=list)  # decode this step (in priority order)
    preempt: list[int] = field(default_factory=list)  # were running; leave the batch, KV kept
    admit: list[int] = field(default_factory=list)  # were waiting; join the batch


def plan_step(slots: Sequence[Slot], *, budget_tokens: int, max_rows: int) -> Plan:
    """Fill the batch in priority order within `budget_tokens` KV tokens and `max_rows` rows.

    Running sequences keep their place unless the budget is short (they grow one token a step)
    or a waiting sequence outranks them: then the lowest-priority running ones are preempted.
    A sequence that does not fit is skipped, so smaller lower-priority ones may still run
    (no head-of-line blocking); one that could never fit alone is an error.
    """
    too_big = [s.tokens for s in slots if s.tokens > budget_tokens]
    if too_big:
        raise ValueError(
            f"plan_step: a sequence needs {max(too_big)} KV tokens but the budget is {budget_tokens}; "
            "raise the engine's kv_budget_tokens or lower max_new_tokens"
        )
    order = sorted(range(len(slots)), key=lambda i: (slots[i].key, not slots[i].running))
    plan, used = Plan(), 0
    for i in order:
        if len(plan.run) < max_rows and used + slots[i].tokens <= budget_tokens:
            plan.run.append(i)
            used += slots[i].tokens
    chosen = set(plan.run)
    plan.preempt = [i for i in order if slots[i].running and i not in chosen]
    plan.admit = [i for i in plan.run if not slots[i].running]
    return plan
