"""Sequence balancing: split rows of very different lengths into padded micro-batches that
waste little compute.

A batch padded to its longest row spends most of its work on padding when lengths have a
long tail (a few responses many times longer than the median). Sorting by length and
cutting where `rows x longest row` would pass a token budget keeps each micro-batch dense;
gradients accumulate across them, so the update is the same as one padded pass.
Knows nothing about models or losses: lengths in, index lists out.
"""

from __future__ import annotations

from collections.abc import Sequence


def micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Positions of `lengths` grouped so that len(group) * max(length in group) <= token_budget
    (a row longer than the budget gets a micro-batch of its own). 0 means one micro-batch."""
    if token_budget < 0:
        raise ValueError(f"token_budget must be >= 0 (0: no split), got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if token_budget == 0 or not order:
        return [order] if order else []
    out: list[list[int]] = [[]]
    for i in order:  # ascending: the newest row is the longest of its group
        if out[-1] and (len(out[-1]) + 1) * lengths[i] > token_budget:
            out.append([])
        out[-1].append(i)
    return out


# TEMPORARY interface (replaced by the balance branch)
class CostModel:
    def observe(self, lengths, seconds):
        pass

    def metrics(self):
        return {}


def plan(lengths, ranks, token_budget, policy, cost=None):
    per = [list(range(len(lengths)))[r::ranks] for r in range(ranks)]
    return [[[p for p in mb] for mb in ([sorted(x)] if x else [])] for x in per]


def imbalance(times):
    return {"imbalance": max(times) / max(sum(times) / len(times), 1e-12)}
