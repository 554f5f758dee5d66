"""The learned critic of PPO (trainer.critic), beside the trainer's section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asyncflow.config._base import Section


class CriticConfig(Section):
    """PPO's learned critic (trainer.estimator: gae): a value model of the policy's architecture (its
    transformer body and a linear value head on the last hidden state), trained by the trainer beside
    the policy with its own optimizer, checkpointed with it, never published to rollout."""

    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount γ per token (1: none, as in RLHF PPO).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ: 1 gives Monte-Carlo returns minus values, "
                       "0 one-step TD errors.")  # fmt: skip
    value_clip: float | None = Field(
        0.2, gt=0, le=1e6, description="PPO value clipping: the new value may move this far from the one "
        "the advantages used unless that brings it closer to the return (null: off).",
    )  # fmt: skip
    vf_coef: float = Field(0.5, gt=0, le=1e3, description="Weight of the value loss in the critic's loss.")
    lr: float | None = Field(
        None, gt=0, le=1.0, description="The critic's AdamW learning rate (null: trainer.lr)."
    )
    whiten: bool = Field(
        True,
        description="Whiten the advantages over the batch's tokens (mean 0, std 1) before the policy loss.",
    )
    init: Literal["policy", "random"] = Field(
        "policy", description="The value model's body at start: a copy of the warm-started policy's, or a "
        "fresh random one (the value head starts at zero either way).",
    )  # fmt: skip


def check_critic(estimator: str, critic: CriticConfig | None, num_ranks: int) -> None:
    """ValueError naming the fix unless trainer.estimator, trainer.critic and num_ranks fit together."""
    if estimator == "gae" and critic is None:
        raise ValueError(
            "trainer.estimator = 'gae' computes advantages from a learned critic, but trainer.critic is "
            "not set; add `critic: {}` (defaults) or pick a group estimator such as grpo"
        )
    if critic is not None and estimator != "gae":
        raise ValueError(
            f"trainer.critic is set but trainer.estimator = {estimator!r} does not use a critic; "
            "set trainer.estimator: gae, or remove trainer.critic"
        )
    if critic is not None and num_ranks > 1:
        raise ValueError(
            f"trainer.critic trains on one trainer rank; trainer.num_ranks = {num_ranks} is not "
            "supported with it yet; set trainer.num_ranks: 1, or use a group estimator (grpo) with ranks"
        )
