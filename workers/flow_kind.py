"""The "flow" policy kind: rows of a flow-matching policy (services.flow) in the store.

A prompt is the task's condition vector; a response is the SDE trajectory the engine took
(latents at every grid point, the grid, one behaviour log-prob and one version per step).
The reward function is called as reward(condition, sample, answer) with numpy arrays; the
sample is the generated point in data space (the `sample` field): the trajectory's last point,
or for PMRF (flow.pmrf) f(y) + sigma_s z of the last residual z.

`step_logprobs` is the single place where stored trajectories become log-probs under a
model: the trainer (with gradient) and the reference (without) both call it, and it calls
the same `sde_step` the engine sampled with, so at lag 0 it returns the behaviour log-probs
bit for bit. The trainer's loss is the same policy_loss over the (B, K) grid of steps as
over tokens: each step its own PPO-clip term with the sample's advantage, as Flow-GRPO
trains (Liu et al. 2025, arXiv 2505.05470, §4 and eq. 6). The warm-start is flow-matching
pre-training on the task's data (services.flow.losses).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from asyncflow.config import FlowConfig, WarmupConfig
from services.flow import FlowEngine, FlowRequest, FlowSample, FlowSamplingParams, VelocityMLP, step_logprobs
from services.flow.encoder import EncoderFlow, inpainting_loss, training_only
from services.flow.losses import adam, fit, make_loss
from services.flow.pfgm import pfgm_source
from services.flow.pmrf import MeanMLP, PMRFPolicy, fit_mean, stage2_loss
from workers.samples import FLOW_PROMPT_FIELDS, FLOW_ROLLOUT_FIELDS


@dataclass
class FlowSampleRow:
    """One sample of a flow policy as the trainer needs it."""

    condition: np.ndarray  # (C,)
    latents: np.ndarray  # (K+1, D)
    timesteps: np.ndarray  # (K+1,)
    behavior: list[float]  # (K,) one log-prob per step
    versions: list[int]  # (K,)
    reward: float
    ref: list[float] | None

    def version(self, default: int) -> int:
        return min(self.versions, default=default)


class FlowKind:
    policy = "flow"
    prompt_field, response_field = "condition", "sample"
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
        for name, example in (
            ("encoder", "inpainting:DigitInpainting"),
            ("pmrf", "restoration:DigitRestoration"),
        ):
            if getattr(config, name) is not None and not task.condition_dim:
                raise ValueError(
                    f"flow.{name} reads the task's condition, but {type(task).__name__} is unconditional "
                    f"(condition_dim 0); unset flow.{name}, or use a conditional task such as "
                    f"asyncflow.tasks.{example}"
                )
        self.config, self.task = config, task

    def model(self, seed: int) -> VelocityMLP | EncoderFlow | PMRFPolicy:
        """The velocity MLP; with flow.encoder an unconditional one (the backbone) under a context
        encoder (services.flow.encoder); with flow.pmrf an unconditional one (the refiner) after a
        posterior-mean head (services.flow.pmrf)."""
        c, e, p = self.config, self.config.encoder, self.config.pmrf
        with torch.random.fork_rng():  # the same seed gives the same initial weights everywhere
            torch.manual_seed(seed)
            mlp = VelocityMLP(
                self.task.dim, 0 if e or p else self.task.condition_dim, hidden_size=c.hidden_size,
                num_layers=c.num_layers, time_features=c.time_features,
            )  # fmt: skip
            if p is not None:
                mean = MeanMLP(self.task.condition_dim, self.task.dim, hidden_size=p.hidden_size,
                               num_layers=p.num_layers)  # fmt: skip
                return PMRFPolicy(mean, mlp, p.sigma_s)
            if e is None:
                return mlp
            return EncoderFlow(
                mlp, self.task.condition_dim, hidden_size=e.hidden_size, num_layers=e.num_layers,
                inject_layers=e.inject_layers,
            )  # fmt: skip

    def engine(self, seed: int, device: str = "cpu") -> FlowEngine:
        """An engine with a fresh model; its weights come from the weight store (version -1 until then).
        Flow policies run on the CPU (the config refuses GPUs for them), so `device` is always "cpu"."""
        model: Any = self.model(0)  # a VelocityMLP, or an EncoderFlow (which has its interface)
        aug_dim = self.config.pfgm_aug_dim if self.config.source == "pfgm" else None
        return FlowEngine(
            model, version=-1, seed=seed, boss_fine_steps=self.config.boss_fine_steps, aug_dim=aug_dim
        )

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
            "sample": [s.sample.numpy() for s in outputs],
        }

    def reward_args(self, prompt: Any, response: Any, answer: str) -> tuple[np.ndarray, np.ndarray, str]:
        """(condition, sample, answer): the sample in data space."""
        return np.asarray(prompt), np.asarray(response), answer

    def trainer_reads(self, reference: bool) -> list[str]:
        fields = ["condition", "prompt_index", "sample_index", *FLOW_ROLLOUT_FIELDS, "reward"]
        return fields + (["ref_logprobs"] if reference else [])

    def rows(self, data: dict, order: list[int], reference: bool) -> list[FlowSampleRow]:
        return [
            FlowSampleRow(
                data["condition"][i],
                data["latents"][i],
                data["timesteps"][i],
                data["behavior_logprobs"][i].tolist(),
                data["step_versions"][i].tolist(),
                float(data["reward"][i]),
                data["ref_logprobs"][i].tolist() if reference else None,
            )  # fmt: skip
            for i in order
        ]

    def micro_batches(self, rows: Sequence[FlowSampleRow], token_budget: int) -> list[list[int]]:
        return [list(range(len(rows)))]  # a flow sample is small: one pass

    def lengths(self, rows: Sequence[FlowSampleRow]) -> list[int]:
        return [len(r.behavior) for r in rows]  # denoising steps

    def logprobs(self, model: Any, rows: Sequence[FlowSampleRow]) -> tuple[Tensor, Tensor]:
        """(B, K) per-step log-probs under `model` (a VelocityMLP), differentiable; every step counts."""
        lp = self.step_logprobs(
            model,
            [r.condition for r in rows],
            [r.latents for r in rows],
            [r.timesteps for r in rows],  # type: ignore[arg-type]
        )
        return lp, torch.ones_like(lp, dtype=torch.bool)

    def warmup(self, model: torch.nn.Module, task: Any, config: WarmupConfig) -> dict:
        """Flow-matching pre-training on `task.data` with the configured loss. With flow.encoder:
        the backbone alone, unconditionally, then the encoder alone on the inpainting loss, whatever
        trainer.trainable trains later."""
        e = self.config.encoder
        loss = make_loss(self.config.pretrain_loss, wcfm_eps=self.config.wcfm_eps)
        out: dict[str, Any] = {"steps": config.steps}
        start = time.perf_counter()
        if isinstance(model, PMRFPolicy):
            out.update(self._fit_pmrf(model, task, config))
        elif isinstance(model, EncoderFlow):
            with training_only(model, model.backbone):
                out["loss"] = self._fit(model.backbone, loss, task, config, config.steps, conditional=False)
            if e is not None and e.supervised_steps:
                with training_only(model, model.encoder):
                    encoder_loss = functools.partial(inpainting_loss, known_weight=e.known_weight)
                    out["encoder_loss"] = self._fit(model, encoder_loss, task, config, e.supervised_steps)
                out["encoder_steps"] = e.supervised_steps
        else:
            source = None
            if self.config.source == "pfgm":  # the PFGM++ kernel's noise, a fresh draw per step
                source = pfgm_source(
                    self.task.dim, self.config.pfgm_aug_dim, seed=int(torch.randint(2**31 - 1, ()))
                )
            out["loss"] = self._fit(model, loss, task, config, config.steps, source=source)
        out["seconds"] = time.perf_counter() - start
        return out if config.steps or out.get("encoder_steps") or out.get("mean_steps") else {"steps": 0}

    def _fit_pmrf(self, model: PMRFPolicy, task: Any, config: WarmupConfig) -> dict[str, float]:
        """Stage 1, f(y) by MSE for flow.pmrf.mean_steps; stage 2, the refiner by the rectified-flow
        loss from f(y) + sigma_s eps for warmup.steps; pairs (x, y) are task.data's (data, condition)."""
        assert self.config.pmrf is not None
        mean_steps, seed = self.config.pmrf.mean_steps, int(torch.randint(2**31 - 1, ()))
        generator = torch.Generator().manual_seed(seed)

        def pairs(step: int, size: int) -> tuple[Tensor, Tensor]:
            x, y = task.data(step, size)
            return torch.as_tensor(x), torch.as_tensor(y)

        def refiner_loss(step: int) -> Tensor:
            x, y = pairs(mean_steps + step, config.batch_size)  # batches stage 1 did not see
            return stage2_loss(model.flow, model.mean, x, y, model.sigma_s, generator)

        out = {"mean_steps": float(mean_steps), "mean_loss": float("nan"), "loss": float("nan")}
        if mean_steps:
            with training_only(model, model.mean):
                out["mean_loss"] = fit_mean(model.mean, pairs, steps=mean_steps, batch_size=config.batch_size,
                                            lr=config.lr)  # fmt: skip
        if config.steps:
            with training_only(model, model.flow):
                out["loss"] = adam(model.flow, refiner_loss, steps=config.steps, lr=config.lr)
        return out

    @staticmethod
    def _fit(
        model: torch.nn.Module, loss: Any, task: Any, config: WarmupConfig, steps: int, *,
        conditional: bool = True, source: Any = None,
    ) -> float:  # fmt: skip
        if not steps:
            return float("nan")

        def data(step: int, size: int) -> tuple[Tensor, Tensor | None]:
            x, cond = task.data(step, size)
            return torch.as_tensor(x), (torch.as_tensor(cond) if conditional else None)

        return fit(
            model,  # type: ignore[arg-type]  # a VelocityMLP or an EncoderFlow (self.model)
            loss, data, steps=steps, batch_size=config.batch_size, lr=config.lr, source=source,
            seed=int(torch.randint(2**31 - 1, ())),
        )  # fmt: skip

    def step_logprobs(self, model: VelocityMLP, conditions: Sequence[Any], latents: Sequence[Any],
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
        lp = self.step_logprobs(model, batch["condition"], batch["latents"], batch["timesteps"])  # type: ignore[arg-type]
        return list(lp.numpy())
