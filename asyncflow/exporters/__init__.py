"""Live metric sinks: each step's metrics line, flattened to named numbers on the step axis
(`points`), goes to every sink the `logging` section turns on: Prometheus, Ray's metrics
agent, TensorBoard, Weights & Biases (one file each). metrics.jsonl stays the record; a sink
only mirrors it. Knows nothing about actors or how a line was made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from asyncflow.config import AsyncFlowConfig
from asyncflow.exporters.points import PREFIX, Point, points

__all__ = ["PREFIX", "Exporter", "Exporters", "Point", "open_exporters", "points"]


class Exporter(Protocol):
    """A sink: takes each step's points; closed once at the end of the run."""

    def write(self, step: int, points: list[Point]) -> None: ...

    def close(self) -> None: ...


class Exporters:
    """Every sink the config turns on, written to together."""

    def __init__(self, sinks: list[Exporter]):
        self.sinks = sinks

    def write(self, line: dict[str, Any]) -> None:
        found = points(line)
        for sink in self.sinks:
            sink.write(int(line["step"]), found)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def open_exporters(config: AsyncFlowConfig, run_dir: Path) -> Exporters:
    """The sinks `config.logging` turns on, started (a port is bound, a file opened)."""
    from asyncflow.exporters import prometheus, ray_metrics, tensorboard, wandb

    c = config.logging
    found: list[Exporter] = []
    try:
        if c.prometheus_port:
            found.append(prometheus.Prometheus(c.prometheus_host, c.prometheus_port, config.run_name))
        if c.ray_metrics:
            found.append(ray_metrics.RayMetrics(config.run_name))
        if c.tensorboard:
            found.append(tensorboard.TensorBoard(run_dir / "tensorboard"))
        if c.wandb:
            found.append(wandb.WandB(run_dir, c.wandb_project, c.wandb_mode, config.public()))
    except BaseException:
        Exporters(found).close()
        raise
    return Exporters(found)
