"""A small classifier of scikit-learn's 8 x 8 digits (asyncflow.tasks.digits): the judge of the
digits benchmarks (its features define their FID-like distance) and of the inpainting reward.

A 64 -> 128 -> 64 -> 10 SiLU MLP trained on the 1,297 clean training digits with light pixel
noise (seeded, 2,000 Adam steps of 128 images, ~97 % test accuracy, a few seconds on one
core). `features` is its 64-wide penultimate layer, `head` the logits.

Knows nothing about flows, engines or the data store.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from asyncflow.tasks.digits import split

__all__ = ["Classifier", "train_classifier"]


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64), nn.SiLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: (B, 64) -> (B, 10)."""
        return self.head(self.features(x))


def train_classifier(seed: int = 0, steps: int = 2000) -> Classifier:
    """A classifier trained from `seed` (its initial weights and batches), in eval mode. Its own
    random state: the caller's torch generator is left as it was."""
    (train, labels), _ = split()
    x, y = torch.from_numpy(train), torch.from_numpy(labels)
    with torch.random.fork_rng(), torch.enable_grad():  # it may be first asked for under no_grad
        torch.manual_seed(seed)
        model = Classifier()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        rng = np.random.default_rng([seed, 7])
        for _ in range(steps):
            rows = torch.from_numpy(rng.integers(0, len(x), 128))
            # light pixel noise keeps the features meaningful on imperfect images
            inputs = x[rows] + 0.05 * torch.randn(len(rows), 64)
            loss = nn.functional.cross_entropy(model(inputs), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()
