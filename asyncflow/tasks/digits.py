"""scikit-learn's 8 x 8 handwritten digits (1,797 images, shipped inside the package: no
download) and the degradations of the restoration benchmarks: noise, blur, masks.

An image is a row of 64 float32 pixels in [-1, 1] (the data set's 0..16 scaled), row-major.
`degrade(x, kind, rng)` returns y for x, drawing any randomness from `rng`:

    noise   y = x + 0.5 n                          (n ~ N(0, I))
    blur    y = B x + 0.1 n                        (B: a 3 x 3 binomial blur applied twice,
                                                    edges replicated)
    mask    y = m * x + 0.1 n, with a 4 x 4 square zeroed at a random place (m = 0 there)

Knows nothing about models or rewards; numpy only (scikit-learn only to read the data).
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

__all__ = ["DEGRADATIONS", "Degradation", "degrade", "digits", "split", "square_masks"]

Degradation = Literal["noise", "blur", "mask"]
DEGRADATIONS: tuple[str, ...] = get_args(Degradation)
SIDE = 8
TEST = 500  # held-out images; the other 1,297 train


def digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 images (1797, 64) float32 in [-1, 1] and their labels (1797,) int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "the digits data set ships with scikit-learn, which is not installed: pip install scikit-learn "
            "(in the `bench` and `dev` extras of an AsyncFlow checkout)"
        ) from None
    data = load_digits()
    return (data.data / 8.0 - 1.0).astype(np.float32), data.target.astype(np.int64)


def split() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images, labels), (test images, labels)): a fixed shuffle, the last 500 held out."""
    images, labels = digits()
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:-TEST], order[-TEST:]
    return (images[train], labels[train]), (images[test], labels[test])


def _blur(x: np.ndarray) -> np.ndarray:
    kernel = np.array([0.25, 0.5, 0.25], dtype=np.float32)
    img = x.reshape(-1, SIDE, SIDE)  # (B, 8, 8)
    for _ in range(2):
        for axis in (1, 2):
            padded = np.pad(img, [(0, 0)] + [(1, 1) if a == axis else (0, 0) for a in (1, 2)], mode="edge")
            shifted = [np.take(padded, np.arange(k, k + SIDE), axis=axis) for k in range(3)]
            img = sum(w * s for w, s in zip(kernel, shifted))
    return img.reshape(-1, SIDE * SIDE)


def square_masks(count: int, rng: np.random.Generator, size: int = 4) -> np.ndarray:
    """`count` masks (count, 64) float32: 1 on known pixels, 0 on a `size` x `size` square at a
    random place."""
    rows, cols = rng.integers(0, SIDE - size + 1, count), rng.integers(0, SIDE - size + 1, count)
    grid = np.arange(SIDE)
    inside_r = (grid[None, :] >= rows[:, None]) & (grid[None, :] < rows[:, None] + size)  # (B, 8)
    inside_c = (grid[None, :] >= cols[:, None]) & (grid[None, :] < cols[:, None] + size)
    hidden = inside_r[:, :, None] & inside_c[:, None, :]  # (B, 8, 8)
    return (~hidden).reshape(count, SIDE * SIDE).astype(np.float32)


def degrade(x: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """y for each row of x (B, 64) under degradation `kind` (see the module docstring): (B, 64) float32."""
    if x.ndim != 2 or x.shape[1] != SIDE * SIDE:
        raise ValueError(f"degrade: x must be (B, {SIDE * SIDE}) images, got {x.shape}")
    noise = rng.standard_normal(x.shape).astype(np.float32)
    if kind == "noise":
        return x + 0.5 * noise
    if kind == "blur":
        return (_blur(x) + 0.1 * noise).astype(np.float32)
    if kind == "mask":
        return square_masks(len(x), rng) * x + 0.1 * noise
    raise ValueError(f"unknown degradation {kind!r}; expected one of {DEGRADATIONS}")
