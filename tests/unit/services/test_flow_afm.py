"""services.flow.afm and the point robot: AFM's path, loss and refiner against direct computations,
hindsight relabelling, the planner, the drift the planner does not know."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asyncflow.tasks.robot import PointRobotEnv, PointRobotTask, nominal_inverse, nominal_step
from services.flow.afm import CEMPlanner, afm_loss, condition, interpolate, refine, relabel
from services.flow.losses import adam
from services.flow.model import VelocityMLP

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(seed: int = 0) -> VelocityMLP:
    torch.manual_seed(seed)
    return VelocityMLP(2, 6, hidden_size=32, num_layers=2)


def test_interpolation_runs_from_the_planned_to_the_intended_action():
    gen = torch.Generator().manual_seed(0)
    a0, a_star, t = (
        torch.randn(7, 2, generator=gen),
        torch.randn(7, 2, generator=gen),
        torch.rand(7, generator=gen),
    )
    x = interpolate(a0, a_star, t)
    for i in range(7):
        for d in range(2):
            direct = (1 - t[i].item()) * a_star[i, d].item() + t[i].item() * a0[i, d].item()
            assert x[i, d].item() == pytest.approx(direct, abs=1e-6)
    ends = interpolate(a0, a_star, torch.cat([torch.ones(3), torch.zeros(4)]))
    assert torch.equal(ends[:3], a0[:3]) and torch.equal(ends[3:], a_star[3:])


def test_loss_is_the_regression_onto_a0_minus_a_star_at_x_t():
    model, gen = _model(), torch.Generator().manual_seed(1)
    a0, a_star = torch.randn(9, 2, generator=gen), torch.randn(9, 2, generator=gen)
    cond, t = torch.randn(9, 6, generator=gen), torch.rand(9, generator=gen)
    total = 0.0
    with torch.no_grad():
        for i in range(9):  # row by row, the path written out
            x_t = (1 - t[i]) * a_star[i] + t[i] * a0[i]
            v = model(x_t[None], t[i : i + 1], cond[i : i + 1])[0]
            total += sum((v[d].item() - (a0[i, d].item() - a_star[i, d].item())) ** 2 for d in range(2))
        assert afm_loss(model, a0, a_star, cond, t=t).item() == pytest.approx(total / 9, rel=1e-5)
    # with t drawn from the generator: the same as drawing t first and passing it
    drawn = torch.rand(9, generator=torch.Generator().manual_seed(5))
    assert afm_loss(model, a0, a_star, cond, torch.Generator().manual_seed(5)).item() == pytest.approx(
        afm_loss(model, a0, a_star, cond, t=drawn).item()
    )
    with pytest.raises(ValueError, match=r"a0 and a_star must both be \(B, A\)"):
        afm_loss(model, a0, a_star[:3], cond)


def test_refine_integrates_the_velocity_from_a0_and_keeps_inactive_rows():
    model = _model()
    last = model.net[-1]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():  # a constant velocity c: from t = 1 to 0 the action moves by -c
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.25, -0.5]))
    a0, cond = torch.randn(4, 2), torch.randn(4, 6)
    out = refine(model, a0, cond, steps=3, active=torch.tensor([True, False, True, False]))
    assert torch.allclose(out[[0, 2]], a0[[0, 2]] - torch.tensor([0.25, -0.5]), atol=1e-6)
    assert torch.equal(out[[1, 3]], a0[[1, 3]])
    with pytest.raises(ValueError, match="steps=0"):
        refine(model, a0, cond, steps=0)


def test_relabel_pairs_reach_the_observed_state_under_each_model():
    env = PointRobotEnv()
    rng = np.random.default_rng(0)
    position, executed = rng.uniform(-2, 2, (20, 2)), rng.uniform(-1, 1, (20, 2))
    after = env.true_step(position, executed)
    a0, a_star = relabel(position, after, executed, env.dt)
    assert np.allclose(nominal_step(position, a0, env.dt), after)  # the planner's model says a0 gets there
    assert np.allclose(env.true_step(position, a_star), after)  # the robot's dynamics: a* does
    assert not np.allclose(a0, a_star, atol=0.1)  # the drift makes them differ
    aligned = PointRobotEnv(gain=1.0, angle=0.0, wind=0.0)
    a0, _ = relabel(position, aligned.true_step(position, executed), executed, env.dt)
    assert np.allclose(a0, executed)  # no misalignment: nothing to correct


def test_true_dynamics_are_the_documented_formula_and_episodes_replay():
    env = PointRobotEnv(gain=0.5, angle=0.3, wind=0.2)
    p, a = np.array([0.4, -1.1]), np.array([0.9, 1.7])  # the second component is clipped to 1
    c, s = math.cos(0.3), math.sin(0.3)
    turned = 0.5 * np.array([c * 0.9 - s * 1.0, s * 0.9 + c * 1.0])
    wind = 0.2 * np.array([math.sin(math.pi * -1.1 / 2), math.cos(math.pi * 0.4 / 2)])
    assert np.allclose(env.true_step(p, a), p + env.dt * (turned + wind))
    first, _ = env.reset(seed=3)
    steps = [env.step(np.array([0.3, -0.2]))[0] for _ in range(5)]
    again, _ = env.reset(seed=3)
    assert np.array_equal(first, again)
    assert all(np.array_equal(x, env.step(np.array([0.3, -0.2]))[0]) for x in steps)
    with pytest.raises(ValueError, match="gain=0"):
        PointRobotEnv(gain=0)


def test_env_passes_gymnasiums_checker():
    from gymnasium.utils.env_checker import check_env

    check_env(PointRobotEnv(), skip_render_check=True)


def _episodes(correct: bool, count: int = 8) -> float:
    """Success rate of the CEM planner, optionally with the exact inverse of the drift."""
    envs = [PointRobotEnv() for _ in range(count)]
    for i, env in enumerate(envs):
        env.reset(seed=i)
    planner, done, won = CEMPlanner(envs[0].dt, seed=0), np.zeros(count, bool), 0
    while not done.all():
        position = np.stack([e.position for e in envs])
        a0 = planner.plan(position, np.stack([e.goal for e in envs]))
        if correct:  # gain R a + wind = a0, solved for a
            a0 = (a0 - envs[0].drift(position)) @ envs[0]._turn / envs[0].gain
        for i in np.flatnonzero(~done):
            _, _, terminated, truncated, _ = envs[i].step(a0[i])
            done[i], won = terminated or truncated, won + terminated
    return won / count


def test_the_planner_fails_under_the_drift_and_succeeds_once_actions_are_corrected():
    assert _episodes(correct=False) <= 0.25
    assert _episodes(correct=True) == 1.0


def test_a_flow_trained_on_hindsight_pairs_moves_actions_toward_the_intended_ones():
    task, model = PointRobotTask(seed=0), _model()

    def step_loss(step: int) -> torch.Tensor:
        a_star, cond = (torch.as_tensor(v) for v in task.data(step, 128))
        return afm_loss(model, cond[:, 2:4], a_star, cond)

    adam(model, step_loss, steps=300, lr=3e-3)
    a_star, cond = (torch.as_tensor(v) for v in task.data(10_000, 256))
    a0 = cond[:, 2:4]
    refined = refine(model, a0, condition(cond[:, :2], a0, cond[:, 4:]), steps=2)
    before, after = (a0 - a_star).norm(dim=1).mean(), (refined - a_star).norm(dim=1).mean()
    assert after < 0.3 * before, (before, after)
    with pytest.raises(ValueError, match="elites"):
        CEMPlanner(0.1, elites=100, population=10)
    assert nominal_inverse(np.zeros(2), np.ones(2), 0.5).tolist() == [2.0, 2.0]
