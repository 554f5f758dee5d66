"""services.flow: the velocity model, samplers, BOSS, pre-training losses and the engine."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest
import torch

from services.flow import (
    FlowEngine,
    FlowRequest,
    FlowSamplingParams,
    VelocityMLP,
    euler,
    mean_flow_sample,
    sde_sample,
    sde_step,
    step_logprobs,
    uniform_grid,
)
from services.flow.boss import bellman_grid, jump_costs
from services.flow.losses import fit, make_loss, ot_match
from services.serving import Engine

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(seed: int = 0, cond: int = 0, **kw) -> VelocityMLP:
    torch.manual_seed(seed)
    return VelocityMLP(2, cond, hidden_size=32, num_layers=2, **kw)


class GaussianVelocity(torch.nn.Module):
    """The exact velocity from N(0, I) at t = 1 to data N(mu, s^2 I) at t = 0 (x_t = (1-t) x0 + t eps):
    v = E[eps - x0 | x_t] = (t - (1-t) s^2) (x - (1-t) mu) / ((1-t)^2 s^2 + t^2) - mu."""

    dim, condition_dim = 2, 0

    def __init__(self, mu: float, s: float):
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, x, t, cond=None):
        t = t[:, None]
        var = (1 - t) ** 2 * self.s**2 + t**2
        return (t - (1 - t) * self.s**2) * (x - (1 - t) * self.mu) / var - self.mu


def test_a_row_gives_the_same_bits_in_any_batch():
    model = _model(cond=3)
    gen = torch.Generator().manual_seed(0)
    x, t, c = (
        torch.randn(300, 2, generator=gen),
        torch.rand(300, generator=gen),
        torch.randn(300, 3, generator=gen),
    )
    with torch.no_grad():
        full = model(x, t, c)
        for size in (1, 2, 3, 7, 63, 65, 129):
            rows = torch.randperm(300, generator=gen)[:size]
            assert torch.equal(model(x[rows], t[rows], c[rows]), full[rows]), size


def test_bad_shapes_are_named():
    model = _model(cond=2)
    with pytest.raises(ValueError, match=r"cond must be \(B, 2\)"):
        model(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="x must be"):
        model(torch.zeros(4, 3), torch.zeros(4), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="mean-flow"):
        model(torch.zeros(4, 2), torch.zeros(4), torch.zeros(4, 2), r=torch.zeros(4))
    with pytest.raises(ValueError, match="strictly decreasing"):
        euler(model, torch.zeros(4, 2), torch.tensor([1.0, 0.5, 0.6, 0.0]), torch.zeros(4, 2))


def test_sde_step_is_the_gaussian_it_says():
    model, gen = _model(), torch.Generator().manual_seed(1)
    x, cond = torch.randn(500, 2, generator=gen), torch.zeros(500, 0)
    x_next, mean, std, logp = sde_step(model, x, 0.6, 0.5, cond, 0.7, t_root=0.9, generator=gen)
    sigma = 0.7 * math.sqrt(0.6 / 0.4)
    assert std == pytest.approx(sigma * math.sqrt(0.1))
    with torch.no_grad():
        v = model(x, torch.full((500,), 0.6))
    assert torch.allclose(mean, x - 0.1 * (v + sigma**2 / 1.2 * (x + 0.4 * v)), atol=1e-6)
    expected = torch.distributions.Normal(mean, std).log_prob(x_next).sum(-1)
    assert torch.allclose(logp, expected, atol=1e-5)
    z = (x_next - mean) / std  # the noise really has that std
    assert abs(z.std().item() - 1) < 0.1 and abs(z.mean().item()) < 0.1
    # Flow-GRPO's per-dimension mean instead of the sum; at t = 1 sigma uses t_root.
    _, _, _, mean_lp = sde_step(model, x, 0.6, 0.5, cond, 0.7, t_root=0.9, x_next=x_next, reduce="mean")
    assert torch.allclose(mean_lp, expected / 2, atol=1e-5)
    _, _, std_root, _ = sde_step(model, x, 1.0, 0.9, cond, 0.7, t_root=0.9, generator=gen)
    assert std_root == pytest.approx(0.7 * math.sqrt(0.9 / 0.1) * math.sqrt(0.1))
    # noise level 0: the Euler ODE step, deterministic
    ode, _, zero, lp0 = sde_step(model, x, 0.6, 0.5, cond, 0.0, t_root=0.9)
    assert zero == 0.0 and torch.equal(lp0, torch.zeros(500))
    assert torch.allclose(ode, x - 0.1 * v, atol=1e-6)


@pytest.mark.parametrize("noise_level", [0.0, 0.7])
def test_sde_and_ode_reach_the_data_distribution(noise_level):
    """With the exact velocity, the SDE's drift correction keeps the ODE's marginals: a sign error
    in it would inflate or shrink the spread."""
    model, gen = GaussianVelocity(mu=2.0, s=0.5), torch.Generator().manual_seed(2)
    noise = torch.randn(4000, 2, generator=gen)
    latents, _ = sde_sample(model, noise, uniform_grid(100), None, noise_level, generator=gen)  # type: ignore[arg-type]
    x = latents[-1]
    assert x.mean(0).sub(2.0).abs().max() < 0.04
    assert x.std(0).sub(0.5).abs().max() < 0.04


def test_recomputed_logprobs_equal_the_sampled_ones_bit_for_bit():
    model, gen = _model(cond=1), torch.Generator().manual_seed(3)
    cond = torch.randn(50, 1, generator=gen)
    grid = torch.tensor([1.0, 0.8, 0.45, 0.2, 0.0])  # uneven steps are fine
    latents, behaviour = sde_sample(model, torch.randn(50, 2, generator=gen), grid, cond, 0.7, generator=gen)
    rows = torch.randperm(50, generator=gen)[:13]  # another batch, in another order
    recomputed = step_logprobs(model, latents.transpose(0, 1)[rows], grid, cond[rows], 0.7)
    assert recomputed.shape == (13, 4) and recomputed.requires_grad
    assert torch.equal(recomputed.detach(), behaviour.T[rows])
    assert torch.equal(torch.exp(recomputed.detach() - behaviour.T[rows]), torch.ones(13, 4))


def test_bellman_grid_is_the_cheapest_path():
    gen = torch.Generator().manual_seed(4)
    n, steps = 8, 3
    costs = torch.rand(n + 1, n + 1, generator=gen, dtype=torch.float64).triu(1)
    costs[costs == 0] = float("inf")
    grid = bellman_grid(costs, steps)
    fine = uniform_grid(n)
    path = [int(torch.nonzero(fine == t)[0]) for t in grid]

    def total(p):
        return sum(float(costs[i, j]) for i, j in zip(p, p[1:]))

    best = min(total([0, *mid, n]) for mid in itertools.combinations(range(1, n), steps - 1))
    assert path[0] == 0 and path[-1] == n and len(path) == steps + 1
    assert total(path) == pytest.approx(best)
    with pytest.raises(ValueError, match="steps"):
        bellman_grid(costs, n + 1)


def test_boss_grid_beats_uniform_on_its_own_cost():
    model = _model(5)
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(5))
    costs = jump_costs(model, x, 40)
    assert costs.shape == (41, 41) and torch.isinf(costs[3, 2]) and costs[0, 40] >= 0
    grid = bellman_grid(costs, 4)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and len(grid) == 5
    idx = [round(float(1 - t) * 40) for t in grid]
    uniform = [0, 10, 20, 30, 40]
    assert sum(costs[i, j] for i, j in zip(idx, idx[1:])) <= sum(
        costs[i, j] for i, j in zip(uniform, uniform[1:])
    )


def test_ot_match_is_the_optimal_assignment():
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randn(6, 2, generator=gen), torch.randn(6, 2, generator=gen)
    matched = ot_match(a, b)
    best = min(itertools.permutations(range(6)), key=lambda p: float((a - b[list(p)]).square().sum()))
    assert torch.equal(matched, b[list(best)])


def test_wcfm_with_a_wide_kernel_is_icfm():
    model = _model(7)
    x, y = torch.randn(64, 2), torch.randn(64, 2)
    icfm = make_loss("icfm")(model, x, y, None, torch.Generator().manual_seed(0))
    wide = make_loss("wcfm", wcfm_eps=1e9)(model, x, y, None, torch.Generator().manual_seed(0))
    assert wide.item() == pytest.approx(icfm.item(), rel=1e-5)
    narrow = make_loss("wcfm", wcfm_eps=0.5)(model, x, y, None, torch.Generator().manual_seed(0))
    assert narrow.item() != pytest.approx(icfm.item(), rel=1e-3)
    with pytest.raises(ValueError, match="unknown pre-training loss"):
        make_loss("fm")


def test_splitmeanflow_samples_in_one_step_what_icfm_cannot():
    """Data N((2, -1), 0.3^2 I): one Euler step of I-CFM lands every sample on the data's mean,
    one or two jumps of the learned average velocity keep the spread."""
    mu, s = torch.tensor([2.0, -1.0]), 0.3

    def data(step: int, size: int):
        g = torch.Generator().manual_seed(step)
        return mu + s * torch.randn(size, 2, generator=g), None

    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(8))
    mean_flow = _model(8, mean_flow=True)
    fit(mean_flow, make_loss("splitmeanflow"), data, steps=600, batch_size=128, lr=3e-3)
    icfm = _model(8)
    fit(icfm, make_loss("icfm"), data, steps=600, batch_size=128, lr=3e-3)
    for steps in (1, 2):
        x = mean_flow_sample(mean_flow, noise, uniform_grid(steps))
        assert x.mean(0).sub(mu).abs().max() < 0.3
        assert 0.15 < x.std(0).min() and x.std(0).max() < 0.45, (steps, x.std(0))
    assert euler(icfm, noise, uniform_grid(1)).std(0).max() < 0.1  # collapsed onto the mean


# ---------------------------------------------------------------------------------------- engine


def test_engine_has_the_protocol_shape():
    engine = FlowEngine(_model())
    assert isinstance(engine, Engine)


async def test_engine_returns_trajectories_in_request_order():
    model = _model(cond=2)
    engine = FlowEngine(model, version=3, seed=0)
    params = FlowSamplingParams(steps=4)
    requests = [FlowRequest("a", (1.0, 0.0), 3, params), FlowRequest("b", (0.0, 1.0), 2, params)]
    out = await engine.generate(requests)
    assert [(s.request_id, s.index) for s in out] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]
    s = out[3]
    assert s.latents.shape == (5, 2) and s.timesteps.tolist() == pytest.approx([1, 0.75, 0.5, 0.25, 0])
    assert len(s.logprobs) == 4 and s.versions == [3] * 4 and s.finish_reason == "stop"
    assert s.condition == [0.0, 1.0] and torch.equal(s.sample, s.latents[-1])
    recomputed = step_logprobs(model, s.latents[None], s.timesteps, torch.tensor([s.condition]), 0.7)
    assert torch.equal(recomputed[0].detach(), torch.tensor(s.logprobs))
    with pytest.raises(ValueError, match="condition has 1 values"):
        await engine.generate([FlowRequest("c", (1.0,), 1, params)])


async def test_engine_takes_weights_pauses_and_closes():
    engine = FlowEngine(_model(0), version=0, seed=0)
    other = _model(1)
    await engine.update_weights(5, other.state_dict())
    assert engine.version == 5
    with pytest.raises(ValueError, match="unknown names"):
        await engine.update_weights(6, {"nope": torch.zeros(1)})
    await engine.pause()
    call = asyncio.ensure_future(engine.generate([FlowRequest("a", (), 2, FlowSamplingParams(steps=3))]))
    await asyncio.sleep(0.05)
    assert not call.done()  # held at a step boundary
    await engine.resume()
    samples = await call
    assert all(s.versions == [5, 5, 5] for s in samples)
    await engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        await engine.generate([FlowRequest("a")])


async def test_an_update_mid_call_shows_in_the_step_versions():
    engine = FlowEngine(_model(0), version=0, seed=0)
    await engine.pause()
    call = asyncio.ensure_future(engine.generate([FlowRequest("a", (), 1, FlowSamplingParams(steps=3))]))
    await asyncio.sleep(0.01)
    await engine.update_weights(1, _model(1).state_dict())
    await engine.resume()
    (sample,) = await call
    assert sample.versions == [1, 1, 1]  # paused before the first step: all steps by version 1


async def test_boss_grid_is_computed_once_and_kept():
    engine = FlowEngine(_model(0), seed=0, boss_fine_steps=20, boss_samples=64)
    params = FlowSamplingParams(steps=3, grid="boss")
    first = (await engine.generate([FlowRequest("a", (), 1, params)]))[0].timesteps
    await engine.update_weights(1, _model(9).state_dict())
    second = (await engine.generate([FlowRequest("a", (), 1, params)]))[0].timesteps
    assert torch.equal(first, second) and len(first) == 4 and first[0] == 1 and first[-1] == 0
