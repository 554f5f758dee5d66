"""BOSS stage 2 (services.flow.boss.redress*): the pairs and the loss against a direct computation,
and fine-tuning that makes the K-step Euler sample follow the teacher's fine trajectory."""

from __future__ import annotations

import copy

import pytest
import torch

from services.flow import VelocityMLP, euler, uniform_grid
from services.flow.boss import bellman_grid, jump_costs, redress, redress_loss, redress_pairs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(seed: int = 0) -> VelocityMLP:
    torch.manual_seed(seed)
    return VelocityMLP(2, hidden_size=16, num_layers=2)


def test_pairs_and_loss_are_the_teachers_secants():
    teacher, student = _model(0), _model(1)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(2))
    grid = torch.tensor([1.0, 0.75, 0.25, 0.0])  # points of the 8-step grid
    states, targets = redress_pairs(teacher, x, grid, fine_steps=8)
    with torch.no_grad():  # the fine trajectory, by hand
        path, z = {1.0: x}, x
        for i in range(8):
            t = 1.0 - i / 8
            z = z - (1 / 8) * teacher(z, torch.full((5,), t))
            path[round(1.0 - (i + 1) / 8, 6)] = z
        direct = 0.0
        for k, (t, t_next) in enumerate([(1.0, 0.75), (0.75, 0.25), (0.25, 0.0)]):
            secant = (path[t_next] - path[t]) / (t_next - t)
            assert torch.allclose(states[k], path[t], atol=1e-6)
            assert torch.allclose(targets[k], secant, atol=1e-5)
            direct += (student(path[t], torch.full((5,), t)) - secant).square().sum(-1).mean() / 3
        loss = redress_loss(student, states, targets, grid)
    assert loss.item() == pytest.approx(float(direct), rel=1e-5)
    with pytest.raises(ValueError, match="not on the 8-step uniform grid"):
        redress_pairs(teacher, x, torch.tensor([1.0, 0.3, 0.0]), fine_steps=8)


def test_redress_brings_the_k_step_sample_to_the_fine_trajectory():
    teacher = _model(0)
    with torch.no_grad():  # a curved field, so a 2-step Euler sample misses the fine one
        for p in teacher.parameters():
            p.mul_(3.0)
    noise = torch.randn(512, 2, generator=torch.Generator().manual_seed(3))
    grid = bellman_grid(jump_costs(teacher, noise, 20), 2)
    fine = euler(teacher, noise, uniform_grid(20))
    student = copy.deepcopy(teacher)
    before = (euler(student, noise, grid) - fine).square().sum(-1).mean().item()
    tail = redress(student, teacher, noise, grid, fine_steps=20, steps=300, batch_size=128, lr=3e-3)
    after = (euler(student, noise, grid) - fine).square().sum(-1).mean().item()
    assert after < 0.2 * before and tail < before
