"""The pure algorithm functions of the RL loop: log-probs, advantages, losses, padded grids.

Torch only: nothing here knows about Ray, the rollout engine, the data store or versions.
The trainer composes them; `asyncflow.versioning` owns the staleness rule.
"""

from __future__ import annotations

from asyncflow.algorithms.advantages import ESTIMATORS, Estimator, gae, group_advantages, whiten
from asyncflow.algorithms.logprobs import chunked_token_logprobs, entropy, token_logprobs, truncate
from asyncflow.algorithms.losses import (
    AGGREGATIONS,
    CORRECTIONS,
    KL_KINDS,
    OBJECTIVES,
    Aggregation,
    Correction,
    KLKind,
    Objective,
    aggregate,
    importance_ratios,
    kl_penalty,
    policy_loss,
)
from asyncflow.algorithms.sequences import on_grid, pack
from asyncflow.algorithms.values import explained_variance, value_loss

__all__ = [
    "AGGREGATIONS",
    "CORRECTIONS",
    "ESTIMATORS",
    "KL_KINDS",
    "OBJECTIVES",
    "Aggregation",
    "Correction",
    "Estimator",
    "KLKind",
    "Objective",
    "aggregate",
    "chunked_token_logprobs",
    "entropy",
    "explained_variance",
    "gae",
    "group_advantages",
    "importance_ratios",
    "kl_penalty",
    "on_grid",
    "pack",
    "policy_loss",
    "token_logprobs",
    "truncate",
    "value_loss",
    "whiten",
]
