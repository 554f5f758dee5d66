"""Prometheus: the latest step's points as gauges at http://HOST:PORT/metrics, named
asyncflow_<metric>{run="<run_name>", <labels>}. A private registry: nothing else of the
process shows up there, and two runs in one process do not collide. The endpoint lives as
long as the run; for Prometheus to see a short run whole, scrape often (scrape_interval 5s)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from asyncflow.errors import ConfigError
from asyncflow.exporters.points import PREFIX, Point


class Prometheus:
    """Serves the points of the last step written; a scrape sees one whole step, never a mix."""

    def __init__(self, host: str, port: int, run_name: str):
        from prometheus_client import CollectorRegistry

        self.run_name = run_name
        self.latest: tuple[Point, ...] = ()  # replaced whole at each step: a scrape reads one step
        self.registry = CollectorRegistry()
        self.registry.register(self)  # type: ignore[arg-type]  # a collector: collect() below
        self.server, self.thread = serve(self.registry, host, port)
        self.port = self.server.server_port

    def write(self, step: int, points: list[Point]) -> None:
        # worker, queue and store stats are sampled now and then: a step without them keeps the last
        kept = tuple(p for p in self.latest if p.name.startswith(SAMPLED)) if not _sampled(points) else ()
        self.latest = (Point("step", (), float(step)), *points, *kept)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        families: dict[str, Any] = {}
        for p in self.latest:
            family = families.get(p.name)
            if family is None:
                labels = ["run", *(k for k, _ in p.labels)]
                family = GaugeMetricFamily(PREFIX + p.name, HELP.get(p.name, p.name), labels=labels)
                families[p.name] = family
            family.add_metric([self.run_name, *(v for _, v in p.labels)], p.value)
        yield from families.values()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


SAMPLED = ("worker_", "queue_", "store_")


def _sampled(points: list[Point]) -> bool:
    return any(p.name.startswith(SAMPLED) for p in points)


def serve(registry: Any, host: str, port: int) -> tuple[Any, Any]:
    from prometheus_client import start_http_server

    try:
        return start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise ConfigError(
            f"logging.prometheus_port = {port}: cannot serve /metrics on {host}:{port} ({e.strerror}); "
            "pick a free port (another run may hold this one), or set logging.prometheus_port: 0"
        ) from None


HELP = {  # what the main metrics mean (the rest are named after their metrics.jsonl key)
    "step": "The last step trained (= policy version published).",
    "samples_per_s": "Samples trained per second of the run so far.",
    "tokens_per_s": "Response tokens trained per second of the run so far.",
    "reward_mean": "Mean reward of the step's samples.",
    "reward_component": "Mean of one reward component over the step's samples.",
    "staleness_samples": "Samples of the step by staleness (trainer version - sample version).",
    "is_weight_mean": "Mean behaviour importance weight of the step's tokens.",
    "mismatch_kl": "KL between the behaviour log-probs (rollout) and the trainer's log-probs.",
    "trainer_idle_frac": "Fraction of the run the trainer spent waiting for samples.",
    "worker_idle_frac": "Fraction of a role's time spent waiting for work.",
    "queue_ready_rows": "Rows in the store ready for a consumer.",
    "step_time_seconds": "Seconds a role spent in a span within the step.",
    "publish_bytes": "Bytes of weights the trainer published at the step.",
    "publish_s": "Seconds the trainer took to publish the step's weights.",
    "worker_engine_tokens_per_s": "Tokens the rollout engines generated per busy second.",
    "worker_engine_optimal_pct": "Rollout tokens/s as % of the bound matmul FLOP/s / 2 params, engine mean.",
    "worker_engine_optimal_pct_min": "Rollout % of optimal of the worst engine.",
    "store_bytes": "Bytes of row data the store holds.",
    "store_leased_rows": "Rows leased to consumers and not acknowledged yet.",
    "restarts": "Restarts of the run after a trainer rank died.",
}
