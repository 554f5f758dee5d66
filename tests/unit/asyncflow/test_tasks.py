"""The sorting task: deterministic by index, held-out eval stream, long tail, reward."""

from __future__ import annotations

import collections

import pytest

from asyncflow.tasks.sorting import SortDigits, reward


def test_examples_are_deterministic_and_correct():
    a, b = SortDigits(seed=3), SortDigits(seed=3)
    for i in range(50):
        e = a.example(i)
        assert e == b.example(i)
        digits = e.prompt.removesuffix(">")
        assert len(digits) == 5 and e.answer == "".join(sorted(digits))
    assert SortDigits(seed=4).example(0) != a.example(0) or SortDigits(seed=4).example(1) != a.example(1)
    train = {a.example(i).prompt for i in range(200)}
    held_out = {a.eval_example(i).prompt for i in range(200)}
    assert len(train & held_out) < 40  # different streams (5 digits: some collisions by chance only)


def test_long_tail_lengths():
    task = SortDigits(2, 16, "long_tail")
    lengths = collections.Counter(len(task.example(i).answer) for i in range(3000))
    assert min(lengths) == 2 and max(lengths) == 16
    assert lengths[2] > 0.4 * 3000  # most are short
    assert sum(v for k, v in lengths.items() if k >= 8) > 0.03 * 3000  # a real tail


def test_reward_is_exact_match():
    assert reward("31>", "13", "13") == 1.0
    assert reward("31>", "31", "13") == 0.0
    assert reward("31>", "13<", "13") == 0.0


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="min_digits <= max_digits"):
        SortDigits(5, 3)
    with pytest.raises(ValueError, match="long_tail"):
        SortDigits(lengths="zipf")  # type: ignore[arg-type]
