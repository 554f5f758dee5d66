"""What the digits tables of benchmarks/flow.py share: the data, a small classifier whose
features define an FID-like distance, and the distance itself.

FD ("Fréchet distance in feature space", FID's formula on a small classifier instead of
Inception): a 64 -> 128 -> 64 -> 10 SiLU MLP is trained on the 1,297 clean training digits
(seeded, 2,000 Adam steps, ~97 % test accuracy); a set of images is summarised by the mean
and covariance of its 64 penultimate features, and FD = |mu_a - mu_b|^2 + Tr(C_a + C_b -
2 (C_a C_b)^(1/2)). Every FD in the tables compares 500 generated or restored images with
the 500 clean held-out test digits; "acc" is the classifier's accuracy on the restorations
against the true labels (of the clean image each one restores).
"""

from __future__ import annotations

import numpy as np
import torch

from asyncflow.tasks.digit_classifier import train_classifier
from asyncflow.tasks.digits import split


def _stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # a 1e-6 ridge: dead SiLU features would make the covariance singular and sqrtm inexact
    return features.mean(0), np.cov(features, rowvar=False) + 1e-6 * np.eye(features.shape[1])


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """FD between two feature sets (n, d), (m, d)."""
    from scipy.linalg import sqrtm

    (mu_a, cov_a), (mu_b, cov_b) = _stats(a.astype(np.float64)), _stats(b.astype(np.float64))
    root = sqrtm(cov_a @ cov_b)
    root = root.real if np.iscomplexobj(root) else root
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


class Judge:
    """Scores image sets against the clean test digits: FD, classifier accuracy."""

    def __init__(self, seed: int = 0):
        self.classifier = train_classifier(seed)
        _, (self.test, self.labels) = split()
        self.reference = self.features(self.test)
        self.accuracy = self.score_labels(self.test)

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        return self.classifier.features(torch.from_numpy(np.asarray(images, dtype=np.float32))).numpy()

    def fd(self, images: np.ndarray) -> float:
        return frechet(self.features(images), self.reference)

    @torch.no_grad()
    def score_labels(self, images: np.ndarray) -> float:
        logits = self.classifier(torch.from_numpy(np.asarray(images, dtype=np.float32)))
        return float((logits.argmax(-1).numpy() == self.labels).mean())

    def floor(self) -> float:
        """FD of 500 clean training digits against the test digits: what no method can beat."""
        (train, _), _ = split()
        return self.fd(train[np.random.default_rng(0).permutation(len(train))[:500]])
