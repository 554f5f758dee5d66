"""% of optimal: the measured bound is positive and measuring it leaves the global RNG alone (a
seeded engine that samples from the global RNG, as vLLM does, draws the same samples with it)."""

from __future__ import annotations

import pytest
import torch

from services.serving.optimal import matmul_flops, percent_of_optimal

pytestmark = pytest.mark.usefixtures("one_thread")


def test_measuring_the_bound_leaves_the_global_random_state_as_it_was():
    matmul_flops.cache_clear()
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    assert matmul_flops("cpu", torch.float32, 64) > 0
    assert torch.equal(torch.rand(4), expected)


def test_percent_of_optimal():
    assert percent_of_optimal(50.0, 2.0, 100.0) == pytest.approx(25.0)
    assert percent_of_optimal(50.0, 0.0, 100.0) == 0.0
