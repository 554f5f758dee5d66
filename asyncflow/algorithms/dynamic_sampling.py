"""DAPO's dynamic sampling: which groups carry a learning signal.

A group whose rewards are all equal has zero group-relative advantage for every sample (GRPO,
Dr.GRPO, RLOO alike), so it adds nothing to the policy gradient and only dilutes the batch.
DAPO (Yu et al. 2025, arXiv 2503.14476, §3.2, eq. 11) keeps a batch full of groups with
`0 < |{o_i : is_equivalent(a, o_i)}| < G`, i.e. neither all right nor all wrong; for any reward
this is "not all equal". The trainer drops the others and reads more groups in their place
(workers.screening); this module is the rule alone, plain Python over row positions.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

__all__ = ["split_by_signal", "uniform_groups"]


def uniform_groups(groups: Sequence[Hashable], rewards: Sequence[float]) -> set[Hashable]:
    """The groups whose rewards are all exactly equal; `groups[i]` is row i's group, `rewards[i]`
    its reward. Exact equality: a group that differs at all has a nonzero advantage somewhere."""
    if len(groups) != len(rewards):
        raise ValueError(f"{len(groups)} group keys for {len(rewards)} rewards: give one of each per row")
    low: dict[Hashable, float] = {}
    high: dict[Hashable, float] = {}
    for g, r in zip(groups, rewards):
        low[g] = min(low.get(g, r), r)
        high[g] = max(high.get(g, r), r)
    return {g for g in low if low[g] == high[g]}


def split_by_signal(groups: Sequence[Hashable], rewards: Sequence[float]) -> tuple[list[int], list[int]]:
    """Row positions to keep (their group's rewards differ) and to drop (all equal), each in order."""
    uniform = uniform_groups(groups, rewards)
    keep = [i for i, g in enumerate(groups) if g not in uniform]
    drop = [i for i, g in enumerate(groups) if g in uniform]
    return keep, drop
