"""The "flow" policy kind: rows of a flow-matching policy (services.flow) in the store.

A prompt is the task's condition vector; a response is the SDE trajectory the engine took
(latents at every grid point, the grid, one behaviour log-prob and one version per step).
The reward function is called as reward(condition, sample, answer) with numpy arrays; the
sample is the trajectory's last point.

`logprobs` is the single place where stored trajectories become log-probs under a model:
the trainer (with gradient) and the reference (without) both call it, and it calls the
same `sde_step` the engine sampled with, so at lag 0 it returns the behaviour log-probs
bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from asyncflow.config import FlowConfig
from services.flow import FlowEngine, FlowRequest, FlowSample, FlowSamplingParams, VelocityMLP, step_logprobs
from workers.samples import FLOW_PROMPT_FIELDS, FLOW_ROLLOUT_FIELDS


class FlowKind:
    policy = "flow"
    prompt_field, response_field = "condition", "latents"
    prompt_fields, rollout_fields = FLOW_PROMPT_FIELDS, FLOW_ROLLOUT_FIELDS
    reference_reads = ["condition", "latents", "timesteps"]
    tokenizer = None

    def __init__(self, config: FlowConfig, task: Any):
        for attr in ("dim", "condition_dim", "data"):
            if not hasattr(task, attr):
                raise ValueError(
                    f"policy flow needs a flow task (asyncflow.tasks.FlowTask), but {type(task).__name__} "
                    f"has no {attr!r}; set task.source to one, e.g. asyncflow.tasks.gaussians:EightGaussians"
                )
        self.config, self.task = config, task

    def model(self, seed: int) -> VelocityMLP:
        c = self.config
        with torch.random.fork_rng():  # the same seed gives the same initial weights everywhere
            torch.manual_seed(seed)
            return VelocityMLP(
                self.task.dim, self.task.condition_dim, hidden_size=c.hidden_size, num_layers=c.num_layers,
                time_features=c.time_features,
            )  # fmt: skip

    def engine(self, seed: int) -> FlowEngine:
        """An engine with a fresh model; its weights come from the weight store (version -1 until then)."""
        return FlowEngine(self.model(0), version=-1, seed=seed, boss_fine_steps=self.config.boss_fine_steps)

    def params(self) -> FlowSamplingParams:
        c = self.config
        return FlowSamplingParams(steps=c.steps, noise_level=c.noise_level, grid=c.grid, reduce=c.logprob)

    def prompts(self, examples: Sequence[Any]) -> dict[str, list]:
        return {"condition": [np.asarray(e.condition, np.float32).reshape(-1) for e in examples]}

    def request(self, request_id: str, prompt: Any, n: int, params: FlowSamplingParams) -> FlowRequest:
        return FlowRequest(request_id, tuple(float(v) for v in prompt), n, params)

    def results(self, outputs: Sequence[FlowSample]) -> dict[str, list]:
        return {
            "latents": [s.latents.numpy() for s in outputs],
            "timesteps": [s.timesteps.numpy() for s in outputs],
            "behavior_logprobs": [np.asarray(s.logprobs, np.float32) for s in outputs],
            "step_versions": [np.asarray(s.versions, np.int64) for s in outputs],
        }

    def reward_args(self, prompt: Any, response: Any, answer: str) -> tuple[np.ndarray, np.ndarray, str]:
        """(condition, sample, answer): the sample is the trajectory's last point."""
        return np.asarray(prompt), np.asarray(response)[-1], answer

    def logprobs(self, model: VelocityMLP, conditions: Sequence[Any], latents: Sequence[Any],
                 grids: Sequence[Any]) -> torch.Tensor:  # fmt: skip
        """Each stored step's log-prob under `model`: (B, K), differentiable. Rows that share a
        grid are computed together (usually all of them)."""
        groups: dict[bytes, list[int]] = {}
        for i, grid in enumerate(grids):
            groups.setdefault(np.asarray(grid, np.float32).tobytes(), []).append(i)
        if len({len(np.asarray(g)) for g in grids}) > 1:
            raise ValueError(
                "flow rows of one batch have different step counts "
                f"{sorted({len(np.asarray(g)) - 1 for g in grids})}; keep flow.steps fixed within a run"
            )
        parts, order = [], []
        for rows in groups.values():
            parts.append(
                step_logprobs(
                    model,
                    torch.as_tensor(np.stack([latents[i] for i in rows])),
                    torch.as_tensor(np.asarray(grids[rows[0]], np.float32)),
                    torch.as_tensor(np.stack([np.asarray(conditions[i], np.float32) for i in rows])),
                    self.config.noise_level,
                    reduce=self.config.logprob,
                )  # fmt: skip
            )
            order += rows
        logprobs = torch.cat(parts)
        return logprobs[torch.as_tensor(order).argsort()] if len(parts) > 1 else logprobs

    @torch.no_grad()
    def reference_logprobs(self, model: torch.nn.Module, batch: Any) -> list[np.ndarray]:
        lp = self.logprobs(model, batch["condition"], batch["latents"], batch["timesteps"])  # type: ignore[arg-type]
        return list(lp.numpy())
