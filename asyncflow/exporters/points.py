"""The numbers of a step's metrics line, flattened: the one place that names what every sink
(Prometheus, Ray metrics, TensorBoard, W&B) and the Grafana dashboard show.

    points({"step": 3, "reward_mean": 0.5, "staleness": {"0": 96, "1": 32}, ...})
      -> reward_mean 0.5, staleness_samples{staleness="0"} 96, staleness_samples{...="1"} 32, ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from asyncflow.errors import ConfigError

PREFIX = "asyncflow_"  # of every Prometheus metric name (Ray's agent adds its own "ray_" before it)

# Metrics whose keys carry a label: the key's parts after the first become label values.
_LABELLED = {
    "reward": ("reward_component", ("component",)),  # reward/<component>
    "time": ("step_time_seconds", ("role", "span")),  # time/<role>/<span>: seconds within the step
}
_NESTED = {  # sections of a line that are dicts: (name, label) per entry
    "staleness": ("staleness_samples", "staleness"),  # samples of the step by staleness
    "queues": ("queue_ready_rows", "consumer"),  # rows ready for each consumer of the store
}


@dataclass(frozen=True)
class Point:
    """One number of a step: a metric name (snake case, no prefix), its labels and value."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float

    @property
    def tag(self) -> str:
        """The name TensorBoard and W&B show: the metric, then its label values (time/rollout/generate
        stays time/rollout/generate; worker_idle_frac{role=rollout} is worker_idle_frac/rollout)."""
        return "/".join([self.name, *(v for _, v in self.labels)])


def points(line: dict[str, Any]) -> list[Point]:
    """The numbers of one metrics line (as metrics.jsonl holds it), flattened."""
    out: list[Point] = []
    for key, value in line.items():
        if key == "step":
            continue  # the axis, not a point
        if key in _NESTED and isinstance(value, dict):
            name, label = _NESTED[key]
            out += [Point(name, ((label, str(k)),), float(v)) for k, v in value.items() if _number(v)]
        elif key == "workers" and isinstance(value, dict):
            out += _workers(value)
        elif key == "store" and isinstance(value, dict):
            out += [Point(f"store_{_name(k)}", (), float(v)) for k, v in value.items() if _number(v)]
        elif _number(value):
            head, *rest = key.split("/")
            if head in _LABELLED and len(rest) == len(_LABELLED[head][1]):
                name, labels = _LABELLED[head]
                out.append(Point(name, tuple(zip(labels, rest)), float(value)))
            else:
                out.append(Point(_name(key), (), float(value)))
    return out


def _workers(workers: dict[str, Any]) -> list[Point]:
    """worker_<stat>{role=...} per role; queue_ready_rows{consumer=...}."""
    out: list[Point] = []
    for role, stats in workers.items():
        if role in _NESTED:
            out += points({role: stats})
        elif isinstance(stats, dict):
            out += [Point(f"worker_{_name(k)}", (("role", role),), float(v)) for k, v in stats.items()
                    if _number(v)]  # fmt: skip
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key).strip("_").lower()


def missing_package(field: str, package: str) -> ConfigError:
    """The error of a sink turned on whose package is not installed."""
    return ConfigError(
        f"logging.{field} is on but the {package!r} package is not installed; install it (pip install "
        f"'asyncflow-rl[observe]') or set logging.{field}: false"
    )
