"""services.flow.encoder: the zero-initialised encoder leaves the backbone's output exact, the
encoder policy's Flow-GRPO log-prob is the Gaussian density, the inpainting loss weighs the
pixels as documented, and bad shapes are refused."""

from __future__ import annotations

import math

import pytest
import torch

from services.flow import VelocityMLP, sde_sample, step_logprobs, uniform_grid
from services.flow.encoder import EncoderFlow, inpainting_loss, training_only

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(seed: int = 0, inject_layers: int = 2) -> EncoderFlow:
    torch.manual_seed(seed)
    return EncoderFlow(VelocityMLP(6, 0, hidden_size=16, num_layers=2), 12, hidden_size=8,
                       inject_layers=inject_layers)  # fmt: skip


def _inputs(batch: int = 70, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(batch, 6, generator=g), torch.rand(batch, generator=g)
    mask = (torch.rand(batch, 6, generator=g) > 0.3).float()
    return x, t, torch.cat([mask * torch.randn(batch, 6, generator=g), mask], dim=1)


def _stir(model: EncoderFlow) -> None:
    """Non-zero injections, as after training."""
    with torch.no_grad():
        for p in model.encoder.inject.parameters():
            p.normal_(0, 0.5)


def test_a_zero_initialised_encoder_gives_the_backbones_exact_output():
    model = _model()
    x, t, cond = _inputs()
    assert all(torch.count_nonzero(p) == 0 for p in model.encoder.inject.parameters())
    assert torch.equal(model(x, t, cond), model.backbone(x, t))
    _stir(model)
    assert not torch.allclose(model(x, t, cond), model.backbone(x, t))  # the features do reach it
    # one injected layer of two: still exact at zero, still the same shape
    assert torch.equal(_model(inject_layers=1)(x, t, cond), _model(inject_layers=1).backbone(x, t))


def test_a_row_does_not_depend_on_its_batch():
    model = _model()
    _stir(model)
    x, t, cond = _inputs(batch=130)
    assert torch.equal(model(x, t, cond)[100:110], model(x[100:110], t[100:110], cond[100:110]))


def test_the_flow_grpo_log_prob_of_the_encoder_policy_is_the_gaussian_density():
    model, a = _model(), 0.7
    _stir(model)
    x, _, cond = _inputs(batch=5)
    grid = uniform_grid(4)
    latents, logps = sde_sample(model, x, grid, cond, a, generator=torch.Generator().manual_seed(3))
    recomputed = step_logprobs(model, latents.transpose(0, 1), grid, cond, a)  # (B, K)
    assert torch.equal(recomputed.detach(), logps.T)
    times = [float(v) for v in grid]
    with torch.no_grad():
        for k, (t, t_next) in enumerate(zip(times, times[1:])):
            tt = times[1] if t >= 1.0 else t
            sigma, dt = a * math.sqrt(tt / (1 - tt)), t - t_next
            v = model(latents[k], torch.full((5,), t), cond)
            mean = latents[k] - dt * (v + sigma**2 / (2 * t) * (latents[k] + (1 - t) * v))
            direct = torch.distributions.Normal(mean, sigma * math.sqrt(dt)).log_prob(latents[k + 1]).sum(-1)
            assert torch.allclose(logps[k], direct, atol=1e-4, rtol=1e-5)


def test_the_inpainting_loss_weighs_hidden_pixels_one_and_known_ones_as_asked():
    model = _model()
    _stir(model)
    x, _, cond = _inputs(batch=8)
    source = torch.randn(8, 6, generator=torch.Generator().manual_seed(5))
    t = torch.rand(8, generator=torch.Generator().manual_seed(9))
    err = (model((1 - t[:, None]) * x + t[:, None] * source, t, cond) - (source - x)).square()
    known = cond[:, 6:]
    for w in (0.0, 0.25, 1.0):
        expected = (((1 - known) + w * known) * err).sum(-1).mean()
        got = inpainting_loss(model, x, source, cond, torch.Generator().manual_seed(9), known_weight=w)
        assert torch.allclose(got, expected)


def test_bad_shapes_and_settings_are_refused():
    with pytest.raises(ValueError, match="inject_layers=3"):
        _model(inject_layers=3)
    with pytest.raises(ValueError, match="unconditional"):
        EncoderFlow(VelocityMLP(6, 2), 12)
    model = _model()
    x, t, cond = _inputs(batch=4)
    with pytest.raises(ValueError, match=r"cond must be the context \(B, 12\)"):
        model(x, t, cond[:, :6])
    with pytest.raises(ValueError, match="known_weight"):
        inpainting_loss(model, x, x, cond, known_weight=-1.0)


def test_training_only_trains_one_part_and_gives_the_flags_back():
    model = _model()
    model.backbone.net[0].weight.requires_grad_(False)
    with training_only(model, model.encoder):
        assert all(p.requires_grad for p in model.encoder.parameters())
        assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not model.backbone.net[0].weight.requires_grad and model.backbone.net[0].bias.requires_grad
