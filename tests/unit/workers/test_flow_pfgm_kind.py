"""flow.source pfgm: the engine draws its sources from the PFGM++ kernel and the warm-start trains
from it; the digit-generation task's rewards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asyncflow.config import FlowConfig, PMRFConfig, WarmupConfig
from asyncflow.tasks.digits import split
from asyncflow.tasks.generation import DigitGeneration, DigitReward, hit, legible, reward
from services.flow import FlowRequest, FlowSamplingParams
from services.flow.pfgm import pfgm_noise
from workers.flow_kind import FlowKind

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _kind(source: str = "pfgm", aug_dim: float = 4.0) -> FlowKind:
    config = FlowConfig(hidden_size=32, num_layers=2, steps=3, source=source, pfgm_aug_dim=aug_dim)  # type: ignore[arg-type]
    return FlowKind(config, DigitGeneration(target=3))


async def test_the_engine_starts_from_the_pfgm_kernel():
    for source, aug_dim in (("pfgm", 4.0), ("pfgm", math.inf), ("gaussian", 4.0)):
        kind = _kind(source, aug_dim)
        engine = kind.engine(seed=5)
        await engine.update_weights(0, kind.model(0).state_dict())
        samples = await engine.generate([FlowRequest("a", (), 6, FlowSamplingParams(steps=3))])
        first = torch.stack([s.latents[0] for s in samples])
        gen = torch.Generator().manual_seed(5)
        expected = (
            pfgm_noise(6, 64, aug_dim, generator=gen)
            if source == "pfgm"
            else torch.randn(6, 64, generator=gen)
        )
        assert torch.equal(first, expected)
    # D = inf is the Gaussian, draw for draw
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(pfgm_noise(4, 64, math.inf, generator=gen_a), torch.randn(4, 64, generator=gen_b))


def test_warmup_trains_from_the_kernel_and_pfgm_is_the_plain_mlps_option():
    kind = _kind()
    model = kind.model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = kind.warmup(model, kind.task, WarmupConfig(steps=2, batch_size=8, lr=1e-3))
    assert out["steps"] == 2 and np.isfinite(out["loss"])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="flow.source pfgm is an option of the plain velocity MLP"):
        FlowConfig(source="pfgm", pmrf=PMRFConfig())


def test_generation_rewards_read_the_target_digit():
    (train, labels), _ = split()
    three, seven = train[labels == 3][0], train[labels == 7][0]
    assert hit((), three, "3") == 1.0 and hit((), seven, "3") == 0.0
    assert reward((), three, "3") > 0.9 > 0.1 > reward((), seven, "3")
    assert legible((), three, "3") == 1.0 and legible((), np.zeros(64, np.float32), "3") in (0.0, 1.0)
    parts = DigitReward(legibility_weight=0.5)((), seven, "3")
    assert parts["target"] == pytest.approx(reward((), seven, "3")) and 0.45 < parts["legible"] <= 0.5
    assert DigitGeneration(3).data(0, 5)[1].shape == (5, 0)
    with pytest.raises(ValueError, match="target=12"):
        DigitGeneration(12)
    with pytest.raises(ValueError, match="a digit as the answer"):
        hit((), three, "three")
