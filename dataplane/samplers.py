"""Samplers: which of a partition's ready rows a consumer gets next.

The store's controller calls `Sampler.select` with the rows currently ready for one consumer (in
arrival order) and hands out the rows it returns. A sampler is a pure policy over `Candidate`
records: it knows nothing about Ray, storage units, leases, timeouts or tensors. It only decides
*which* rows, and for balanced sampling *which data-parallel rank* gets each of them.

Three policies:

* `SequentialSampler`: the oldest `batch_size` rows.
* `GroupSampler`: whole groups only (GRPO needs every sample of a prompt in the same batch).
* `BalancedSampler`: the rows `GroupSampler` picks, split into `dp_size` shards whose token sums
  are as equal as possible, with `karmarkar_karp`, the largest differencing method of
  N. Karmarkar and R. M. Karp, "The differencing method of set partitioning", Technical Report
  UCB/CSD 82/113, University of California, Berkeley, 1982; generalised to k-way partitioning
  as in verl's `seqlen_balancing.py`.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from dataplane.errors import DataPlaneError, StoreTimeout

__all__ = [
    "BalancedSampler",
    "Candidate",
    "RowInfo",
    "GroupSampler",
    "Sampler",
    "Selection",
    "SequentialSampler",
    "karmarkar_karp",
    "make_sampler",
]


@dataclass(slots=True, frozen=True)
class Candidate:
    """One ready row as the controller describes it to a sampler."""

    row: int  # row index in the partition (increasing with arrival order)
    group: int  # group id: all samples of one prompt share it
    group_size: int  # how many rows the group has in total (1 = no grouping)
    length: int  # sequence length in tokens used for balancing (0 if unknown)


class RowInfo(Protocol):
    """What a sampler reads of a row: a `Candidate`, or the controller's own row record."""

    @property
    def row(self) -> int: ...
    @property
    def group(self) -> int: ...
    @property
    def group_size(self) -> int: ...
    @property
    def length(self) -> int: ...


@dataclass(slots=True, frozen=True)
class Selection:
    """The rows to hand out and, for balanced sampling, how they split over data-parallel ranks."""

    rows: list[int]  # rows handed out, in order
    shards: list[list[int]] | None  # rows per data-parallel rank (a partition of `rows`), else None


@runtime_checkable
class Sampler(Protocol):
    """A policy choosing rows among the ready candidates; None means "not yet, wait for more rows"."""

    name: str

    def select(
        self, candidates: Sequence[RowInfo], batch_size: int, allow_partial: bool
    ) -> Selection | None: ...


def select_at_least(
    chooser: Sampler, candidates: Sequence[RowInfo], batch_size: int, min_rows: int, allow_partial: bool
) -> Selection | None:
    """A full batch if the sampler can make one, else at least `min_rows` rows (up to batch_size)
    if it can, else what `allow_partial` lets it take (None: wait)."""
    if not 0 < min_rows < batch_size:
        return chooser.select(candidates, batch_size, allow_partial)
    # A sampler picks the same rows whether or not it may stop short; it only says None when it
    # must wait. So one selection that may stop short tells both (the balanced sampler excepted:
    # its shards must split a partial batch evenly, so it is asked for a full batch first).
    if isinstance(chooser, BalancedSampler):
        full = chooser.select(candidates, batch_size, allow_partial)
        if full is not None and full.rows:
            return full
    some = chooser.select(candidates, batch_size, True)
    if some is not None and (len(some.rows) >= min_rows or allow_partial):
        return some
    return None


def too_big(partition: str, batch_size: int, capacity: int) -> str:
    """Why a get of `batch_size` rows can never be served by a partition of `capacity`."""
    return (
        f"get of {batch_size} rows from {partition!r} can never be served: the partition holds at most "
        f"{capacity} rows (its capacity); ask for at most {capacity}, pass allow_partial=True, or create "
        "the partition with a larger capacity"
    )


def not_ready(
    partition: str, consumer: str, batch_size: int, fields: Sequence[str], timeout_s: float, ready: int,
    pending: int,
) -> StoreTimeout:  # fmt: skip
    """The error of a get that waited `timeout_s` for rows and got too few."""
    return StoreTimeout(
        f"get from {partition!r} for consumer {consumer!r}: fewer than {batch_size} rows with "
        f"fields {list(fields)} became ready within {timeout_s:.1f} s ({ready} ready, {pending} pending). "
        "Check that the producers of those fields run, or pass allow_partial=True / a longer timeout_s"
    )


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise DataPlaneError(f"batch_size={batch_size} is invalid: expected a positive integer of rows.")


class SequentialSampler:
    """The first `batch_size` candidates in arrival order, ignoring groups."""

    name = "sequential"

    def select(self, candidates: Sequence[RowInfo], batch_size: int, allow_partial: bool) -> Selection | None:
        _check_batch_size(batch_size)
        if len(candidates) < batch_size and not allow_partial:
            return None
        return Selection([c.row for c in candidates[:batch_size]], None)

    def __repr__(self) -> str:
        return "SequentialSampler()"


@dataclass(slots=True)
class _Group:
    size: int
    rows: list[int]


def _groups_in_order(candidates: Sequence[RowInfo], batch_size: int) -> list[_Group]:
    """Groups by first ready row, after rejecting groups that could never be handed out."""
    groups: dict[int, _Group] = {}  # dicts keep insertion order = order of each group's first row
    for c in candidates:
        group = groups.setdefault(c.group, _Group(c.group_size, []))
        if c.group_size != group.size:
            raise DataPlaneError(
                f"group {c.group} has rows declaring group_size {group.size} and {c.group_size}: every row "
                "of a group must carry the same group_size; fix the producer that writes this group."
            )
        group.rows.append(c.row)
    for gid, group in groups.items():
        _check_group(gid, group, batch_size)
    return list(groups.values())


def _check_group(gid: int, group: _Group, batch_size: int) -> None:
    if group.size < 1:
        raise DataPlaneError(f"group {gid} has group_size={group.size}: expected at least 1.")
    if len(group.rows) > group.size:
        raise DataPlaneError(
            f"group {gid} has {len(group.rows)} ready rows but group_size={group.size}: a group cannot have "
            "more rows than its size; fix the group ids or group_size written by the producer."
        )
    # Checked on incomplete groups too: a group larger than the batch can never be served, so
    # waiting for its last rows would only postpone the same error.
    if group.size > batch_size:
        raise DataPlaneError(
            f"group {gid} has group_size={group.size}, larger than batch_size={batch_size}: groups are "
            "never split, so this group can never be handed out; make batch_size a multiple of the "
            f"group size (e.g. {group.size * max(1, batch_size // group.size)})."
        )


def _select_groups(candidates: Sequence[RowInfo], batch_size: int, allow_partial: bool) -> list[int] | None:
    """Rows of whole complete groups, oldest first; None when the batch should wait for more rows.

    Groups are taken in order of their first row and the scan stops at the first complete group
    that does not fit, so an older group is never overtaken by a newer, smaller one. Incomplete
    groups are skipped: their missing rows may still be in flight, and they must not hold back
    groups that are ready.
    """
    _check_batch_size(batch_size)
    groups = _groups_in_order(candidates, batch_size)
    rows: list[int] = []
    blocked = False  # a complete group did not fit: nothing more can join this batch
    for group in groups:
        if len(group.rows) < group.size:
            continue
        if len(rows) + group.size > batch_size:
            blocked = True
            break
        rows.extend(group.rows)
    if allow_partial or _batch_is_full(rows, batch_size, blocked, groups):
        return rows
    return None


def _batch_is_full(rows: list[int], batch_size: int, blocked: bool, groups: list[_Group]) -> bool:
    # Besides an exactly full batch, a batch is final when it cannot grow: a complete group was
    # refused (FIFO), or the room left is smaller than every group size seen. The latter lets a
    # batch_size that is not a multiple of the group size (e.g. 10 with groups of 4) hand out
    # 8 rows instead of waiting forever for a batch of exactly 10.
    # Group sizes never exceed batch_size (checked), so an empty batch is never full.
    room = batch_size - len(rows)
    return room == 0 or blocked or room < min((g.size for g in groups), default=0)


class GroupSampler:
    """Whole groups only, oldest first; never splits a group."""

    name = "group"

    def select(self, candidates: Sequence[RowInfo], batch_size: int, allow_partial: bool) -> Selection | None:
        rows = _select_groups(candidates, batch_size, allow_partial)
        return None if rows is None else Selection(rows, None)

    def __repr__(self) -> str:
        return "GroupSampler()"


class BalancedSampler:
    """Rows picked like `GroupSampler`, split into `dp_size` shards with near-equal token sums.

    Balancing works on individual rows, not groups: every sample of a group is in the same batch
    (what GRPO needs for its advantage), but the ranks may each hold part of a group.
    """

    name = "balanced"

    def __init__(self, dp_size: int, equal_size: bool = True) -> None:
        if dp_size < 1:
            raise DataPlaneError(
                f"dp_size={dp_size} is invalid: expected the number of data-parallel ranks (>= 1)."
            )
        self.dp_size = dp_size
        # Data-parallel ranks usually must step on the same number of sequences.
        self.equal_size = equal_size

    def select(self, candidates: Sequence[RowInfo], batch_size: int, allow_partial: bool) -> Selection | None:
        rows = _select_groups(candidates, batch_size, allow_partial)
        if rows is None:
            return None
        if not rows:
            return Selection([], None)
        self._check_divisible(len(rows), batch_size)
        length = {c.row: c.length for c in candidates}
        parts = karmarkar_karp([length[r] for r in rows], self.dp_size, self.equal_size)
        return Selection(rows, [sorted(rows[i] for i in part) for part in parts])

    def _check_divisible(self, n_rows: int, batch_size: int) -> None:
        if self.equal_size and n_rows % self.dp_size:
            raise DataPlaneError(
                f"balanced sampling selected {n_rows} rows (batch_size={batch_size}), which do not split "
                f"equally over dp_size={self.dp_size} ranks; make batch_size a multiple of both dp_size and "
                "the group size, or use BalancedSampler(dp_size, equal_size=False)."
            )

    def __repr__(self) -> str:
        return f"BalancedSampler(dp_size={self.dp_size}, equal_size={self.equal_size})"


# A partial k-way partition: k (sum, indices) pairs, largest sum first.
_State = list[tuple[int, list[int]]]


def karmarkar_karp(lengths: Sequence[int], k: int, equal_size: bool) -> list[list[int]]:
    """Split indices of `lengths` into `k` parts with near-equal sums (largest differencing method).

    Every item (or, with `equal_size`, every run of `k` consecutive sorted items) starts as a
    k-way partial partition. The two partial partitions with the largest spread (max sum minus
    min sum) are merged, pairing the largest sum of one with the smallest of the other, until one
    remains. Merging never widens the spread beyond the larger of the two, so for non-negative
    lengths the result's spread is at most max(lengths).

    Returns `k` index lists, each ascending; with `equal_size` every list has len(lengths) // k items.
    """
    if k < 1:
        raise DataPlaneError(f"k={k} is invalid: expected the number of parts (>= 1).")
    if equal_size and len(lengths) % k:
        raise DataPlaneError(
            f"cannot split {len(lengths)} items into k={k} parts of equal size; pass a multiple of k "
            "items or equal_size=False."
        )
    if not lengths:
        return [[] for _ in range(k)]
    heap = [
        _heap_entry(_seed(lengths, chunk, k), tick)
        for tick, chunk in enumerate(_seeds(lengths, k, equal_size))
    ]
    heapq.heapify(heap)
    tick = len(heap)
    while len(heap) > 1:
        first = heapq.heappop(heap)[3]
        second = heapq.heappop(heap)[3]
        heapq.heappush(heap, _heap_entry(_merge(first, second), tick))
        tick += 1
    return [sorted(indices) for _, indices in heap[0][3]]


def _seeds(lengths: Sequence[int], k: int, equal_size: bool) -> list[list[int]]:
    # Sorted seeding puts items of similar length in one chunk, so each equal-size seed state
    # starts with a small spread.
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    if equal_size:
        return [order[start : start + k] for start in range(0, len(order), k)]
    return [[i] for i in order]


def _seed(lengths: Sequence[int], chunk: list[int], k: int) -> _State:
    parts = [(lengths[i], [i]) for i in chunk] + [(0, []) for _ in range(k - len(chunk))]
    return _sorted_state(parts)


def _merge(first: _State, second: _State) -> _State:
    # Largest with smallest: the pairing that cancels the two spreads against each other.
    k = len(first)
    return _sorted_state(
        [(first[i][0] + second[k - 1 - i][0], first[i][1] + second[k - 1 - i][1]) for i in range(k)]
    )


def _sorted_state(parts: _State) -> _State:
    # Ties in sum are broken by item count so that, without equal_size, fuller parts pair with
    # emptier ones; stable sorting keeps the whole algorithm deterministic.
    return sorted(parts, key=lambda part: (part[0], len(part[1])), reverse=True)


def _heap_entry(state: _State, tick: int) -> tuple[int, int, int, _State]:
    # heapq pops the smallest: negate to pop the largest spread first, then the largest top sum
    # (as verl does); `tick` keeps the order total so states are never compared.
    return (-(state[0][0] - state[-1][0]), -state[0][0], tick, state)


_SAMPLERS = ("sequential", "group", "balanced")


def make_sampler(name: str, dp_size: int = 1) -> Sampler:
    """The sampler called `name`; `dp_size` is used by "balanced" only."""
    if name == "sequential":
        return SequentialSampler()
    if name == "group":
        return GroupSampler()
    if name == "balanced":
        return BalancedSampler(dp_size)
    raise DataPlaneError(
        f"unknown sampler {name!r}: expected one of {', '.join(_SAMPLERS)}; set the sampler name to one "
        "of these."
    )
