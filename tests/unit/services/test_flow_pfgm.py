"""services.flow.pfgm: the PFGM++ kernel against its laws, and a flow trained with it as source."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from services.flow import VelocityMLP, euler, uniform_grid
from services.flow.losses import fit, make_loss
from services.flow.pfgm import pfgm_noise, pfgm_radius, pfgm_source

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize(("dim", "aug_dim", "sigma"), [(2, 1, 1.0), (2, 8, 0.5), (64, 4, 2.0), (64, 64, 1.0)])
def test_radius_follows_the_beta_law(dim, aug_dim, sigma):
    """R^2 / (R^2 + r^2) = B must be Beta(N/2, D/2) (KS test), and R itself has the closed-form
    mean r * B(N/2 + 1/2, D/2 - 1/2) / B(N/2, D/2) (for D > 1)."""
    noise = pfgm_noise(20000, dim, aug_dim, sigma=sigma, generator=torch.Generator().manual_seed(0)).double()
    radius, r = noise.norm(dim=1).numpy(), pfgm_radius(sigma, aug_dim)
    assert r == pytest.approx(sigma * math.sqrt(aug_dim))
    b = radius**2 / (radius**2 + r**2)
    assert stats.kstest(b, stats.beta(dim / 2, aug_dim / 2).cdf).pvalue > 1e-3
    assert stats.kstest(b, stats.beta(dim / 2 + 1, aug_dim / 2).cdf).pvalue < 1e-6  # the test has power
    if aug_dim > 1:
        a, c = dim / 2, aug_dim / 2
        mean = r * math.exp(math.lgamma(a + 0.5) + math.lgamma(c - 0.5) - math.lgamma(a) - math.lgamma(c))
        assert radius.mean() == pytest.approx(mean, rel=0.03)


def test_direction_is_uniform_on_the_sphere():
    noise = pfgm_noise(20000, 3, 8, generator=torch.Generator().manual_seed(1))
    u = noise / noise.norm(dim=1, keepdim=True)
    assert u.mean(0).abs().max() < 0.02  # E u = 0
    assert torch.allclose(u.T @ u / len(u), torch.eye(3) / 3, atol=0.01)  # E u u^T = I / N
    # each coordinate of a uniform direction on S^2 is uniform on [-1, 1] (Archimedes)
    assert stats.kstest(u[:, 0].numpy(), stats.uniform(-1, 2).cdf).pvalue > 1e-3


def test_large_d_is_the_gaussian_kernel():
    """D -> inf: R u -> sigma N(0, I). At D = 1e6 every coordinate passes a KS test against
    N(0, sigma^2) and the radius against sigma * chi_N; small D has visibly heavier tails."""
    sigma, dim = 0.7, 4
    big = (
        pfgm_noise(20000, dim, 1e6, sigma=sigma, generator=torch.Generator().manual_seed(2)).double().numpy()
    )
    for k in range(dim):
        assert stats.kstest(big[:, k], stats.norm(0, sigma).cdf).pvalue > 1e-3
    assert stats.kstest(np.linalg.norm(big, axis=1), stats.chi(dim, scale=sigma).cdf).pvalue > 1e-3
    inf = pfgm_noise(5, dim, math.inf, sigma=sigma, generator=torch.Generator().manual_seed(3))
    assert torch.equal(inf, sigma * torch.randn(5, dim, generator=torch.Generator().manual_seed(3)))
    small = pfgm_noise(20000, dim, 3, sigma=sigma, generator=torch.Generator().manual_seed(2)).numpy()
    assert stats.kstest(small[:, 0], stats.norm(0, sigma).cdf).pvalue < 1e-6
    # the kernel is a multivariate t with D degrees of freedom and scale sigma
    assert stats.kstest(small[:, 0], stats.t(3, scale=sigma).cdf).pvalue > 1e-3


def test_same_generator_same_draws_and_bad_arguments_are_named():
    a = pfgm_noise(10, 2, 8, generator=torch.Generator().manual_seed(4))
    b = pfgm_noise(10, 2, 8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and a.dtype == torch.float32
    source = pfgm_source(2, 8, seed=1)
    assert torch.equal(source(3, 16), source(3, 16)) and not torch.equal(source(3, 16), source(4, 16))
    with pytest.raises(ValueError, match="augmented dimension D > 0"):
        pfgm_noise(4, 2, 0)
    with pytest.raises(ValueError, match="N >= 1"):
        pfgm_noise(4, 0, 8)


def test_a_flow_from_the_pfgm_kernel_reaches_the_data():
    """Data N((2, -1), 0.3^2 I). I-CFM with the D = 4 kernel as its source, sampled by Euler from
    fresh kernel draws, lands on the data's mean and spread (heavy-tailed source included)."""
    mu, s = torch.tensor([2.0, -1.0]), 0.3

    def data(step: int, size: int):
        return mu + s * torch.randn(size, 2, generator=torch.Generator().manual_seed(step)), None

    torch.manual_seed(0)
    model = VelocityMLP(2, hidden_size=64, num_layers=2)
    fit(model, make_loss("icfm"), data, steps=1500, batch_size=256, lr=3e-3, source=pfgm_source(2, 4))
    x = euler(model, pfgm_noise(4000, 2, 4, generator=torch.Generator().manual_seed(9)), uniform_grid(50))
    assert x.median(0).values.sub(mu).abs().max() < 0.1
    iqr = x.quantile(0.75, dim=0) - x.quantile(0.25, dim=0)  # robust spread: 1.349 s for a Gaussian
    assert iqr.sub(1.349 * s).abs().max() < 0.12, iqr
