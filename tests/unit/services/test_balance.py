"""Data-parallel balance: plans partition the batch, cost balance beats token balance beats equal
counts on long-tailed lengths, the cost model fits, plans are deterministic, and any plan keeps
the global-batch gradient for every loss aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import services.parallelism.balance as balance
from asyncflow.algorithms.losses import AGGREGATIONS, aggregate
from services.parallelism.balance import POLICIES, CostModel, imbalance, plan, predicted_times

# A quadratic "true" cost in arbitrary units: attention (L²/256) equals the linear part at L = 256.
TRUE = {"alpha": 1.0, "beta": 1 / 256, "gamma": 200.0}


def long_tailed(seed: int, n: int = 128, kind: str = "lognormal") -> list[int]:
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(np.log(128), 1.0, n) if kind == "lognormal" else 32 * (1 + rng.pareto(1.5, n))
    return np.clip(raw, 16, 1024).astype(int).tolist()


def test_public_api():
    assert sorted(balance.__all__) == sorted(
        ["POLICIES", "CostModel", "Policy", "imbalance", "micro_batches", "plan", "predicted_times"]
    )
    assert POLICIES == ("count", "tokens", "cost")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("budget", [0, 64, 512])
def test_every_plan_is_a_partition_within_the_budget(policy: str, budget: int):
    for n in (0, 1, 3, 4, 7, 40):
        lengths = long_tailed(n, n)
        lengths = [max(1, x // 8) for x in lengths]  # 2..128: some rows longer than a 64 budget
        for ranks in range(1, 6):
            out = plan(lengths, ranks, budget, policy, CostModel(**TRUE))
            assert len(out) == ranks
            flat = [i for rank in out for mb in rank for i in mb]
            assert sorted(flat) == list(range(n)), (policy, n, ranks)
            for mb in (mb for rank in out for mb in rank):
                assert mb, "no empty micro-batch"
                assert budget == 0 or len(mb) == 1 or len(mb) * max(lengths[i] for i in mb) <= budget
            if budget == 0:
                assert all(len(rank) <= 1 for rank in out)  # one micro-batch per rank
            empty = sum(1 for rank in out if not rank)
            assert empty == max(0, ranks - n)  # work for every rank while there are rows


def test_count_splits_contiguous_equal_counts():
    out = plan([5, 1, 9, 3, 7, 2, 8], 3, 0, "count")
    assert [sorted(i for mb in rank for i in mb) for rank in out] == [[0, 1, 2], [3, 4], [5, 6]]


def test_ranks_may_run_different_numbers_of_micro_batches():
    lengths = [1000] + [50] * 80  # one long row costs as much as all the short ones
    out = plan(lengths, 2, 2000, "cost", CostModel(**TRUE))
    assert sorted(len(rank) for rank in out) == [1, 2]  # the long row alone, two packs of 40 short


def test_cost_splits_micro_batches_so_that_every_rank_has_work():
    out = plan([5] * 6, 4, 1000, "cost")  # one micro-batch would hold every row
    assert all(out) and sorted(i for rank in out for mb in rank for i in mb) == list(range(6))


@pytest.mark.parametrize("kind", ["lognormal", "pareto"])
@pytest.mark.parametrize("budget", [0, 4096])
def test_cost_balance_beats_token_balance_beats_equal_counts(kind: str, budget: int):
    """Predicted under the quadratic true cost, 4 ranks, 128 rows, 10 samples: cost balance is
    never worse than token balance (imbalance and step), and token balance beats equal counts on
    the median (a random contiguous split is sometimes lucky)."""
    true = CostModel(**TRUE)
    figures: dict[str, list[tuple[float, float]]] = {p: [] for p in POLICIES}
    for seed in range(10):
        lengths = long_tailed(seed, kind=kind)
        for policy in POLICIES:
            times = predicted_times(lengths, plan(lengths, 4, budget, policy, true), true)
            figures[policy].append((imbalance(times)["imbalance"], max(times)))
    for (cost_i, cost_step), (tok_i, tok_step) in zip(figures["cost"], figures["tokens"]):
        assert cost_i <= tok_i + 1e-12 and cost_step <= tok_step + 1e-9
    median = {p: float(np.median([i for i, _ in v])) for p, v in figures.items()}
    assert median["cost"] <= median["tokens"] < median["count"]
    assert median["cost"] < 1.05


def test_cost_model_recovers_alpha_beta_gamma_from_noisy_times():
    """Seconds = 2e-5·bT + 3e-8·bT² + 1e-3 with 5 % multiplicative noise on 300 micro-batches
    (T log-uniform in 16..1024, b in 1..16): α within 3 %, β within 5 %, γ within 10 % (the
    worst of 20 seeds was 1.2 %, 3.2 % and 5.3 %)."""
    rng = np.random.default_rng(0)
    truth = CostModel(alpha=2e-5, beta=3e-8, gamma=1e-3)
    model = CostModel(refit_every=50)
    assert model.predict([10, 30]) == 60  # the prior: padded tokens
    for _ in range(300):
        longest, rows = int(np.exp(rng.uniform(np.log(16), np.log(1024)))), int(rng.integers(1, 17))
        lengths = [longest, *rng.integers(1, longest + 1, size=rows - 1).tolist()]
        model.observe(lengths, truth.predict(lengths) * (1 + 0.05 * rng.standard_normal()))
    m = model.metrics()
    assert m["fitted"] == 1 and m["observations"] == 300
    assert m["alpha"] == pytest.approx(2e-5, rel=0.03)
    assert m["beta"] == pytest.approx(3e-8, rel=0.05)
    assert m["gamma"] == pytest.approx(1e-3, rel=0.1)
    assert m["r2"] > 0.95 and m["rel_err"] < 0.06
    assert model.sample_cost(100) == pytest.approx(m["alpha"] * 100 + m["beta"] * 100**2)


def test_cost_model_keeps_the_prior_until_it_can_fit():
    model = CostModel(refit_every=4, min_observations=8, window=16)
    for t in range(1, 8):
        model.observe([t * 10] * 2, 0.1 * t)
    assert model.metrics()["fitted"] == 0 and (model.alpha, model.beta, model.gamma) == (1.0, 0.0, 0.0)
    # Times that only a constant explains cannot balance anything: keep the prior.
    for t in range(1, 17):
        model.observe([t * 10] * t, 0.5)
    assert model.metrics()["observations"] == 16  # the window is bounded
    assert model.refit() is False and model.alpha == 1.0
    # One shape only: β and γ cannot be told apart from α; the fit stays non-negative and exact there.
    single = CostModel(refit_every=8)
    for _ in range(8):
        single.observe([64] * 4, 0.02)
    assert single.metrics()["fitted"] == 1 and min(single.alpha, single.beta, single.gamma) >= 0
    assert single.predict([64] * 4) == pytest.approx(0.02)


def test_plans_and_fits_are_deterministic():
    rng = np.random.default_rng(3)
    models = [CostModel(refit_every=8), CostModel(refit_every=8)]
    for _ in range(40):
        lengths = rng.integers(16, 1025, size=int(rng.integers(1, 9))).tolist()
        seconds = float(rng.uniform(0.01, 0.2))
        for m in models:
            m.observe(lengths, seconds)
    assert models[0].metrics() == models[1].metrics()
    lengths = long_tailed(7) + [100] * 16  # ties in length and in cost
    for policy in POLICIES:
        for budget in (0, 2048):
            assert plan(lengths, 4, budget, policy, models[0]) == plan(lengths, 4, budget, policy, models[1])


def test_imbalance_definition():
    assert imbalance([1.0, 1.0, 2.0]) == {"imbalance": pytest.approx(1.5), "idle_fastest": pytest.approx(0.5)}
    assert imbalance([3.0, 3.0]) == {"imbalance": 1.0, "idle_fastest": 0.0}
    assert imbalance([0.0, 0.0]) == {"imbalance": 1.0, "idle_fastest": 0.0}
    with pytest.raises(ValueError, match="times"):
        imbalance([])
    with pytest.raises(ValueError, match="-1"):
        imbalance([1.0, -1.0])


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="'flops'.*expected one of"):
        plan([1, 2], 2, 0, "flops")
    with pytest.raises(ValueError, match="ranks.*got 0"):
        plan([1, 2], 0, 0, "count")
    with pytest.raises(ValueError, match="token_budget.*got -1"):
        plan([1, 2], 2, -1, "tokens")
    with pytest.raises(ValueError, match=r"\(1, -3\)"):
        plan([1, -3], 2, 0, "cost")
    with pytest.raises(ValueError, match="alpha"):
        CostModel(alpha=0.0, beta=0.0)
    with pytest.raises(ValueError, match="seconds"):
        CostModel().observe([3], float("nan"))


# --- the gradient is the global-batch gradient under any plan -----------------------------------


class TinyCausalLM(torch.nn.Module):
    """Embedding, a causal running mean, a linear head: each position sees only its prefix, so
    right padding changes nothing before it (as in a causal transformer)."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Parameter(torch.randn(vocab, dim, generator=g, dtype=torch.float64))
        self.head = torch.nn.Parameter(torch.randn(dim, vocab, generator=g, dtype=torch.float64))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T) log-probs of ids
        h = self.embed[ids]  # (B, T, D)
        steps = torch.arange(1, ids.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
        prefix = torch.tanh(torch.cumsum(h, dim=1) / steps)  # (B, T, D)
        logp = torch.log_softmax(prefix @ self.head, dim=-1)  # (B, T, V)
        return logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T - 1)


def padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])  # (B, T)
    mask = torch.tensor([[1] * (len(r) - 1) + [0] * (width - len(r)) for r in rows])  # (B, T - 1)
    return ids, mask


def loss_of(model: TinyCausalLM, rows: list[list[int]], adv: torch.Tensor, agg: str) -> torch.Tensor:
    ids, mask = padded(rows)
    values = -adv[:, None] * model(ids)  # (B, T - 1): a policy-gradient surrogate per token
    return aggregate(values, mask, agg, max_tokens=40)  # type: ignore[arg-type]


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_any_plan_keeps_the_global_batch_gradient(agg: str, one_thread: None):
    """Each micro-batch's loss (aggregated over the micro-batch) times its share of the global
    normaliser (tokens for token-mean, samples for the sequence means: the trainer's rule),
    summed over micro-batches and ranks (the all-reduce), is the global-batch gradient."""
    g = torch.Generator().manual_seed(1)
    lengths = [2, 3, 40, 5, 17, 2, 33, 8, 9, 26, 4, 12, 3]
    rows = [torch.randint(0, 11, (n,), generator=g).tolist() for n in lengths]
    adv = torch.randn(len(rows), generator=g, dtype=torch.float64)
    model = TinyCausalLM()
    whole = torch.autograd.grad(loss_of(model, rows, adv, agg), list(model.parameters()))
    unit = [n - 1 for n in lengths] if agg == "token-mean" else [1] * len(lengths)  # actions, or samples
    total = sum(unit)
    cost = CostModel(**TRUE)
    for policy in POLICIES:
        for ranks in range(1, 5):
            for budget in (0, 48, 120):
                grads = [torch.zeros_like(p) for p in model.parameters()]
                for rank in plan(lengths, ranks, budget, policy, cost):
                    for mb in rank:
                        share = sum(unit[i] for i in mb) / total
                        loss = loss_of(model, [rows[i] for i in mb], adv[mb], agg) * share
                        for acc, part in zip(grads, torch.autograd.grad(loss, list(model.parameters()))):
                            acc += part
                for got, want in zip(grads, whole):
                    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
