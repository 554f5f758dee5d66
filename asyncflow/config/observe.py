"""Config of where a run's metrics go besides metrics.jsonl (the `logging` section): a
Prometheus endpoint, Ray's metrics agent, TensorBoard, Weights & Biases. Every sink is off
by default; nothing here imports the sinks' packages."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asyncflow.config._base import Section


class LoggingConfig(Section):
    """Live metric sinks; each step's metrics line goes to every one that is on."""

    prometheus_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Serve the step metrics at http://<prometheus_host>:<port>/metrics for Prometheus "
        "to scrape (0: off). deploy/grafana/asyncflow.json is a dashboard over them.",
    )
    prometheus_host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="The address the /metrics endpoint listens on; 0.0.0.0 lets a Prometheus on "
        "another machine (or pod) scrape it.",
    )
    ray_metrics: bool = Field(
        False,
        description="Also publish the step metrics through Ray's metrics agent (ray.util.metrics), so "
        "the Prometheus that scrapes the Ray cluster, and the Ray dashboard's Grafana, see them "
        "(named ray_asyncflow_...). Needs Ray's metrics agent (ray[default]).",
    )
    tensorboard: bool = Field(
        False,
        description="Write TensorBoard event files to <run_dir>/tensorboard (needs the `tensorboard` "
        "package: pip install 'asyncflow-rl[observe]').",
    )
    wandb: bool = Field(
        False,
        description="Log to Weights & Biases into <run_dir>/wandb (needs the `wandb` package: pip "
        "install 'asyncflow-rl[observe]').",
    )
    wandb_mode: Literal["offline", "online"] = Field(
        "offline",
        description="offline: write the W&B run to disk only, no network (upload later with `wandb "
        "sync`); online: stream it to the W&B server (needs WANDB_API_KEY).",
    )
    wandb_project: str = Field(
        "asyncflow", min_length=1, max_length=128, description="The W&B project the run is logged in."
    )
