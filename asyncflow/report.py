"""A run's report: each step's metrics line, the live view's worker lines, the reward plot and
the summary. Reads the run directory; knows nothing about actors."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from asyncflow.config import AsyncFlowConfig
from asyncflow.exporters import open_exporters
from asyncflow.plot import line_chart
from asyncflow.rundir import RunDir


class Report:
    def __init__(self, config: AsyncFlowConfig, run: RunDir):
        self.config, self.run = config, run
        self.recent: deque[float] = deque(maxlen=10)
        self.samples = self.tokens = 0
        self.trainer_wait_s = 0.0  # time the trainer spent waiting for data
        self.started = time.perf_counter()
        self.workers: dict[str, str] = {}  # the live view's lines about workers
        self.restarts = 0  # of the whole run, after a trainer rank died
        self.exporters = open_exporters(config, run.path)  # the live sinks of `logging`

    def step(self, step: int, m: dict, workers: dict | None) -> dict:
        """Complete a step's metrics (rates, averages; `workers`: the pipeline's worker stats, when
        taken) and log the line."""
        self.samples += m["samples"]
        self.tokens += m["tokens"]
        self.trainer_wait_s += m["wait_s"]
        self.recent.append(m["reward_mean"])
        elapsed = time.perf_counter() - self.started
        m.update(
            step=step, elapsed_s=round(elapsed, 3), samples_per_s=self.samples / elapsed,
            tokens_per_s=self.tokens / elapsed, reward_avg10=sum(self.recent) / len(self.recent),
            trainer_idle_frac=self.trainer_wait_s / elapsed,
            staleness={str(k): v for k, v in m["staleness"].items()}, restarts=self.restarts,
        )  # fmt: skip
        if workers is not None:
            workers = dict(workers)
            if "store" in workers:
                m["store"] = workers.pop("store")  # rows, leased rows, bytes
            m["workers"] = workers
            self.workers = {
                **{
                    r: f"workers {v['workers']}  idle {v['idle_frac']:.0%}  samples {v['samples']}"
                    + (f"  failures {v['failures']}" if v.get("failures") else "")
                    + (f"  {v['engine_optimal_pct']:.1f}% of optimal" if v.get("engine_optimal_pct") else "")
                    for r, v in workers.items()
                    if r != "queues"
                },
                "queues (ready rows)": "  ".join(f"{k} {v}" for k, v in workers["queues"].items()),
            }
        self.run.log(m)
        self.exporters.write(m)
        return m

    def close(self) -> None:
        """Stop the live sinks (the /metrics endpoint, event files, the W&B run)."""
        self.exporters.close()

    def plot(self, before: float | None, after: float | None) -> None:
        """reward.svg: the training reward per step, its 10-step mean, and the held-out evals."""
        metrics = self.run.metrics()
        if not metrics:
            return
        series = {
            "train reward (step mean)": [(m["step"], m["reward_mean"]) for m in metrics],
            "train reward (10-step mean)": [(m["step"], m["reward_avg10"]) for m in metrics],
        }
        if before is not None and after is not None:
            series["held-out eval"] = [(metrics[0]["step"] - 1, before), (metrics[-1]["step"], after)]
        svg = line_chart(
            series, title=f"{self.config.run_name}: {self.config.mode}, k = {self.config.staleness}",
            x_label="step", y_label="reward",
        )  # fmt: skip
        (self.run.path / "reward.svg").write_text(svg)

    def summary(self, before: float | None, after: float | None, staleness: int, **more: Any) -> dict:
        metrics = self.run.metrics()
        first = metrics[: max(1, len(metrics) // 10)]
        last = metrics[-max(1, len(metrics) // 10) :]
        mean = lambda ms, k: sum(m[k] for m in ms) / len(ms)  # noqa: E731
        hist: dict[str, int] = {}
        for m in metrics:
            for k, v in m["staleness"].items():
                hist[k] = hist.get(k, 0) + v
        dynamic = self.config.trainer.dynamic_sampling  # groups consumed, never trained: in the summary
        summary = {
            "run_dir": str(self.run.path),
            "mode": self.config.mode,
            "staleness_k": staleness,
            "steps": len(metrics),
            "eval_reward_before": before,
            "eval_reward_after": after,
            "reward_first_10pct": mean(first, "reward_mean") if metrics else None,
            "reward_last_10pct": mean(last, "reward_mean") if metrics else None,
            "samples_per_s": metrics[-1]["samples_per_s"] if metrics else None,
            "tokens_per_s": metrics[-1]["tokens_per_s"] if metrics else None,
            "staleness_histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
            "seconds": round(time.perf_counter() - self.started, 2),
            "restarts": self.restarts,
            **({"dropped_groups": sum(m.get("dropped_groups", 0) for m in metrics)} if dynamic else {}),
            **more,
        }
        self.plot(before, after)
        self.run.write_summary(summary)
        return summary


def prompts_line(prompt_filter: dict) -> str:
    """What a data set dropped as too long for the model (pipeline.check's report), in one line."""
    dropped = prompt_filter["prompts_dropped"]
    counts = ", ".join(f"{n} {split}" for split, n in dropped.items()) or "none"
    return f"data set: prompts longer than {prompt_filter['max_prompt_tokens']} tokens dropped: {counts}"
