"""PPO's learned critic, trained by the trainer beside the policy (trainer.estimator: gae).

The critic is a separate value model of the policy's architecture: the transformer body (a copy
of the warm-started policy's, or a fresh one) and a linear head from the last hidden state to one
value per position. A separate model rather than a head on the policy's body, so that the value
loss never moves the weights rollout samples from: publication carries the policy alone, and the
policy's trainable subset, LoRA adapters and partial publications stay as they are.

Per batch, before any update: the values of every response token under the current critic, the
per-token rewards (the sample's reward on its last token, minus kl_coef times the KL to the
reference on every token when the run has one), GAE advantages and λ-returns
(`asyncflow.algorithms.gae`), whitened if asked. Per micro-batch: the clipped value loss toward
those returns, its gradient accumulated beside the policy's; per optimizer step, the critic's own
AdamW step. The critic's weights and optimizer state are saved and loaded with the trainer's.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_model, save_model
from torch import Tensor
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from asyncflow.algorithms import explained_variance, gae, on_grid, pack, value_loss, whiten
from asyncflow.config import TrainerConfig
from workers.policy import body_and_head
from workers.trainable import plain_model


class ValueModel(torch.nn.Module):
    """A causal transformer body and a linear value head: ids (b, L) -> values (b, L-1), the value
    at position t being that of the state whose next token is ids[:, t + 1] (the log-probs' grid)."""

    def __init__(self, body: torch.nn.Module, hidden_size: int):
        super().__init__()
        self.body = body
        dtype = next(body.parameters()).dtype
        self.head = torch.nn.Linear(hidden_size, 1, dtype=dtype)
        torch.nn.init.zeros_(self.head.weight)  # V = 0 at start: the first advantages are the returns
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, ids: Tensor) -> Tensor:
        hidden = self.body(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]  # (b, L-1, H)
        return self.head(hidden).squeeze(-1).float()  # (b, L-1)


def value_model(policy: torch.nn.Module, init: str, fresh: torch.nn.Module | None = None) -> ValueModel:
    """The critic for `policy`: its body copied ("policy"; LoRA adapters merged, every weight
    trainable), or the body of `fresh`, a newly initialised model of the same architecture ("random")."""
    source: Any = plain_model(policy) if init == "policy" else fresh
    if source is None:
        raise ValueError(
            "critic init 'random' needs a freshly initialised model of the policy's architecture"
        )
    body, _ = body_and_head(source)
    body = copy.deepcopy(body) if init == "policy" else body
    for p in body.parameters():
        p.requires_grad_(True)
    return ValueModel(body, int(source.config.hidden_size)).train()


class Critic:
    def __init__(self, model: ValueModel, config: TrainerConfig):
        assert config.critic is not None
        self.model, self.config, self.trainer_config = model, config.critic, config
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.critic.lr or config.lr, weight_decay=config.weight_decay
        )

    def values(self, rows: Sequence[Any]) -> tuple[Tensor, Tensor]:
        """Values of the rows' response tokens with gradient (b, T), and which are real (b, T)."""
        ids, _, mask = pack([r.prompt for r in rows], [r.response for r in rows])
        return self.model(ids), mask

    @torch.no_grad()
    def targets(self, rows: Sequence[Any], micros: list[list[int]], kl_coef: float) -> tuple[Tensor, dict]:
        """Per row, its response tokens' (advantage, return, value before the update), left-aligned:
        (B, 3, T) with T the longest response; and the batch's figures."""
        c = self.config
        old: list[list[float]] = [[] for _ in rows]
        for micro in micros:  # the current critic's values, micro-batch by micro-batch
            v, m = self.values([rows[i] for i in micro])
            for j, i in enumerate(micro):
                old[i] = v[j][m[j]].tolist()
        _, _, mask = pack([r.prompt for r in rows], [r.response for r in rows])  # (B, L-1)
        values = on_grid(old, mask)
        rewards = on_grid(
            [[0.0] * (len(r.behavior) - 1) + [r.reward] if r.behavior else [] for r in rows], mask
        )
        kl = None
        if kl_coef > 0:  # k1 per token, log μ - log π_ref, charged as a reward (Ouyang et al. 2022, eq. 2)
            kl = on_grid([[b - f for b, f in zip(r.behavior, r.ref or [])] for r in rows], mask)
            rewards = rewards - kl_coef * kl
        advantages, returns = gae(rewards, values, mask, c.gamma, c.lam)
        figures = {"explained_variance": explained_variance(values, returns, mask),
                   "advantage_mean": advantages[mask].mean().item(),
                   "advantage_std": advantages[mask].std(correction=0).item()}  # fmt: skip
        if kl is not None:
            figures["kl_ref"] = kl[mask].mean().item()
        if c.whiten:
            advantages = whiten(advantages, mask)
        out = torch.zeros(len(rows), 3, max(len(r.behavior) for r in rows))
        for i, row in enumerate(mask):
            n = int(row.sum())
            out[i, :, :n] = torch.stack([advantages[i][row], returns[i][row], values[i][row]])
        return out, figures

    def loss(self, rows: Sequence[Any], targets: Tensor, max_tokens: int) -> tuple[Tensor, Tensor, dict]:
        """A micro-batch's per-token advantages on the log-probs' grid (b, T), its weighted value loss
        (not yet weighted by its share) and figures; `targets` are its rows' (b, 3, T') from `targets`."""
        values, mask = self.values(rows)  # (b, T) with gradient
        grid = [
            on_grid([t[k, : len(r.behavior)].tolist() for t, r in zip(targets, rows)], mask) for k in range(3)
        ]
        loss, figures = value_loss(
            values, grid[2], grid[1], mask, clip=self.config.value_clip, agg=self.trainer_config.loss_agg,
            max_tokens=max_tokens,
        )  # fmt: skip
        return grid[0], self.config.vf_coef * loss, figures

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> dict[str, float]:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.trainer_config.max_grad_norm)
        self.optimizer.step()
        return {"value_grad_norm": norm.item()}

    def save(self, path: str) -> None:
        """The value model (critic.safetensors) and its optimizer (critic_optimizer/) under `path`."""
        save_model(self.model, f"{path}/critic.safetensors")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            state = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
            dcp.save(state, checkpoint_id=f"{path}/critic_optimizer", no_dist=True)

    def load(self, path: str) -> None:
        if not Path(path, "critic.safetensors").is_file():
            raise ValueError(
                f"checkpoint {path} holds no critic (critic.safetensors): it was written by a run without "
                "trainer.estimator: gae; resume it with that run's estimator, or start a new run"
            )
        load_model(self.model, f"{path}/critic.safetensors")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            state = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
            dcp.load(state, checkpoint_id=f"{path}/critic_optimizer", no_dist=True)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
