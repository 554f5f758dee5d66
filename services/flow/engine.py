"""The flow engine: the rollout engine protocol for a flow-matching policy.

The same shape as the LLM engines (services.serving.protocol): `generate(requests)` returns
n samples per request in request order, each with what RL needs, the way a completion
carries token ids, behaviour log-probs and versions:

    latents    x at every grid point (K+1, D), source noise first, the sample last
    timesteps  the grid (K+1,), from 1 to 0
    logprobs   the Gaussian log-prob of each SDE step under the weights that took it (K,)
    versions   the policy version of each step (K,)

and `update_weights`, `pause` / `resume` (at a step boundary, in-flight samples kept) and
`close`. A step is the denoising analogue of a token: an update between two steps of a call
changes the weights, and the versions say which steps each version took.

The engine knows nothing about the data store, Ray, tasks or rewards.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from services.flow.boss import bellman_grid, jump_costs
from services.flow.model import VelocityMLP
from services.flow.pfgm import pfgm_noise
from services.flow.sampling import Reduce, check_grid, sde_step, uniform_grid
from services.serving.protocol import InProcessEngine

__all__ = ["FlowEngine", "FlowRequest", "FlowSample", "FlowSamplingParams"]


@dataclass(frozen=True)
class FlowSamplingParams:
    """How to sample one request's samples."""

    steps: int = 10
    """K: denoising steps (model evaluations) per sample."""
    noise_level: float = 0.7
    """a in sigma_t = a sqrt(t / (1 - t)) (Flow-GRPO's default 0.7); 0 gives the ODE, log-prob 0."""
    grid: Literal["uniform", "boss"] = "uniform"
    """Step times: evenly spaced, or BOSS's Bellman-optimal grid for the engine's weights."""
    reduce: Reduce = "sum"
    """How a step's per-dimension log-probs combine: the exact "sum", or Flow-GRPO's "mean"."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"FlowSamplingParams.steps={self.steps}: expected >= 1 denoising steps")
        if not 0 <= self.noise_level <= 10:
            raise ValueError(
                f"FlowSamplingParams.noise_level={self.noise_level}: expected 0 (the ODE) to 10; "
                "Flow-GRPO uses 0.7"
            )
        if self.grid not in ("uniform", "boss") or self.reduce not in ("sum", "mean"):
            raise ValueError(
                f"FlowSamplingParams: grid={self.grid!r} must be 'uniform' or 'boss', reduce={self.reduce!r} "
                "'sum' or 'mean'"
            )


@dataclass(frozen=True)
class FlowRequest:
    """One condition to sample n times (an empty condition for an unconditional policy)."""

    request_id: str
    condition: tuple[float, ...] = ()
    n: int = 1
    params: FlowSamplingParams = field(default_factory=FlowSamplingParams)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"FlowRequest {self.request_id!r}: n={self.n}, expected n >= 1 samples")


@dataclass
class FlowSample:
    """One sample of one request, with its trajectory (see the module docstring)."""

    request_id: str
    index: int  # 0..n-1 within the request
    condition: list[float]
    latents: torch.Tensor  # (K+1, D) float32
    timesteps: torch.Tensor  # (K+1,) float32
    logprobs: list[float]  # (K,)
    versions: list[int]  # (K,)
    finish_reason: Literal["stop", "abort"]
    output: torch.Tensor | None = None
    """The sample in data space, (D,), when the model maps its latents to data (`to_data`, e.g.
    services.flow.pmrf.PMRFPolicy); None when the last latent is the sample."""

    @property
    def sample(self) -> torch.Tensor:
        """The generated point in data space: (D,), the last latent unless the model maps latents to data."""
        return self.latents[-1] if self.output is None else self.output


class FlowEngine(InProcessEngine):
    """Engine protocol implementation over an in-process VelocityMLP."""

    def __init__(
        self, model: VelocityMLP, *, version: int = 0, seed: int = 0, boss_fine_steps: int = 100,
        boss_samples: int = 512, aug_dim: float | None = None,
    ) -> None:  # fmt: skip
        """`aug_dim`: draw the source at t = 1 from the PFGM++ kernel with augmented dimension D =
        aug_dim (services.flow.pfgm) instead of N(0, I)."""
        super().__init__(model, version)
        self._aug_dim = aug_dim
        self.stats: dict[str, float] = {"samples_generated": 0, "generate_s": 0.0, "requests": 0}
        self._generator = torch.Generator().manual_seed(seed)
        self._boss = (boss_fine_steps, boss_samples, seed)
        self._grids: dict[int, torch.Tensor] = {}  # BOSS grids by step count, fixed once computed

    # ---------------------------------------------------------------- protocol

    async def generate(self, requests: Sequence[FlowRequest]) -> list[FlowSample]:
        model = self._open_model()
        started = time.perf_counter()
        out: list[FlowSample] = []
        by_params: dict[FlowSamplingParams, list[FlowRequest]] = {}
        for request in requests:
            if len(request.condition) != model.condition_dim:
                raise ValueError(
                    f"FlowRequest {request.request_id!r}: condition has {len(request.condition)} values, the "
                    f"model takes {model.condition_dim}; give every request the task's condition vector"
                )
            by_params.setdefault(request.params, []).append(request)
        for params, group in by_params.items():
            out += await self._generate(group, params)
        position = {r.request_id: i for i, r in enumerate(requests)}
        out.sort(key=lambda s: (position[s.request_id], s.index))
        self.stats["generate_s"] += time.perf_counter() - started
        self.stats["samples_generated"] += len(out)
        self.stats["requests"] += len(requests)
        return out

    # ---------------------------------------------------------------- sampling

    def grid(self, params: FlowSamplingParams) -> torch.Tensor:
        """The time grid `params` asks for. A BOSS grid is computed once, from the weights loaded
        when it is first asked for, and kept: rows carry their grid, so any grid trains."""
        if params.grid == "uniform":
            return uniform_grid(params.steps)
        if params.steps not in self._grids:
            fine, samples, seed = self._boss
            model = self._open_model()
            x = torch.randn(samples, model.dim, generator=torch.Generator().manual_seed(seed))
            self._grids[params.steps] = bellman_grid(
                jump_costs(model, x, max(fine, params.steps)), params.steps
            )
        return self._grids[params.steps]

    async def _generate(self, requests: list[FlowRequest], params: FlowSamplingParams) -> list[FlowSample]:
        model = self._open_model()
        grid = self.grid(params)
        times = check_grid(grid)
        rows = [(r, i) for r in requests for i in range(r.n)]
        cond = torch.tensor([r.condition for r, _ in rows], dtype=torch.float32).view(len(rows), -1)  # (B, C)
        if self._aug_dim is None:
            x = torch.randn(len(rows), model.dim, generator=self._generator)  # (B, D) at t = 1
        else:
            x = pfgm_noise(len(rows), model.dim, self._aug_dim, generator=self._generator)
        latents, logps, versions = [x], list[torch.Tensor](), list[int]()
        for t, t_next in zip(times, times[1:]):
            await asyncio.sleep(0)  # a step boundary: let pause / update_weights / close land
            await self._unpaused.wait()
            if self._model is None:
                return self._samples(rows, latents, grid, logps, versions, "abort", None)
            with torch.no_grad():
                x, _, _, logp = sde_step(
                    self._model, x, t, t_next, cond, params.noise_level, t_root=times[1],
                    generator=self._generator, reduce=params.reduce,
                )  # fmt: skip
            latents.append(x)
            logps.append(logp)
            versions.append(self.version)
        outputs = None
        if hasattr(self._model, "to_data"):  # latents are not data (PMRF's residuals): map the sample
            with torch.no_grad():
                outputs = self._model.to_data(x, cond)  # (B, D), with the weights of the last step
        return self._samples(rows, latents, grid, logps, versions, "stop", outputs)

    @staticmethod
    def _samples(
        rows: list[tuple[FlowRequest, int]], latents: list[torch.Tensor], grid: torch.Tensor,
        logps: list[torch.Tensor], versions: list[int], reason: Literal["stop", "abort"],
        outputs: torch.Tensor | None,
    ) -> list[FlowSample]:  # fmt: skip
        path = torch.stack(latents, dim=1)  # (B, steps+1, D)
        logprobs = torch.stack(logps, dim=1).tolist() if logps else [[] for _ in rows]  # (B, steps)
        return [
            FlowSample(
                request_id=request.request_id,
                index=index,
                condition=list(request.condition),
                latents=path[i].clone(),
                timesteps=grid[: path.shape[1]].clone(),
                logprobs=logprobs[i],
                versions=list(versions),
                finish_reason=reason,
                output=None if outputs is None else outputs[i].clone(),
            )  # fmt: skip
            for i, (request, index) in enumerate(rows)
        ]
