"""Ray's metrics agent: the same points as gauges through ray.util.metrics, so the Prometheus
that scrapes the Ray cluster (and the Ray dashboard's Grafana) sees them, named
ray_asyncflow_<metric>{run=..., <labels>}. Needs Ray started in this process, with its
metrics agent (ray[default]).

Ray's agent drops a gauge that has not been set for a while (about a minute), and a step of
a large model can take longer: the last step's values are set again every `refresh_s` until
the run ends.
"""

from __future__ import annotations

import threading
from typing import Any

from asyncflow.exporters.points import PREFIX, Point
from asyncflow.exporters.prometheus import HELP


class RayMetrics:
    def __init__(self, run_name: str, refresh_s: float = 10.0):
        self.run_name = run_name
        self.gauges: dict[str, Any] = {}
        self.latest: list[Point] = []
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.refresher = threading.Thread(target=self._refresh, args=(refresh_s,), daemon=True)
        self.refresher.start()

    def write(self, step: int, points: list[Point]) -> None:
        with self.lock:
            self.latest = [Point("step", (), float(step)), *points]
            self._set(self.latest)

    def _set(self, points: list[Point]) -> None:
        from ray.util.metrics import Gauge

        for p in points:
            gauge = self.gauges.get(p.name)
            if gauge is None:
                keys = ("run", *(k for k, _ in p.labels))
                gauge = Gauge(PREFIX + p.name, description=HELP.get(p.name, p.name), tag_keys=keys)
                self.gauges[p.name] = gauge
            gauge.set(p.value, tags={"run": self.run_name, **dict(p.labels)})

    def _refresh(self, every_s: float) -> None:
        while not self.closed.wait(every_s):
            with self.lock:
                self._set(self.latest)

    def close(self) -> None:
        self.closed.set()
        self.refresher.join(timeout=5)
