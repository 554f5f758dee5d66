"""Unit tests for dataplane.samplers: row selection policies and Karmarkar–Karp balancing."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncflow.errors import DataPlaneError
from dataplane.samplers import (
    BalancedSampler,
    Candidate,
    GroupSampler,
    Sampler,
    Selection,
    SequentialSampler,
    karmarkar_karp,
    make_sampler,
)

# --- helpers -------------------------------------------------------------------------------------


def singles(n: int, lengths: list[int] | None = None) -> list[Candidate]:
    """`n` ungrouped rows 0..n-1."""
    lengths = lengths or [0] * n
    return [Candidate(row=i, group=i, group_size=1, length=lengths[i]) for i in range(n)]


def grouped(layout: list[tuple[int, int]], group_size: int) -> list[Candidate]:
    """Candidates from (row, group) pairs, all groups of `group_size`, length = row."""
    return [Candidate(row=r, group=g, group_size=group_size, length=r) for r, g in layout]


def spread(lengths: list[int], parts: list[list[int]]) -> int:
    sums = [sum(lengths[i] for i in part) for part in parts]
    return max(sums) - min(sums)


def greedy(lengths: list[int], k: int, equal_size: bool) -> list[list[int]]:
    """Longest-first greedy: each item to the lightest part that still has room."""
    cap = len(lengths) // k if equal_size else len(lengths)
    parts: list[list[int]] = [[] for _ in range(k)]
    sums = [0] * k
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        j = min((j for j in range(k) if len(parts[j]) < cap), key=lambda j: sums[j])
        parts[j].append(i)
        sums[j] += lengths[i]
    return parts


def optimal_spread(lengths: list[int], k: int, equal_size: bool) -> int:
    """Brute force over every assignment (small inputs only)."""
    best = None
    for assign in itertools.product(range(k), repeat=len(lengths)):
        counts = Counter(assign)
        if equal_size and any(counts[j] != len(lengths) // k for j in range(k)):
            continue
        parts = [[i for i, a in enumerate(assign) if a == j] for j in range(k)]
        s = spread(lengths, parts)
        best = s if best is None else min(best, s)
    assert best is not None
    return best


def assert_partition(parts: list[list[int]], n: int, k: int) -> None:
    assert len(parts) == k
    assert sorted(i for part in parts for i in part) == list(range(n))
    assert all(part == sorted(part) for part in parts)


@st.composite
def ready_groups(draw: st.DrawFn) -> tuple[list[Candidate], int]:
    """Groups whose rows arrive interleaved, some not yet ready; and a batch_size that fits every group."""
    sizes = draw(st.lists(st.integers(1, 4), min_size=0, max_size=8))
    arrival = draw(st.permutations([g for g, size in enumerate(sizes) for _ in range(size)]))
    ready = draw(st.lists(st.booleans(), min_size=len(arrival), max_size=len(arrival)))
    candidates = [
        Candidate(row=row, group=g, group_size=sizes[g], length=draw(st.integers(0, 50)))
        for row, (g, is_ready) in enumerate(zip(arrival, ready, strict=True))
        if is_ready
    ]
    batch_size = draw(st.integers(max(sizes, default=1), 12))
    return candidates, batch_size


# --- SequentialSampler ---------------------------------------------------------------------------


def test_sequential_takes_first_rows_in_arrival_order():
    candidates = [Candidate(row=r, group=0, group_size=1, length=0) for r in (3, 5, 8, 13, 21)]
    assert SequentialSampler().select(candidates, 3, allow_partial=False) == Selection([3, 5, 8], None)


def test_sequential_waits_when_short():
    assert SequentialSampler().select(singles(2), 3, allow_partial=False) is None


def test_sequential_partial_returns_what_is_there():
    assert SequentialSampler().select(singles(2), 3, allow_partial=True) == Selection([0, 1], None)
    assert SequentialSampler().select([], 3, allow_partial=True) == Selection([], None)


def test_sequential_ignores_groups():
    candidates = grouped([(0, 0), (1, 1), (2, 0)], group_size=4)
    assert SequentialSampler().select(candidates, 2, allow_partial=False) == Selection([0, 1], None)


@pytest.mark.parametrize("sampler", [SequentialSampler(), GroupSampler(), BalancedSampler(2)])
def test_non_positive_batch_size_is_refused(sampler: Sampler):
    with pytest.raises(DataPlaneError, match="batch_size=0"):
        sampler.select(singles(4), 0, allow_partial=False)


# --- GroupSampler --------------------------------------------------------------------------------


def test_group_takes_complete_groups_in_order_of_first_row():
    layout = [(0, 7), (1, 9), (2, 7), (3, 9), (4, 5), (5, 5)]
    assert GroupSampler().select(grouped(layout, 2), 4, allow_partial=False) == Selection([0, 2, 1, 3], None)


def test_group_skips_incomplete_groups_without_splitting_them():
    # Group 0 is missing a row; group 1 behind it is complete and must not be held back.
    layout = [(0, 0), (1, 1), (2, 1), (3, 2), (4, 2)]
    selection = GroupSampler().select(grouped(layout, 2), 4, allow_partial=False)
    assert selection == Selection([1, 2, 3, 4], None)


def test_group_waits_for_incomplete_groups():
    layout = [(0, 0), (1, 0), (2, 1)]
    assert GroupSampler().select(grouped(layout, 2), 4, allow_partial=False) is None


def test_group_partial_returns_complete_groups_only():
    layout = [(0, 0), (1, 0), (2, 1)]
    assert GroupSampler().select(grouped(layout, 2), 4, allow_partial=True) == Selection([0, 1], None)
    assert GroupSampler().select(grouped([(0, 0)], 2), 4, allow_partial=True) == Selection([], None)
    assert GroupSampler().select([], 4, allow_partial=True) == Selection([], None)


def test_group_never_exceeds_batch_size():
    layout = [(r, r // 2) for r in range(10)]  # five complete groups of 2
    assert GroupSampler().select(grouped(layout, 2), 4, allow_partial=False) == Selection([0, 1, 2, 3], None)


def test_group_stops_at_first_group_that_does_not_fit():
    # FIFO: the 3-row group 1 does not fit after group 0, and the newer 1-row group 2 may not overtake it.
    candidates = [
        Candidate(row=0, group=0, group_size=2, length=0),
        Candidate(row=1, group=0, group_size=2, length=0),
        Candidate(row=2, group=1, group_size=3, length=0),
        Candidate(row=3, group=1, group_size=3, length=0),
        Candidate(row=4, group=1, group_size=3, length=0),
        Candidate(row=5, group=2, group_size=1, length=0),
    ]
    assert GroupSampler().select(candidates, 4, allow_partial=False) == Selection([0, 1], None)


def test_group_batch_not_a_multiple_of_group_size_takes_whole_groups_that_fit():
    layout = [(r, r // 4) for r in range(12)]  # three complete groups of 4
    assert GroupSampler().select(grouped(layout, 4), 10, allow_partial=False) == Selection(
        list(range(8)), None
    )
    # Only one group so far: room for another one, so wait.
    assert GroupSampler().select(grouped(layout[:4], 4), 10, allow_partial=False) is None


def test_group_size_one_is_sequential():
    candidates = singles(5)
    for allow_partial in (False, True):
        for batch_size in (1, 3, 5, 7):
            assert GroupSampler().select(candidates, batch_size, allow_partial) == SequentialSampler().select(
                candidates, batch_size, allow_partial
            )


def test_group_larger_than_batch_is_an_error_naming_the_fix():
    layout = [(r, 0) for r in range(8)]
    with pytest.raises(DataPlaneError, match=r"group_size=8.*batch_size=4.*multiple of the group size"):
        GroupSampler().select(grouped(layout, 8), 4, allow_partial=False)


def test_group_with_inconsistent_size_is_an_error():
    candidates = [
        Candidate(row=0, group=3, group_size=2, length=0),
        Candidate(row=1, group=3, group_size=4, length=0),
    ]
    with pytest.raises(DataPlaneError, match="group 3"):
        GroupSampler().select(candidates, 4, allow_partial=False)


@settings(max_examples=200, deadline=None)
@given(ready_groups(), st.booleans())
def test_group_never_splits_a_group(case: tuple[list[Candidate], int], allow_partial: bool):
    candidates, batch_size = case
    selection = GroupSampler().select(candidates, batch_size, allow_partial)
    if selection is None:
        assert not allow_partial
        return
    assert selection.shards is None
    assert len(selection.rows) <= batch_size
    assert len(set(selection.rows)) == len(selection.rows)
    by_row = {c.row: c for c in candidates}
    taken = Counter(by_row[r].group for r in selection.rows)
    for group, count in taken.items():
        size = next(c.group_size for c in candidates if c.group == group)
        assert count == size, f"group {group} split: {count} of {size} rows"
    if not allow_partial:
        assert selection.rows


# --- BalancedSampler -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(ready_groups(), st.booleans(), st.integers(1, 4))
def test_balanced_picks_group_rows_and_partitions_them(
    case: tuple[list[Candidate], int], allow_partial: bool, dp_size: int
):
    candidates, batch_size = case
    expected = GroupSampler().select(candidates, batch_size, allow_partial)
    sampler = BalancedSampler(dp_size, equal_size=False)
    selection = sampler.select(candidates, batch_size, allow_partial)
    if expected is None or not expected.rows:
        assert selection == expected
        return
    assert selection is not None and selection.shards is not None
    assert selection.rows == expected.rows
    assert len(selection.shards) == dp_size
    assert sorted(r for shard in selection.shards for r in shard) == sorted(selection.rows)
    assert all(shard == sorted(shard) for shard in selection.shards)


def test_balanced_equal_size_shards_and_balanced_sums():
    # Lengths 9,1,8,2,7,3 split 3 ways: the optimum is 10 tokens and 2 rows per rank.
    candidates = singles(6, [9, 1, 8, 2, 7, 3])
    selection = BalancedSampler(3).select(candidates, 6, allow_partial=False)
    assert selection == Selection([0, 1, 2, 3, 4, 5], [[0, 1], [2, 3], [4, 5]])


def test_balanced_beats_contiguous_split_on_hand_case():
    # Two long and two short sequences over 2 ranks: contiguous halves would give 200 vs 2 tokens.
    candidates = singles(4, [100, 100, 1, 1])
    selection = BalancedSampler(2).select(candidates, 4, allow_partial=False)
    assert selection is not None and selection.shards is not None
    assert sorted(selection.shards) == [[0, 2], [1, 3]] or sorted(selection.shards) == [[0, 3], [1, 2]]


def test_balanced_balances_rows_not_groups():
    # One group of 4 over 2 ranks: the group stays in the batch but its rows spread over both ranks.
    candidates = [Candidate(row=r, group=0, group_size=4, length=n) for r, n in enumerate([10, 10, 1, 1])]
    selection = BalancedSampler(2).select(candidates, 4, allow_partial=False)
    assert selection is not None and selection.shards is not None
    assert all(len(shard) == 2 for shard in selection.shards)
    assert spread([10, 10, 1, 1], selection.shards) == 0


def test_balanced_waits_like_group_sampler():
    assert BalancedSampler(2).select(singles(3), 4, allow_partial=False) is None
    assert BalancedSampler(2).select([], 4, allow_partial=True) == Selection([], None)


def test_balanced_equal_size_needs_rows_divisible_by_dp_size():
    with pytest.raises(DataPlaneError, match=r"3 rows.*dp_size=2"):
        BalancedSampler(2).select(singles(3), 4, allow_partial=True)
    selection = BalancedSampler(2, equal_size=False).select(singles(3), 4, allow_partial=True)
    assert selection is not None and selection.shards is not None
    assert sorted(len(shard) for shard in selection.shards) == [1, 2]


def test_balanced_rejects_non_positive_dp_size():
    with pytest.raises(DataPlaneError, match="dp_size=0"):
        BalancedSampler(0)


# --- karmarkar_karp ------------------------------------------------------------------------------


@pytest.mark.parametrize("equal_size", [False, True])
def test_karmarkar_karp_single_part_holds_everything(equal_size: bool):
    assert karmarkar_karp([5, 3, 9, 1], 1, equal_size) == [[0, 1, 2, 3]]


@pytest.mark.parametrize("equal_size", [False, True])
def test_karmarkar_karp_one_item_per_part_when_k_is_len(equal_size: bool):
    parts = karmarkar_karp([5, 3, 9, 1], 4, equal_size)
    assert_partition(parts, 4, 4)
    assert all(len(part) == 1 for part in parts)


def test_karmarkar_karp_more_parts_than_items_leaves_parts_empty():
    parts = karmarkar_karp([5, 3], 4, equal_size=False)
    assert_partition(parts, 2, 4)
    assert sorted(len(part) for part in parts) == [0, 0, 1, 1]


def test_karmarkar_karp_empty_input():
    assert karmarkar_karp([], 3, equal_size=True) == [[], [], []]


def test_karmarkar_karp_finds_known_optimum():
    # 1..9 into 3 equal-size parts of 15 (e.g. 1+5+9, 2+6+7, 3+4+8) has spread 0; KK gets within 2.
    lengths = list(range(1, 10))
    parts = karmarkar_karp(lengths, 3, equal_size=True)
    assert_partition(parts, 9, 3)
    assert all(len(part) == 3 for part in parts)
    assert spread(lengths, parts) <= 2
    assert spread([10, 10, 1, 1], karmarkar_karp([10, 10, 1, 1], 2, equal_size=True)) == 0


def test_karmarkar_karp_argument_errors():
    with pytest.raises(DataPlaneError, match="k=0"):
        karmarkar_karp([1, 2], 0, equal_size=False)
    with pytest.raises(DataPlaneError, match=r"5 items.*k=2"):
        karmarkar_karp([1, 2, 3, 4, 5], 2, equal_size=True)


@st.composite
def small_instances(draw: st.DrawFn) -> tuple[list[int], int, bool]:
    k = draw(st.integers(1, 3))
    equal_size = draw(st.booleans())
    n = k * draw(st.integers(1, 7 // k)) if equal_size else draw(st.integers(1, 7))
    return draw(st.lists(st.integers(0, 100), min_size=n, max_size=n)), k, equal_size


@settings(max_examples=100, deadline=None)
@given(small_instances())
def test_karmarkar_karp_is_within_max_length_of_optimal(case: tuple[list[int], int, bool]):
    lengths, k, equal_size = case
    parts = karmarkar_karp(lengths, k, equal_size)
    assert_partition(parts, len(lengths), k)
    if equal_size:
        assert all(len(part) == len(lengths) // k for part in parts)
    assert spread(lengths, parts) <= optimal_spread(lengths, k, equal_size) + max(lengths)


@pytest.mark.parametrize("equal_size", [False, True])
def test_karmarkar_karp_no_worse_than_greedy_overall(equal_size: bool):
    # Neither method dominates on every input (the greedy wins on a few percent of them), so the
    # comparison is over many seeded random inputs: KK must not be worse in total.
    rng = random.Random(1982)
    kk_total = greedy_total = 0
    for _ in range(500):
        k = rng.randint(2, 8)
        n = k * rng.randint(2, 8) if equal_size else rng.randint(k, 64)
        lengths = [rng.randint(1, 4096) for _ in range(n)]
        kk_total += spread(lengths, karmarkar_karp(lengths, k, equal_size))
        greedy_total += spread(lengths, greedy(lengths, k, equal_size))
    assert kk_total <= greedy_total


def test_karmarkar_karp_is_deterministic():
    rng = random.Random(7)
    lengths = [rng.randint(0, 1000) for _ in range(40)]
    assert karmarkar_karp(lengths, 4, True) == karmarkar_karp(list(lengths), 4, True)


# --- make_sampler --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [("sequential", SequentialSampler), ("group", GroupSampler), ("balanced", BalancedSampler)],
)
def test_make_sampler_resolves_names(name: str, kind: type):
    sampler = make_sampler(name, dp_size=2)
    assert isinstance(sampler, kind)
    assert isinstance(sampler, Sampler)
    assert sampler.name == name


def test_make_sampler_passes_dp_size_to_balanced():
    sampler = make_sampler("balanced", dp_size=4)
    assert isinstance(sampler, BalancedSampler)
    assert sampler.dp_size == 4


def test_make_sampler_unknown_name_names_value_and_choices():
    with pytest.raises(DataPlaneError, match=r"'fifo'.*sequential, group, balanced"):
        make_sampler("fifo")
