"""Sequence balancing: split rows of very different lengths into padded micro-batches that
waste little compute, and split a global batch over data-parallel ranks so that they finish
together.

A batch padded to its longest row spends most of its work on padding when lengths have a
long tail (a few responses many times longer than the median). Sorting by length and
cutting where `rows x longest row` would pass a token budget keeps each micro-batch dense;
gradients accumulate across them, so the update is the same as one padded pass.

Across ranks, equal token counts are not equal time: attention grows as L², so the rank
holding the longest rows finishes last and every other rank idles in the gradient
all-reduce. ByteScale's balance scheduler (Ge et al. 2025, arXiv 2502.21231) prices a sample
at w(L) = αL + βL² and assigns data by predicted time, not tokens. Ranks need not run the same
number of micro-batches, since only the final gradient all-reduce has to line up (true for DDP
with `no_sync`; FSDP/ZeRO-3 collect on every forward and need equal counts). Here α, β and a
per-micro-batch constant γ are fitted online from measured micro-batch times.

The gradient stays the global-batch gradient under any plan when each micro-batch's loss,
aggregated over the micro-batch, is weighted by its share of the global normaliser
(`tokens in micro-batch / tokens in global batch` for token-mean, `samples / samples` for the
sequence means), and the ranks' gradients are summed (times the world size under DDP, which
averages).

Knows nothing about models, losses or process groups: lengths and timings in, index lists out.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from collections.abc import Sequence
from itertools import combinations
from typing import Literal, get_args

import numpy as np

from dataplane.samplers import karmarkar_karp

__all__ = ["POLICIES", "CostModel", "Policy", "imbalance", "micro_batches", "plan", "predicted_times"]

Policy = Literal["count", "tokens", "cost"]
POLICIES: tuple[str, ...] = get_args(Policy)
_NAMES = ("alpha", "beta", "gamma")


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


class CostModel:
    """Predicted time of one micro-batch (forward + backward): α·x₁ + β·x₂ + γ, fitted online.

    Features of a micro-batch of b rows with lengths Ls:
      padded=True  (rows padded to T = max(Ls), as the trainer runs them): x₁ = b·T, x₂ = b·T²;
                   every padded position costs the linear layers, and attention is T×T per row.
      padded=False (packed / variable-length attention, no padding): x₁ = ΣL, x₂ = ΣL².
    γ is the per-micro-batch constant (launches, Python, hooks). One row of length L costs
    `sample_cost(L)` = αL + βL² beside that constant, ByteScale's w(L).

    Until a fit succeeds the coefficients are the prior (default α=1, β=γ=0: padded token
    count). `observe` records (lengths, seconds) in a window of the last `window` micro-batches
    and calls `refit` every `refit_every` observations. `refit` minimises the squared relative
    error Σ((predicted - measured) / measured)² with non-negative coefficients, exactly:
    unconstrained least squares on every subset of the three (max-scaled)
    features whose condition number is at most `max_condition` (features the window cannot tell
    apart, e.g. one micro-batch shape, are not fitted together), the best fit with no negative
    coefficient. It falls back to the prior with fewer than `min_observations` observations, when
    no subset qualifies, or when the fit leaves α = β = 0 (a constant cannot balance).

    Deterministic: the coefficients are a function of the window's contents and order alone,
    so ranks that feed the same observations in the same order (all-gather them first) plan
    identically. (On machines whose numpy builds differ, plan on one rank and broadcast.)
    """

    def __init__(
        self, *, alpha: float = 1.0, beta: float = 0.0, gamma: float = 0.0, padded: bool = True,
        refit_every: int = 16, window: int = 512, min_observations: int = 8, max_condition: float = 1e8,
    ) -> None:  # fmt: skip
        prior = (alpha, beta, gamma)
        if not all(math.isfinite(v) and v >= 0 for v in prior) or alpha + beta == 0:
            raise ValueError(
                f"CostModel: prior alpha={alpha}, beta={beta}, gamma={gamma} must be finite and >= 0 with "
                "alpha + beta > 0 (a constant cost cannot balance); the default alpha=1 counts tokens"
            )
        if refit_every < 1 or min_observations < 3 or window < min_observations:
            raise ValueError(
                f"CostModel: need refit_every >= 1, min_observations >= 3 (three coefficients) and window "
                f">= min_observations, got refit_every={refit_every}, min_observations={min_observations}, "
                f"window={window}; the defaults are 16, 8 and 512"
            )
        self.prior = prior
        self.alpha, self.beta, self.gamma = prior
        self.padded = padded
        self.refit_every = refit_every
        self.min_observations = min_observations
        self.max_condition = max_condition
        self._window: deque[tuple[tuple[float, float, float], float]] = deque(maxlen=window)
        self._since_refit = 0
        self._fitted = False

    def features(self, lengths: Sequence[int]) -> tuple[float, float, float]:
        """(x₁, x₂, 1) of one micro-batch; see the class docstring."""
        if self.padded:
            b, t = len(lengths), max(lengths)
            return float(b * t), float(b * t * t), 1.0
        return float(sum(lengths)), float(sum(n * n for n in lengths)), 1.0

    def predict(self, lengths: Sequence[int]) -> float:
        """Predicted seconds of one micro-batch of these rows (prior units until fitted); 0 if empty."""
        if not lengths:
            return 0.0
        return self._predict(len(lengths), max(lengths), sum(lengths), sum(n * n for n in lengths))

    def _predict(self, rows: int, longest: int, total: int, squares: int) -> float:
        """`predict` from a micro-batch's summary: row count, longest row, ΣL and ΣL²."""
        if self.padded:
            x1, x2 = rows * longest, rows * longest * longest
        else:
            x1, x2 = total, squares
        return self.alpha * x1 + self.beta * x2 + self.gamma

    def sample_cost(self, length: int) -> float:
        """w(L) = αL + βL²: one row's share of a micro-batch's time, the constant γ aside."""
        return self.alpha * length + self.beta * length * length

    def observe(self, lengths: Sequence[int], seconds: float) -> None:
        """Record one micro-batch's measured time; refits every `refit_every` observations."""
        if not lengths or min(lengths) < 0:
            raise ValueError(
                f"CostModel.observe: lengths must be a non-empty list of row lengths >= 0, got "
                f"{list(lengths)}; pass the lengths of the rows the micro-batch ran"
            )
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(
                f"CostModel.observe: seconds must be finite and > 0 (a measured time), got {seconds}"
            )
        self._window.append((self.features(lengths), float(seconds)))
        self._since_refit += 1
        if self._since_refit >= self.refit_every:
            self.refit()

    def refit(self) -> bool:
        """Least squares (relative errors) over the window, coefficients >= 0; True if fitted, False if
        the prior holds."""
        self._since_refit = 0
        coef = self._solve()
        self._fitted = coef is not None
        self.alpha, self.beta, self.gamma = coef if coef is not None else self.prior
        return self._fitted

    def _solve(self) -> tuple[float, float, float] | None:
        if len(self._window) < self.min_observations:
            return None
        x = np.array([f for f, _ in self._window], dtype=np.float64)  # (n, 3)
        y = np.array([s for _, s in self._window], dtype=np.float64)  # (n,)
        # Squared relative errors: timing noise on a shared machine scales with the work, and a
        # plain fit would let the largest micro-batches drown the per-micro-batch constant. Rows
        # are divided by the measured time (the target becomes all ones), columns by their
        # largest value, so that the condition number compares the features' shapes.
        xw = x / y[:, None]  # (n, 3)
        scale = np.abs(xw).max(axis=0)  # (3,)
        if (scale == 0).any():  # every row had length 0: nothing to learn from
            return None
        xs = xw / scale  # (n, 3), columns in [0, 1]
        ones = np.ones_like(y)
        best: tuple[float, np.ndarray] | None = None
        for k in (3, 2, 1):  # exact NNLS: the optimum is the least-squares fit on its own support
            for cols in map(list, combinations(range(3), k)):
                if np.linalg.cond(xs[:, cols]) > self.max_condition:
                    continue  # these features cannot be told apart on this window
                sol = np.linalg.lstsq(xs[:, cols], ones, rcond=None)[0]
                if (sol < 0).any():
                    continue
                full = np.zeros(3)
                full[cols] = sol
                residual = float(np.sum((xs @ full - ones) ** 2))
                if best is None or residual < best[0] * (1 - 1e-12):
                    best = (residual, full)
        if best is None:
            return None
        a, b, c = (float(v) for v in best[1] / scale)
        return None if a == 0 and b == 0 else (a, b, c)

    def metrics(self) -> dict[str, float]:
        """alpha, beta, gamma; observations in the window; fitted (1 or 0); r2 and rel_err (median
        |predicted - measured| / measured) of the current coefficients over the window."""
        out = dict(zip(_NAMES, (self.alpha, self.beta, self.gamma)))
        out["observations"] = float(len(self._window))
        out["fitted"] = float(self._fitted)
        if self._window:
            x = np.array([f for f, _ in self._window], dtype=np.float64)  # (n, 3)
            y = np.array([s for _, s in self._window], dtype=np.float64)  # (n,)
            pred = x @ np.array([self.alpha, self.beta, self.gamma])  # (n,)
            total = float(np.sum((y - y.mean()) ** 2))
            out["r2"] = 1 - float(np.sum((y - pred) ** 2)) / total if total > 0 else float("nan")
            positive = y > 0
            out["rel_err"] = (
                float(np.median(np.abs(pred - y)[positive] / y[positive])) if positive.any() else float("nan")
            )
        return out


def plan(
    lengths: Sequence[int], ranks: int, token_budget: int, policy: str, cost: CostModel | None = None
) -> list[list[list[int]]]:
    """Positions of `lengths` as rank -> micro-batches -> positions; each position exactly once.

    - "count":  naive; contiguous runs of equal row counts (the first len % ranks ranks get one
      more), then `micro_batches` within each rank.
    - "tokens": Karmarkar–Karp (k-way largest differencing, `dataplane.samplers.karmarkar_karp`)
      on token counts, row counts free, then `micro_batches` within each rank.
    - "cost":   ByteScale; the whole batch is packed by `micro_batches(lengths, cap)`, then the
      micro-batches go to ranks by LPT on `cost.predict` (largest first, to the least loaded
      rank), improved by moves and swaps between the most and least loaded ranks; ranks may run
      different numbers of micro-batches. cap is token_budget or a half, quarter or eighth of it,
      whichever gives the lowest predicted step (max rank time): smaller micro-batches balance
      more finely and pad less, but pay γ more often. With token_budget 0 each rank runs one
      micro-batch: rows, longest first, go to the rank whose predicted time after adding the row
      is least. `cost` None means the prior `CostModel()` (padded token count).

    Every rank gets at least one row when there are at least `ranks` rows; a rank with no rows
    gets [] (it must still join the gradient all-reduce). Deterministic: ties go to the lower
    position and the lower rank.
    """
    _check_plan(lengths, ranks, token_budget, policy)
    if policy == "cost":
        return _by_cost(lengths, ranks, token_budget, cost if cost is not None else CostModel())
    if policy == "count":
        q, r = divmod(len(lengths), ranks)
        starts = [k * q + min(k, r) for k in range(ranks + 1)]
        parts = [list(range(starts[k], starts[k + 1])) for k in range(ranks)]
    else:
        parts = karmarkar_karp(list(lengths), ranks, equal_size=False)
    return [
        [[part[j] for j in mb] for mb in micro_batches([lengths[i] for i in part], token_budget)]
        for part in parts
    ]


def _check_plan(lengths: Sequence[int], ranks: int, token_budget: int, policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"plan: unknown policy {policy!r}; expected one of {POLICIES}")
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"plan: ranks must be an int >= 1 (the data-parallel world size), got {ranks!r}")
    if token_budget < 0:
        raise ValueError(f"plan: token_budget must be >= 0 (0: one micro-batch per rank), got {token_budget}")
    bad = [(i, n) for i, n in enumerate(lengths) if not isinstance(n, int | np.integer) or n < 0]
    if bad:
        raise ValueError(
            f"plan: lengths must be ints >= 0 (tokens per row), got {bad[:3]} as (position, length); "
            "pass len(prompt) + len(response) per row"
        )


def _by_cost(lengths: Sequence[int], ranks: int, token_budget: int, cost: CostModel) -> list[list[list[int]]]:
    if token_budget == 0:
        rows: list[list[int]] = [[] for _ in range(ranks)]
        stats = [(0, 0, 0, 0)] * ranks  # per rank: rows, longest, ΣL, ΣL²
        for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):  # longest first
            n = lengths[i]
            after = [(b + 1, max(t, n), s + n, q + n * n) for b, t, s, q in stats]
            k = min(range(ranks), key=lambda k: (cost._predict(*after[k]), k))
            rows[k].append(i)
            stats[k] = after[k]
        return [[sorted(r)] if r else [] for r in rows]
    # Few large micro-batches per rank balance coarsely; smaller ones balance finely and pad less
    # but pay the per-micro-batch constant more often. The cost model prices both: plan with the
    # budget and with three halvings of it, keep the lowest predicted step (ties: the larger cap).
    caps = [token_budget >> j for j in range(4) if token_budget >> j > 0]
    candidates = [_lpt_packs(lengths, ranks, c, cost) for c in caps]
    return min(candidates, key=lambda c: max(predicted_times(lengths, c, cost)))


def _lpt_packs(
    lengths: Sequence[int], ranks: int, token_budget: int, cost: CostModel
) -> list[list[list[int]]]:
    packs = micro_batches(lengths, token_budget)
    while len(packs) < ranks and max(map(len, packs), default=1) > 1:  # every rank gets work if it can
        j = max(range(len(packs)), key=lambda j: (len(packs[j]), -j))
        half = len(packs[j]) // 2
        packs[j : j + 1] = [packs[j][:half], packs[j][half:]]
    times = [cost.predict([lengths[i] for i in mb]) for mb in packs]
    loads = [(0.0, k) for k in range(ranks)]  # (predicted seconds, rank): a heap
    owned: list[list[int]] = [[] for _ in range(ranks)]
    for j in sorted(range(len(packs)), key=lambda j: (-times[j], j)):  # largest first
        load, k = heapq.heappop(loads)
        owned[k].append(j)
        heapq.heappush(loads, (load + times[j], k))
    _exchange(times, owned)
    return [[packs[j] for j in sorted(js)] for js in owned]


def _exchange(times: Sequence[float], owned: list[list[int]]) -> None:
    """Improve an assignment of items (with `times`) to ranks in place: move one item from the
    most to the least loaded rank, or swap one pair, whichever brings the two nearest the middle,
    while that lowers the larger of the two. Each step lowers Σ load², so it ends; capped anyway."""
    for _ in range(4 * len(owned) + 16):
        loads = [sum(times[j] for j in js) for js in owned]
        a = max(range(len(owned)), key=lambda k: (loads[k], -k))
        b = min(range(len(owned)), key=lambda k: (loads[k], k))
        gap = loads[a] - loads[b]
        if gap <= 0:
            return
        theirs = sorted((times[q], q) for q in owned[b])  # candidates to swap back; none = a move
        best: tuple[float, int, int | None] | None = None  # (|moved - gap/2|, p, q)
        for p in sorted(owned[a]):
            want = times[p] - gap / 2  # the ideal time of the item coming back
            at = bisect.bisect_left(theirs, (want, -1))
            options: list[tuple[float, int | None]] = [(0.0, None)] + [
                theirs[i] for i in (at - 1, at) if 0 <= i < len(theirs)
            ]
            for back, q in options:
                moved = times[p] - back
                if 0 < moved < gap and (best is None or abs(moved - gap / 2) < best[0]):
                    best = (abs(moved - gap / 2), p, q)
        if best is None:
            return
        _, p, q = best
        owned[a].remove(p)
        owned[b].append(p)
        if q is not None:
            owned[b].remove(q)
            owned[a].append(q)


def predicted_times(
    lengths: Sequence[int], assignment: Sequence[Sequence[Sequence[int]]], cost: CostModel
) -> list[float]:
    """Each rank's predicted compute time under `assignment` (as `plan` returns it): the sum of
    `cost.predict` over its micro-batches."""
    return [sum(cost.predict([lengths[i] for i in mb]) for mb in rank) for rank in assignment]


def imbalance(times: Sequence[float]) -> dict[str, float]:
    """How unequal per-rank times t_r (r = 1..R) are.

    imbalance    = max_r t_r / mean_r t_r: 1 is perfect; R is one rank doing everything. The
                   step takes max t_r, so 1 - 1/imbalance of the aggregate capacity is idle.
    idle_fastest = (max_r t_r - min_r t_r) / max_r t_r: the share of the step that the fastest
                   rank waits in the gradient all-reduce.
    All zeros give {imbalance: 1, idle_fastest: 0}.
    """
    if not times or not all(math.isfinite(t) and t >= 0 for t in times):
        raise ValueError(f"imbalance: times must be a non-empty list of seconds >= 0, got {list(times)}")
    high, low = max(times), min(times)
    if high == 0:
        return {"imbalance": 1.0, "idle_fastest": 0.0}
    return {"imbalance": high / (sum(times) / len(times)), "idle_fastest": (high - low) / high}
