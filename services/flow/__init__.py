"""Flow-matching policies as an engine service: velocity models, pre-training losses,
samplers (Euler ODE, the Flow-GRPO SDE step with its log-prob, mean-flow jumps, BOSS grids)
and `FlowEngine`, which serves them behind the rollout engine protocol so the same workers
train them. The RL loss is asyncflow.algorithms.policy_loss over per-step log-probs.
Seed methods as options: `pfgm` (the PFGM++ kernel as a flow's source), `pmrf`
(posterior-mean rectified flow, and PMRFPolicy: a mean head + flow refiner the engine serves).

Import the submodules where you use them; this package pulls in torch only."""

from services.flow.engine import FlowEngine, FlowRequest, FlowSample, FlowSamplingParams
from services.flow.model import VelocityMLP
from services.flow.sampling import euler, mean_flow_sample, sde_sample, sde_step, step_logprobs, uniform_grid

__all__ = [
    "FlowEngine",
    "FlowRequest",
    "FlowSample",
    "FlowSamplingParams",
    "VelocityMLP",
    "euler",
    "mean_flow_sample",
    "sde_sample",
    "sde_step",
    "step_logprobs",
    "uniform_grid",
]
