"""FlowTrainerWorker: the trainer of a flow-matching policy (policy: flow).

The step is TrainerWorker's: whole groups within the staleness window, group-relative
advantages, `minibatches` optimizer steps, one published version per batch, the same
checkpoints. What differs is what a sample's actions are: its K denoising steps instead of
tokens. Their log-probs under the current weights are recomputed from the stored latents
(workers.flow_kind.FlowKind.logprobs) and the loss is the same policy_loss over the (B, K)
grid of steps: each step its own PPO-clip term with the sample's advantage, as Flow-GRPO
trains (Liu et al. 2025, arXiv 2505.05470, §4 and eq. 6), with the off-policy correction of
the behaviour log-probs the engine recorded; optionally a KL term to the reference's
per-step log-probs. At lag 0 the recomputed log-probs equal the behaviour ones exactly, so
every ratio is exactly 1 (`logprob_diff_max` is 0).

The warm-start is flow-matching pre-training on the task's data (services.flow.losses).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from asyncflow.config import TrainerConfig, WarmupConfig
from services.flow.losses import fit, make_loss
from workers.samples import trainer_fields
from workers.trainer import TrainerWorker


@dataclass
class _FlowRow:
    condition: np.ndarray  # (C,)
    latents: np.ndarray  # (K+1, D)
    timesteps: np.ndarray  # (K+1,)
    behavior: list[float]  # (K,) one log-prob per step
    versions: list[int]  # (K,)
    reward: float
    ref: list[float] | None

    def version(self, default: int) -> int:
        return min(self.versions, default=default)


class FlowTrainerWorker(TrainerWorker):
    def __init__(
        self,
        model: torch.nn.Module,
        store: Any,
        weights: Any,
        config: TrainerConfig,
        kind: Any,  # workers.flow_kind.FlowKind
        *,
        n: int,
        staleness: int,
        reference: bool,
        version: int = 0,
        get_timeout_s: float | None = None,
    ):
        super().__init__(
            model, store, weights, config, n=n, staleness=staleness, temperature=1.0, reference=reference,
            version=version, get_timeout_s=get_timeout_s,
        )  # fmt: skip
        self.kind = kind
        self.fields = trainer_fields(reference, "flow")

    def warmup(self, task: Any, tokenizer: Any, config: WarmupConfig) -> dict:
        """Flow-matching pre-training on `task.data` with the configured loss."""
        if config.steps == 0:
            return {"steps": 0}
        flow = self.kind.config
        loss = make_loss(flow.pretrain_loss, wcfm_eps=flow.wcfm_eps)

        def data(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, cond = task.data(step, size)
            return torch.as_tensor(x), torch.as_tensor(cond)

        start = time.perf_counter()
        final = fit(
            self.model,  # type: ignore[arg-type]  # a VelocityMLP (FlowKind.model)
            loss, data, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
            seed=int(torch.randint(2**31 - 1, ())),
        )  # fmt: skip
        return {"steps": config.steps, "loss": final, "seconds": time.perf_counter() - start}

    def _rows(self, data: dict, order: list[int]) -> list[Any]:
        return [
            _FlowRow(
                data["condition"][i],
                data["latents"][i],
                data["timesteps"][i],
                data["behavior_logprobs"][i].tolist(),
                data["step_versions"][i].tolist(),
                float(data["reward"][i]),
                data["ref_logprobs"][i].tolist() if self.reference else None,
            )  # fmt: skip
            for i in order
        ]

    def _logprobs(self, rows: list[_FlowRow]) -> torch.Tensor:
        """(B, K) per-step log-probs under the current weights, differentiable."""
        return self.kind.logprobs(
            self.model, [r.condition for r in rows], [r.latents for r in rows], [r.timesteps for r in rows]
        )

    @torch.no_grad()
    def _logprobs_no_grad(self, rows: list[Any]) -> list[torch.Tensor]:
        return list(self._logprobs(rows))

    def _update(self, rows: list[Any], advantages: torch.Tensor, max_tokens: int,
                proximal: list[torch.Tensor] | None) -> dict[str, float]:  # fmt: skip
        """One optimizer step over `rows` in one pass (a flow sample is small)."""
        logprobs = self._logprobs(rows)  # (B, K)
        behavior = torch.tensor([r.behavior for r in rows], dtype=torch.float32)  # (B, K)
        prox = logprobs.detach() if proximal is None else torch.stack(proximal)
        ref = torch.tensor([r.ref for r in rows], dtype=torch.float32) if self.reference else None
        mask = torch.ones_like(behavior, dtype=torch.bool)  # every step of every sample counts
        loss, stats = self._loss(logprobs, behavior, advantages, mask, prox, ref, max_tokens)
        # 0 exactly when rollout and trainer agree bit for bit (lag 0): any grid, sigma, dtype or
        # conditioning mismatch shows here first.
        stats["logprob_diff_max"] = (logprobs.detach() - behavior).abs().max().item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stats["loss"] = loss.item()
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.config.max_grad_norm
        ).item()
        self.optimizer.step()
        return stats
