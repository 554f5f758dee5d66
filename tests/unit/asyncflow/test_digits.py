"""asyncflow.tasks.digits: scikit-learn's 8 x 8 digits and the restoration degradations."""

from __future__ import annotations

import numpy as np
import pytest

from asyncflow.tasks.digits import degrade, digits, split


def test_images_are_scaled_rows_and_the_split_is_fixed_and_disjoint():
    images, labels = digits()
    assert images.shape == (1797, 64) and images.dtype == np.float32 and labels.shape == (1797,)
    assert images.min() == -1.0 and images.max() == 1.0 and set(labels.tolist()) == set(range(10))
    (train, train_labels), (test, _) = split()
    assert train.shape == (1297, 64) and test.shape == (500, 64) and len(train_labels) == 1297
    again = split()[1][0]
    assert np.array_equal(test, again)
    assert len({r.tobytes() for r in np.concatenate([train, test])}) == len({r.tobytes() for r in images})


def test_degradations_do_what_they_say():
    x = split()[1][0][:200]
    noisy = degrade(x, "noise", np.random.default_rng(0))
    assert abs(float((noisy - x).std()) - 0.5) < 0.01
    # blur: a constant image stays constant (edges replicated, weights sum to 1); a point spreads
    flat = np.full((1, 64), 0.3, dtype=np.float32)
    blurred = degrade(flat, "blur", np.random.default_rng(1)) - 0.1 * np.random.default_rng(
        1
    ).standard_normal((1, 64))
    assert np.allclose(blurred, 0.3, atol=1e-6)
    point = np.zeros((1, 64), dtype=np.float32)
    point[0, 27] = 1.0
    spread = degrade(point, "blur", np.random.default_rng(2)) - 0.1 * np.random.default_rng(
        2
    ).standard_normal((1, 64))
    assert spread[0, 27] == pytest.approx(0.375**2) and spread.sum() == pytest.approx(1.0, abs=1e-5)
    # mask: exactly a 4 x 4 square of every image is zeroed (up to the noise)
    masked = degrade(np.ones((50, 64), dtype=np.float32), "mask", np.random.default_rng(3))
    assert ((masked < 0.5).sum(1) == 16).all()
    with pytest.raises(ValueError, match="unknown degradation 'jpeg'"):
        degrade(x, "jpeg", np.random.default_rng(0))
