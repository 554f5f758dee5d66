"""Metrics benchmark: what each live sink costs the run per step, and what `asyncflow report`
costs per page.

The run writes each sink in its driver, between steps. This times `Exporters.write` of a
metrics line shaped like the sorting example's (trainer statistics, staleness, worker and
queue stats, store stats, time breakdown: about 50 points), one sink at a time, over
`--steps` steps (median and p99 microseconds per step), a Prometheus scrape of it, and
`page.render` of `--runs` run directories of `--steps` steps each.

    .venv/bin/python benchmarks/metrics.py [--steps 500] [--runs 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asyncflow.config import load_config  # noqa: E402
from asyncflow.exporters import Exporter, Exporters  # noqa: E402
from asyncflow.rundir import RunDir  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sort.yaml"


def line(step: int, rng: random.Random) -> dict:
    """A metrics line with the keys and nesting a run writes."""
    trainer = ["reward_mean", "response_len", "clip_fraction", "ratio_mean", "is_weight_mean",
               "is_weight_max", "is_truncated_fraction", "approx_kl", "mismatch_kl", "logprob_diff_max",
               "loss", "grad_norm", "publish_s", "wait_s", "step_s", "samples_per_s", "tokens_per_s",
               "reward_avg10", "trainer_idle_frac"]  # fmt: skip
    return {
        "step": step, "version": step, "samples": 128, "tokens": 700, "publish_bytes": 532736,
        "elapsed_s": 0.1 * step, "restarts": 0, **{k: rng.random() for k in trainer},
        "staleness": {"0": 64, "1": 64},
        **{f"time/{role}/{span}": rng.random() for role, span in
           [("rollout", "generate"), ("reward", "score"), ("trainer", "wait"), ("trainer", "train"),
            ("trainer", "sync")]},
        "workers": {
            "rollout": {"idle_frac": 0.2, "busy_s": 1.0, "samples": 256 * step, "tokens": 1400 * step,
                        "engine_tokens_per_s": 5000.0, "weight_syncs": step, "weight_sync_s": 0.01 * step},
            "reward": {"idle_frac": 0.8, "busy_s": 0.2, "samples": 256 * step, "failures": 0},
            "queues": {"rollout": 64, "reward": 0, "trainer": 128},
        },
        "store": {"rows": 300, "leased_rows": 128, "bytes": 1 << 20},
    }  # fmt: skip


def sinks(run_dir: Path) -> dict[str, Exporter]:
    from asyncflow.exporters import prometheus, ray_metrics, tensorboard, wandb

    return {
        "prometheus": prometheus.Prometheus("127.0.0.1", 0, "bench"),
        "ray_metrics": ray_metrics.RayMetrics("bench"),
        "tensorboard": tensorboard.TensorBoard(run_dir / "tensorboard"),
        "wandb (offline)": wandb.WandB(run_dir, "bench", "offline", {}),
    }


def time_sinks(steps: int, run_dir: Path) -> dict[str, dict[str, float]]:
    rng, figures = random.Random(0), {}
    lines = [line(s, rng) for s in range(1, steps + 1)]
    for name, sink in sinks(run_dir).items():
        exporters, times = Exporters([sink]), []
        for m in lines:
            start = time.perf_counter()
            exporters.write(m)
            times.append((time.perf_counter() - start) * 1e6)
        if name == "prometheus":
            import urllib.request

            start = time.perf_counter()
            urllib.request.urlopen(f"http://127.0.0.1:{sink.port}/metrics").read()  # type: ignore[attr-defined]
            figures["prometheus scrape"] = {"median_us": (time.perf_counter() - start) * 1e6, "p99_us": 0.0}
        exporters.close()
        times.sort()
        figures[name] = {"median_us": statistics.median(times), "p99_us": times[int(0.99 * (len(times) - 1))]}
    return figures


def time_report(steps: int, runs: int, out: Path) -> dict[str, float]:
    from asyncflow import page

    rng, dirs = random.Random(1), []
    for i in range(runs):
        run = RunDir.create(load_config(EXAMPLE, [f"output_dir={out}", f"run_name=bench{i}"]))
        for s in range(1, steps + 1):
            m = line(s, rng)
            if s % 5:
                m.pop("workers"), m.pop("store")  # worker stats are sampled about once a second
            run.log(m)
        dirs.append(run.path)
    start = time.perf_counter()
    html = page.render(dirs)
    return {"render_s": time.perf_counter() - start, "page_kib": len(html.encode()) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=500, help="steps written to each sink and per run")
    parser.add_argument("--runs", type=int, default=2, help="run directories on the report page")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)  # ray_metrics records through it
    with tempfile.TemporaryDirectory() as tmp:
        figures: dict = {"sinks": time_sinks(args.steps, Path(tmp) / "sinks")}
        figures["report"] = time_report(args.steps, args.runs, Path(tmp) / "runs")
    ray.shutdown()
    print(f"{'sink (per step, ~50 points)':<30}{'median us':>12}{'p99 us':>12}")
    for name, f in figures["sinks"].items():
        print(f"{name:<30}{f['median_us']:>12.0f}{f['p99_us']:>12.0f}")
    r = figures["report"]
    print(
        f"report page, {args.runs} runs x {args.steps} steps: {r['render_s']:.3f} s, {r['page_kib']:.0f} KiB"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
