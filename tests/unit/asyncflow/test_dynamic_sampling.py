"""DAPO's dynamic-sampling rule on hand-computed cases: a group is dropped exactly when all its
rewards are equal."""

from __future__ import annotations

import pytest
import torch

from asyncflow.algorithms import group_advantages
from asyncflow.algorithms.dynamic_sampling import split_by_signal, uniform_groups


def test_groups_whose_rewards_are_all_equal_are_uniform_the_others_keep_every_row():
    # rows of 4 groups of 3, interleaved as a store may hand them out
    groups = [7, 7, 9, 7, 9, 9, 2, 2, 2, 5, 5, 5]
    rewards = [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.25]
    # group 7: 1, 1, 1 -> all equal; 9: 0, 1, 0 -> signal; 2: 0, 0, 0 -> all equal; 5: .5, .5, .25 -> signal
    assert uniform_groups(groups, rewards) == {7, 2}
    keep, drop = split_by_signal(groups, rewards)
    assert keep == [2, 4, 5, 9, 10, 11]
    assert drop == [0, 1, 3, 6, 7, 8]


def test_a_single_row_group_is_uniform_and_any_difference_is_signal():
    assert uniform_groups([1], [0.3]) == {1}
    assert uniform_groups([1, 1], [0.0, 1e-7]) == set()  # GRPO's advantage is not zero there
    assert split_by_signal([], []) == ([], [])


def test_uniform_exactly_where_the_group_advantage_is_zero():
    """The rule is the one the estimator implies: all-equal groups, and only they, get zero advantage."""
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    zero = (group_advantages(rewards, "grpo") == 0).all(dim=1).tolist()
    groups = [g for g in range(3) for _ in range(4)]
    uniform = uniform_groups(groups, rewards.view(-1).tolist())
    assert [g in uniform for g in range(3)] == zero == [True, False, True]


def test_mismatched_lengths_are_refused_with_what_to_give():
    with pytest.raises(ValueError, match="one of each per row"):
        uniform_groups([1, 2], [0.0])
