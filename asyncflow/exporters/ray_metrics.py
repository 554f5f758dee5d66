"""Ray's metrics agent: the same points as gauges through ray.util.metrics, so the Prometheus
that scrapes the Ray cluster (and the Ray dashboard's Grafana) sees them, named
ray_asyncflow_<metric>{run=..., <labels>}. Needs Ray started in this process, with its
metrics agent (ray[default])."""

from __future__ import annotations

from typing import Any

from asyncflow.exporters.points import PREFIX, Point
from asyncflow.exporters.prometheus import HELP


class RayMetrics:
    def __init__(self, run_name: str):
        self.run_name = run_name
        self.gauges: dict[str, Any] = {}

    def write(self, step: int, points: list[Point]) -> None:
        from ray.util.metrics import Gauge

        for p in [Point("step", (), float(step)), *points]:
            gauge = self.gauges.get(p.name)
            if gauge is None:
                keys = ("run", *(k for k, _ in p.labels))
                gauge = Gauge(PREFIX + p.name, description=HELP.get(p.name, p.name), tag_keys=keys)
                self.gauges[p.name] = gauge
            gauge.set(p.value, tags={"run": self.run_name, **dict(p.labels)})

    def close(self) -> None:
        self.gauges.clear()  # Ray's agent keeps the last values until the process ends
