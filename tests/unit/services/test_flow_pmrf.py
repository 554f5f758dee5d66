"""services.flow.pmrf: stage 1 and 2 against direct computations, and PMRF as a Flow-GRPO policy."""

from __future__ import annotations

import math

import pytest
import torch

from services.flow import FlowEngine, FlowRequest, FlowSamplingParams, VelocityMLP, sde_step, step_logprobs
from services.flow.pmrf import MeanMLP, PMRFPolicy, fit_mean, pmrf_source, restore, stage2_loss
from services.flow.sampling import uniform_grid

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _pair(dim: int = 3, cond: int = 4, seed: int = 0) -> tuple[MeanMLP, VelocityMLP]:
    torch.manual_seed(seed)
    return MeanMLP(cond, dim, hidden_size=32, num_layers=2), VelocityMLP(dim, hidden_size=32, num_layers=2)


def test_stage2_source_and_interpolation_are_the_papers():
    """Z_0 = f(y) + sigma_s eps; in the paper's time s = 1 - t, Z_s = s x + (1 - s) Z_0 and the target
    is x - Z_0, i.e. our velocity (t runs the other way) is Z_0 - x."""
    mean, flow = _pair()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 3, generator=gen), torch.randn(50, 4, generator=gen)
    source = pmrf_source(mean, y, 0.1, torch.Generator().manual_seed(2))
    eps = torch.randn(50, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(source, mean(y) + 0.1 * eps, atol=1e-7)
        loss = stage2_loss(flow, mean, x, y, 0.1, torch.Generator().manual_seed(2))
        replay = torch.Generator().manual_seed(2)
        z0 = mean(y) + 0.1 * torch.randn(50, 3, generator=replay)
        t = torch.rand(50, generator=replay)
        s = 1 - t
        zs = s[:, None] * x + (1 - s[:, None]) * z0
        direct = (flow(zs, t) + (x - z0)).square().sum(-1).mean()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-6)
    assert torch.equal(pmrf_source(mean, y, 0.0), mean(y).detach())  # sigma_s = 0: the posterior mean
    with pytest.raises(ValueError, match="sigma_s=-1"):
        pmrf_source(mean, y, -1.0)


def test_stage1_learns_the_posterior_mean():
    """x ~ N(0, I), y = x + 0.5 n: E[x | y] = y / 1.25 and the MMSE is 0.25 / 1.25 = 0.2 per dimension."""

    def pairs(step: int, size: int):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(size, 2, generator=g)
        return x, x + 0.5 * torch.randn(size, 2, generator=g)

    torch.manual_seed(0)
    mean = MeanMLP(2, 2, hidden_size=32, num_layers=2)
    tail = fit_mean(mean, pairs, steps=800, batch_size=256, lr=3e-3)
    assert tail == pytest.approx(0.2, abs=0.02)
    y = torch.linspace(-1.5, 1.5, 7)[:, None].repeat(1, 2)  # where most of y lies
    with torch.no_grad():
        assert torch.allclose(mean(y), y / 1.25, atol=0.1)


def test_restore_integrates_from_the_noised_posterior_mean():
    mean, flow = _pair()
    y = torch.randn(20, 4, generator=torch.Generator().manual_seed(3))
    out = restore(mean, flow, y, uniform_grid(2), 0.1, torch.Generator().manual_seed(4))
    with torch.no_grad():
        x = mean(y) + 0.1 * torch.randn(20, 3, generator=torch.Generator().manual_seed(4))
        x = x - 0.5 * flow(x, torch.full((20,), 1.0))
        x = x - 0.5 * flow(x, torch.full((20,), 0.5))
    assert torch.allclose(out, x, atol=1e-6)


def test_policy_step_is_the_pmrf_sde_gaussian_in_data_space():
    """The Flow-GRPO step of PMRFPolicy over z = (x - f(y)) / sigma_s, mapped to x, is the Gaussian
    whose drift uses PMRF's own score, -((1 - t) v + x - f(y)) / (t sigma_s^2), with noise sigma_s sigma_t:
    mean_x = x - dt [v + sigma_t^2 / (2t) ((1 - t) v + x - f)], std_x = sigma_s sigma_t sqrt(dt),
    and its log-prob in x is the one in z minus N log sigma_s."""
    mean, flow = _pair()
    sigma_s, a, t, t_next = 0.1, 0.7, 0.6, 0.45
    policy = PMRFPolicy(mean, flow, sigma_s)
    gen = torch.Generator().manual_seed(5)
    y, z = torch.randn(200, 4, generator=gen), torch.randn(200, 3, generator=gen)
    z_next, _, std_z, logp_z = sde_step(policy, z, t, t_next, y, a, t_root=0.9, generator=gen)
    with torch.no_grad():
        f, x, x_next = mean(y), policy.to_data(z, y), policy.to_data(z_next, y)
        v = flow(x, torch.full((200,), t))
    sigma_t, dt = a * math.sqrt(t / (1 - t)), t - t_next
    mean_x = x - dt * (v + sigma_t**2 / (2 * t) * ((1 - t) * v + x - f))
    std_x = sigma_s * sigma_t * math.sqrt(dt)
    assert std_z * sigma_s == pytest.approx(std_x)
    direct = torch.distributions.Normal(mean_x, std_x).log_prob(x_next).sum(-1)
    assert torch.allclose(logp_z.detach() - 3 * math.log(sigma_s), direct, atol=1e-3)
    with pytest.raises(ValueError, match="sigma_s > 0"):
        PMRFPolicy(mean, flow, 0.0)


async def test_engine_serves_pmrf_and_the_trainer_recomputes_its_logprobs():
    mean, flow = _pair()
    policy = PMRFPolicy(mean, flow, 0.1)
    engine = FlowEngine(policy, seed=0)  # type: ignore[arg-type]
    y = (0.5, -1.0, 0.0, 2.0)
    (sample,) = await engine.generate([FlowRequest("a", y, 1, FlowSamplingParams(steps=4))])
    cond = torch.tensor([y])
    recomputed = step_logprobs(policy, sample.latents[None], sample.timesteps, cond, 0.7)  # type: ignore[arg-type]
    assert torch.equal(recomputed[0].detach(), torch.tensor(sample.logprobs))
    restored = policy.to_data(sample.sample[None], cond)
    assert restored.shape == (1, 3)
    # gradients reach both heads: RL can fine-tune the mean and the refiner
    recomputed.sum().backward()
    assert all(p.grad is not None for p in policy.parameters())
