"""The staleness rule: lag, usability, the oldest usable version, admission control, histograms."""

from __future__ import annotations

import pytest

from asyncflow.versioning import admission_limit, is_usable, lag, min_usable_version, staleness_histogram


def test_lag_is_versions_published_since_the_row():
    assert lag(7, 7) == 0
    assert lag(7, 3) == 4
    assert lag(0, 0) == 0


def test_lag_rejects_a_row_newer_than_the_trainer():
    with pytest.raises(ValueError, match=r"row_version 5 is newer than trainer_version 3"):
        lag(3, 5)


@pytest.mark.parametrize(("trainer", "row", "name"), [(-1, 0, "trainer_version"), (2, -1, "row_version")])
def test_versions_are_non_negative(trainer, row, name):
    with pytest.raises(ValueError, match=rf"{name} must be >= 0.*got -1"):
        lag(trainer, row)


def test_is_usable_up_to_k_versions_behind():
    assert is_usable(10, 8, k=2)
    assert not is_usable(10, 7, k=2)
    assert is_usable(10, 10, k=0)


def test_k_zero_is_synchronous():
    assert is_usable(4, 4, k=0)
    assert not is_usable(4, 3, k=0)


def test_negative_k_is_rejected_everywhere():
    for call in (
        lambda: is_usable(3, 3, -1),
        lambda: min_usable_version(3, -1),
        lambda: admission_limit(3, -1, 8),
    ):
        with pytest.raises(ValueError, match=r"staleness bound k must be >= 0, got -1"):
            call()


def test_is_usable_rejects_future_rows_even_with_large_k():
    with pytest.raises(ValueError, match="newer than trainer_version"):
        is_usable(2, 3, k=100)


def test_min_usable_version_is_floored_at_zero():
    assert min_usable_version(10, 3) == 7
    assert min_usable_version(2, 5) == 0
    assert min_usable_version(0, 0) == 0


def test_min_usable_version_agrees_with_is_usable():
    for t in range(6):
        for k in range(4):
            usable = [v for v in range(t + 1) if is_usable(t, v, k)]
            assert min(usable) == min_usable_version(t, k)


def test_admission_limit_formula():
    assert admission_limit(0, 0, 8) == 8  # synchronous: one batch at a time
    assert admission_limit(3, 2, 8) == 48
    assert admission_limit(0, 4, 1) == 5


def test_admission_limit_rejects_empty_batches():
    with pytest.raises(ValueError, match=r"batch_prompts must be >= 1.*got 0"):
        admission_limit(0, 1, 0)


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("batch_prompts", [1, 4])
def test_admission_limit_bounds_lag_when_consumed_in_order(k, batch_prompts):
    """Simulate: admit greedily up to the limit; each prompt is generated at the version of its
    admission; the trainer consumes batches in order. Every trained row has lag <= k, and the
    bound is tight (some row reaches lag k once the run is long enough)."""
    admitted_at: list[int] = []  # prompt i -> trainer version when it was admitted
    lags = []
    for version in range(12):
        while len(admitted_at) < admission_limit(version, k, batch_prompts):
            admitted_at.append(version)
        step_rows = admitted_at[version * batch_prompts : (version + 1) * batch_prompts]
        assert len(step_rows) == batch_prompts  # the trainer never starves
        lags += [lag(version, v) for v in step_rows]
        assert all(is_usable(version, v, k) for v in step_rows)
    assert max(lags) == k


def test_staleness_histogram_counts_by_lag_in_order():
    hist = staleness_histogram(5, [5, 3, 4, 5, 3, 3])
    assert hist == {0: 2, 1: 1, 2: 3}
    assert list(hist) == [0, 1, 2]


def test_staleness_histogram_of_nothing_is_empty():
    assert staleness_histogram(3, []) == {}
    assert staleness_histogram(3, iter([])) == {}


def test_staleness_histogram_rejects_future_rows():
    with pytest.raises(ValueError, match="row_version 4 is newer than trainer_version 3"):
        staleness_histogram(3, [1, 4])
