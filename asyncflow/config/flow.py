"""Config of a flow-matching policy (`policy: flow`): its velocity model, its sampler and how
it is pre-trained. The RL side (batch, loss, clip, KL, staleness) is the same `trainer`
section as for token policies; `warmup` gives the pre-training's steps, batch size and rate.
Nothing here imports torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from asyncflow.config._base import Section


class EncoderConfig(Section):
    """A plug-in context encoder on a frozen backbone (services.flow.encoder, VideoPainter's idea):
    the velocity MLP above is unconditional, pre-trained by `warmup` and then frozen; a small
    encoder reads the noisy sample, the task's condition and the time, and adds its features to
    the backbone's first hidden layers through zero-initialised projections. Train and publish it
    alone with `trainer.trainable: {patterns: ["encoder.*"]}`."""

    hidden_size: int = Field(32, ge=1, le=65536, description="Width of the encoder's MLP.")
    num_layers: int = Field(2, ge=1, le=64, description="Hidden layers of the encoder's MLP.")
    inject_layers: int = Field(
        2, ge=1, le=64,
        description="How many of the backbone's hidden layers (from the first) receive the encoder's "
        "features; at most flow.num_layers.",
    )  # fmt: skip
    supervised_steps: int = Field(
        2000, ge=0, le=10_000_000,
        description="Adam steps (warmup's batch size and rate) that train the encoder alone, after the "
        "backbone's pre-training, on the inpainting flow-matching loss (0: RL from the zero-initialised "
        "encoder, i.e. from the backbone itself).",
    )  # fmt: skip
    known_weight: float = Field(
        0.1, ge=0, le=1e3,
        description="Weight of the known pixels in the supervised loss (hidden pixels weigh 1; 0: the hidden "
        "region alone). The task's condition must be [masked image, mask].",
    )  # fmt: skip


class AFMConfig(Section):
    """Action Flow Matching on the point robot (services.flow.afm, asyncflow.tasks.robot): actors run
    a CEM planner with a misaligned model, refine its actions with the flow, and write hindsight
    transitions to the store; a trainer trains the flow on each transition once and publishes weights
    the actors pick up between steps. The flow's size is flow.hidden_size / num_layers / time_features;
    the staleness bound is the top-level `staleness`, the seed the top-level `seed`."""

    duration_s: float = Field(60.0, gt=0, le=86_400, description="Seconds the actors act.")
    num_actors: int = Field(1, ge=1, le=256, description="Ray actors running episodes.")
    robots: int = Field(16, ge=1, le=4096, description="Robots each actor steps at once (one planner call).")
    refine: bool = Field(
        True, description="Refine the planner's actions with the flow (false: the planner alone; the "
        "trainer still learns from its transitions)."
    )  # fmt: skip
    refine_steps: int = Field(2, ge=1, le=100, description="Midpoint steps from a0 to the intended action.")
    threshold: float = Field(
        0.0, ge=0, le=1e3,
        description="Refine only where the previous step's transition error |e| is at least this (the "
        "paper's dynamics_misalignment_threshold; 0: always).",
    )  # fmt: skip
    explore: float = Field(
        0.1, ge=0, le=10, description="Std of Gaussian noise added to executed actions (data coverage)."
    )
    put_every: int = Field(4, ge=1, le=10_000, description="Env steps an actor buffers before one store put.")
    batch_size: int = Field(64, ge=1, le=65536, description="Transitions per trainer update (each once).")
    lr: float = Field(1e-3, gt=0, le=1.0, description="Adam learning rate of the flow.")
    horizon: int = Field(5, ge=1, le=1000, description="CEM planning horizon (steps).")
    population: int = Field(64, ge=2, le=100_000, description="CEM action sequences per iteration.")
    elites: int = Field(8, ge=1, le=100_000, description="CEM sequences kept to refit the Gaussian.")
    iterations: int = Field(3, ge=1, le=100, description="CEM iterations per planning call.")
    gain: float = Field(0.7, gt=0, le=10, description="Robot: true actuator gain (the planner assumes 1).")
    angle: float = Field(
        1.2,
        ge=-3.1416,
        le=3.1416,
        description="Robot: radians the true actuator turns commands by (planner: 0).",
    )
    wind: float = Field(
        0.3, ge=0, le=10, description="Robot: strength of the unmodelled position-dependent wind."
    )
    max_steps: int = Field(80, ge=1, le=100_000, description="Robot: steps before an episode is truncated.")

    @model_validator(mode="after")
    def _elites_fit(self) -> AFMConfig:
        if self.elites > self.population:
            raise ValueError(
                f"flow.afm.elites = {self.elites} exceeds flow.afm.population = {self.population}; "
                "keep fewer elites than sampled sequences"
            )
        return self


class PMRFConfig(Section):
    """PMRF as the policy (services.flow.pmrf, Ohayon et al. 2025): a posterior-mean head f(y) and
    an unconditional flow refiner carried from f(y) + sigma_s eps to the data. Warm-start: stage 1
    trains f by MSE (`mean_steps`), stage 2 the refiner (the MLP above) by the rectified-flow loss
    for warmup.steps. RL (the Flow-GRPO step over residuals z = (x - f(y)) / sigma_s) trains what
    trainer.trainable says; `{patterns: ["flow.*"]}` keeps f fixed, so the map from the policy's
    latents to the restored image does not move and the policy gradient is exact."""

    sigma_s: float = Field(
        0.1, gt=0, le=10,
        description="Source noise sigma_s around f(y) (the paper's 0.1; > 0, so the SDE step applies).",
    )  # fmt: skip
    hidden_size: int = Field(256, ge=1, le=65536, description="Width of the posterior-mean MLP f.")
    num_layers: int = Field(3, ge=1, le=64, description="Hidden layers of the posterior-mean MLP f.")
    mean_steps: int = Field(
        2000, ge=0, le=10_000_000,
        description="Adam steps (warmup's batch size and rate) of stage 1, f(y) by MSE, before the refiner.",
    )  # fmt: skip


class FlowConfig(Section):
    """A flow-matching policy: conditional MLP velocity model, Flow-GRPO SDE sampler."""

    hidden_size: int = Field(128, ge=8, le=65536, description="Width of the velocity MLP.")
    num_layers: int = Field(3, ge=1, le=64, description="Hidden layers of the velocity MLP.")
    time_features: int = Field(
        16, ge=1, le=1024, description="Sinusoidal frequencies of the time embedding (2x as many inputs)."
    )
    steps: int = Field(
        10, ge=1, le=1000, description="K: SDE steps per sample, each one log-prob and PPO term."
    )
    noise_level: float = Field(
        0.7, gt=0, le=10,
        description="a in sigma_t = a * sqrt(t / (1 - t)): the exploration noise of the SDE sampler "
        "(Flow-GRPO's default 0.7; RL needs > 0).",
    )  # fmt: skip
    grid: Literal["uniform", "boss"] = Field(
        "uniform",
        description="Step times: uniform, or BOSS's Bellman-optimal grid for the pre-trained weights.",
    )
    boss_fine_steps: int = Field(
        100, ge=2, le=10000, description="Fine Euler steps BOSS measures jump costs on (N)."
    )
    logprob: Literal["sum", "mean"] = Field(
        "sum",
        description="A step's log-prob over dimensions: the exact sum, or Flow-GRPO's mean (for "
        "high-dimensional latents, where sums make ratios explode).",
    )
    pretrain_loss: Literal["icfm", "otcfm", "wcfm"] = Field(
        "icfm", description="Pre-training (warmup) loss: I-CFM, minibatch OT-CFM (needs scipy), or W-CFM."
    )
    wcfm_eps: float = Field(
        10.0, gt=0, le=1e6, description="W-CFM's kernel width eps in exp(-|x - y|^2 / eps)."
    )
    encoder: EncoderConfig | None = Field(
        None,
        description="Unset: one conditional velocity MLP trains. Set: an unconditional backbone (the MLP "
        "above), pre-trained by warmup and frozen, plus a trainable context encoder that reads the "
        "condition (see EncoderConfig).",
    )

    afm: AFMConfig | None = Field(
        None,
        description="Set: `asyncflow run` runs Action Flow Matching on the point robot (see AFMConfig) "
        "instead of RL; the flow above is the action refiner.",
    )
    source: Literal["gaussian", "pfgm"] = Field(
        "gaussian",
        description="The flow's source at t = 1, in pre-training and sampling: N(0, I), or the PFGM++ "
        "kernel's noise at sigma = 1 with augmented dimension pfgm_aug_dim (services.flow.pfgm). The "
        "Flow-GRPO step's drift assumes the Gaussian source's score, so with pfgm its chain does not keep "
        "the ODE's marginals exactly (its log-probs, and so the RL ratios, are still exact).",
    )
    pfgm_aug_dim: float = Field(
        64.0, gt=0,
        description="PFGM++'s augmented dimension D (flow.source pfgm): 1 is PFGM, .inf the Gaussian; "
        "smaller D, heavier tails.",
    )  # fmt: skip
    pmrf: PMRFConfig | None = Field(
        None,
        description="Set: the policy is PMRF, a posterior-mean head plus the velocity MLP above as an "
        "unconditional refiner that reads the condition only through f (see PMRFConfig); the task's "
        "condition is the degraded input y.",
    )

    @model_validator(mode="after")
    def _encoder_fits(self) -> FlowConfig:
        if self.source == "pfgm" and (self.encoder is not None or self.pmrf is not None):
            raise ValueError(
                "flow.source pfgm is an option of the plain velocity MLP; unset flow.encoder / flow.pmrf "
                "(their warm-starts draw Gaussian sources), or use flow.source gaussian"
            )
        if self.encoder is not None and self.pmrf is not None:
            raise ValueError(
                "flow.encoder and flow.pmrf are two policy shapes; set one of them (encoder: inpainting on a "
                "frozen backbone, pmrf: restoration by a mean head and a flow refiner)"
            )
        if self.encoder is not None and self.encoder.inject_layers > self.num_layers:
            raise ValueError(
                f"flow.encoder.inject_layers = {self.encoder.inject_layers} but the backbone has "
                f"flow.num_layers = {self.num_layers} hidden layers; inject into at most {self.num_layers}"
            )
        return self
