"""End-to-end RL benchmark: synchronous GRPO beside asynchronous GRPO at staleness k = 1, 2, 4.

Same task, model, seed and number of steps (so the same number of samples) for every system,
in one invocation and one Ray instance. The task is digit sorting with long-tailed list
lengths (2 to 16 digits, Pareto(1.2)), so a few responses are many times longer than the
rest and hold up every synchronous batch. Each run is `asyncflow.recipes.grpo.train`.

Two modes:

  real       the torch engine, on this machine. The trainer and the rollout worker each
             run one torch thread, so in async mode each has a core of its own; in sync
             mode the phases alternate on one core at a time.
  simulated  the real store, source, reward, trainer and weight store as Ray actors, with
             16+ rollout workers whose engine is a cost model (services.serving.simulated:
             heavy-tailed generation times spent in asyncio.sleep) and a trainer whose step
             costs an extra sleep per 1000 tokens. Responses are random tokens, so the
             reward stays ~0: this mode measures scheduling, not learning.

    .venv/bin/python benchmarks/e2e.py --repeats 3 --steps 200 --json docs/bench-e2e.json
    .venv/bin/python benchmarks/e2e.py --mode simulated --workers 16,32 --steps 60 --repeats 1 \\
        --json docs/bench-e2e-sim.json
    .venv/bin/python benchmarks/e2e.py --mode simulated --workers 4 --groups-per-call 8 --batch-prompts 8 \
        --systems sync,async-k1 --steps 30 --repeats 1   # several groups per engine call
    .venv/bin/python benchmarks/e2e.py --systems sync,async-k2 --steps 50 --repeats 1   # quick look
    .venv/bin/python benchmarks/e2e.py --peers trl --systems sync,async-k1 --steps 500 --repeats 1
    .venv/bin/python benchmarks/e2e.py --peers trl --size large --systems sync,async-k1 --steps 20 \
        --snapshot-every 10 --repeats 1 --warm-start /tmp/warm-large   # the larger model
    .venv/bin/python benchmarks/e2e.py --peers trl --systems trl,async-k1,async-k1+reward.isolation=thread \
        --steps 100 --repeats 2   # SYSTEM+key=value: a config override, measured beside its base

With --peers trl: TRL's GRPOTrainer beside the AsyncFlow systems, all on examples/sort.yaml (or
--size large) from one shared warm-started checkpoint, with eval at equal steps and at equal
wall time (benchmarks/peers/trl_grpo.py says how the two are made the same), the load average at
each system's start and end, and CPU ms per sample of every process of each system (the figure
that holds on a shared machine). --size medium / large: a larger model on longer lists;
--warm-start DIR keeps the shared warm-start (minutes for large) for later runs.

samples/s and tokens/s count trained samples and their response tokens over the RL loop
(from the first step's start to the last step's end; warm-start and evals excluded).
Trainer idle: 1 - (time inside optimizer steps, not waiting for data) / loop time.
Rollout idle: 1 - (time rollout workers spent generating and writing) / (workers x loop time).
The step breakdown (ms per step) sums every span of trace.json over the run: the trainer's step and
its parts, which add up to it ("other" is the Python between them), and the other roles' spans.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asyncflow.config import AsyncFlowConfig, load_config, parse_config  # noqa: E402
from asyncflow.recipes.grpo import train  # noqa: E402
from asyncflow.workflow import cpus_needed  # noqa: E402
from benchmarks.peers import trl_grpo  # noqa: E402
from benchmarks.steps import breakdown, breakdown_table  # noqa: E402

SYSTEMS = {"sync": ("sync", 0), "async-k1": ("async", 1), "async-k2": ("async", 2), "async-k4": ("async", 4)}


def real_config(system: str, steps: int, seed: int, sync_threads: int) -> dict[str, Any]:
    mode, k = SYSTEMS[system]
    threads = sync_threads if mode == "sync" else 1  # async: one core each for trainer and rollout
    return {
        "mode": mode,
        "staleness": k,
        "seed": seed,
        "model": {"hidden_size": 64, "intermediate_size": 256, "num_layers": 2, "num_heads": 2,
                  "max_positions": 48},
        "task": {"options": {"min_digits": 2, "max_digits": 16, "lengths": "long_tail"}, "eval_prompts": 256},
        "warmup": {"steps": 70, "batch_size": 64, "lr": 1.0e-3},
        "rollout": {"num_workers": 1, "n": 8, "groups_per_call": 16, "max_new_tokens": 17,
                    "torch_threads": threads},
        "reward": {"num_workers": 1},
        "trainer": {"steps": steps, "batch_prompts": 16, "lr": 2.0e-4, "torch_threads": threads},
        "dataplane": {"stale_policy": "regenerate", "capacity_rows": 4096},
    }  # fmt: skip


def simulated_config(system: str, steps: int, seed: int, workers: int, args: argparse.Namespace) -> dict:
    mode, k = SYSTEMS[system]
    return {
        "mode": mode,
        "staleness": k,
        "seed": seed,
        # A tiny policy: the trainer's real compute is small beside its simulated cost.
        "model": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 1,
                  "max_positions": args.max_new_tokens + 24},
        "task": {"options": {"min_digits": 2, "max_digits": 16, "lengths": "long_tail"}, "eval_prompts": 0},
        "rollout": {
            "engine": "simulated", "num_workers": workers, "n": 8, "groups_per_call": args.groups_per_call,
            "max_new_tokens": args.max_new_tokens, "num_cpus": 0.05,
            "simulated": {"time_per_token_s": args.time_per_token_s, "min_tokens": args.min_tokens,
                          "alpha": args.alpha},
        },
        "reward": {"num_workers": 1},
        "trainer": {"steps": steps, "batch_prompts": args.batch_prompts or workers,
                    "simulated_step_s_per_ktoken": args.step_s_per_ktoken},
        "dataplane": {"stale_policy": "regenerate", "capacity_rows": 16384},
    }  # fmt: skip


def figures(summary: dict, config: AsyncFlowConfig) -> dict[str, Any]:
    """The benchmark's figures of one run, from its summary and metrics.jsonl."""
    metrics = [
        json.loads(line) for line in Path(summary["run_dir"], "metrics.jsonl").read_text().splitlines()
    ]
    loop_s = metrics[-1]["elapsed_s"]
    trainer_busy = sum(m["step_s"] - m["wait_s"] for m in metrics)
    rollout_busy = metrics[-1]["workers"]["rollout"]["busy_s"]
    # From the end of step 1 on: without the workers' start-up (16+ actors booting on 2 cores
    # can take 20 s) and, in async mode, without filling the pipeline.
    steady_s = loop_s - metrics[0]["elapsed_s"]
    return {
        "samples_per_s": summary["samples_per_s"],
        "steady_samples_per_s": sum(m["samples"] for m in metrics[1:]) / steady_s,
        "tokens_per_s": summary["tokens_per_s"],
        "eval_reward_before": summary["eval_reward_before"],
        "eval_reward_after": summary["eval_reward_after"],
        "reward_last_10pct": summary["reward_last_10pct"],
        "trainer_idle": 1 - trainer_busy / loop_s,
        "rollout_idle": 1 - rollout_busy / (loop_s * config.rollout.num_workers),
        "step_s_median": statistics.median(m["step_s"] for m in metrics),
        "wait_s_median": statistics.median(m["wait_s"] for m in metrics),
        # The same work in every system: how much longer it takes shows how much CPU it got.
        "train_s_median": statistics.median(m["step_s"] - m["wait_s"] for m in metrics),
        "rollout_ms_per_sample": 1000 * rollout_busy / metrics[-1]["workers"]["rollout"]["samples"],
        "loop_s": loop_s,
        "samples": sum(m["samples"] for m in metrics),
        "staleness_histogram": summary["staleness_histogram"],
        "breakdown": breakdown(Path(summary["run_dir"]), len(metrics)) if config.trace.enabled else {},
    }


def collect(root: Path) -> dict[str, dict[str, list[dict]]]:
    """Figures of finished runs, from their run directories (named e2e-{system}-{workers}-{repeat})."""
    runs: dict[str, dict[str, list[dict]]] = {}
    for path in sorted(root.glob("e2e-*/summary.json")):
        config = load_config(path.parent / "config.yaml")
        system, group = config.run_name.split("-")[1:-2], config.run_name.split("-")[-2]
        result = figures(json.loads(path.read_text()) | {"run_dir": str(path.parent)}, config)
        runs.setdefault(group, {}).setdefault("-".join(system), []).append(result)
    return {g: {s: per[s] for s in SYSTEMS if s in per} for g, per in runs.items()}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-figure medians over repeats; the staleness histogram is summed."""
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if key == "breakdown":
            out[key] = {k: statistics.median(r[key].get(k, 0.0) for r in runs) for k in value}
        elif key == "staleness_histogram":
            hist: dict[str, int] = {}
            for r in runs:
                for lag, count in r[key].items():
                    hist[lag] = hist.get(lag, 0) + count
            out[key] = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
        elif value is not None:
            out[key] = statistics.median(r[key] for r in runs)
        else:
            out[key] = None
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| system | samples/s | tokens/s | vs sync | samples/s from step 2 | vs sync | eval reward after "
        "| train reward, last 10% | trainer idle | rollout idle | train s/step | rollout ms/sample "
        "| staleness histogram (lag: samples) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for group, per in results.items():
        sync = per.get("sync")
        for system, r in per.items():
            ratio = f"{r['samples_per_s'] / sync['samples_per_s']:.2f}x" if sync else ""
            steady = f"{r['steady_samples_per_s'] / sync['steady_samples_per_s']:.2f}x" if sync else ""
            after = "" if r["eval_reward_after"] is None else f"{r['eval_reward_after']:.3f}"
            hist = ", ".join(f"{k}: {v}" for k, v in r["staleness_histogram"].items())
            lines.append(
                f"| {group}{system} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {ratio} "
                f"| {r['steady_samples_per_s']:.1f} | {steady} | {after} "
                f"| {r['reward_last_10pct']:.3f} | {r['trainer_idle']:.0%} | {r['rollout_idle']:.0%} "
                f"| {r['train_s_median']:.3f} | {r['rollout_ms_per_sample']:.2f} | {hist} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["real", "simulated"], default="real")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {list(SYSTEMS)}")
    parser.add_argument("--steps", type=int, help="RL steps per run (default: real 200, simulated 40)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per system; figures are medians")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sync-threads", type=int, default=1, help="torch threads of trainer and rollout in sync"
    )
    parser.add_argument(
        "--workers", default="16,32", help="simulated: rollout worker counts (comma-separated)"
    )
    parser.add_argument(
        "--time-per-token-s", type=float, default=0.005, help="simulated decode time per token"
    )
    parser.add_argument(
        "--min-tokens", type=int, default=8, help="simulated: Pareto scale of response lengths"
    )
    parser.add_argument(
        "--alpha", type=float, default=1.5, help="simulated: Pareto shape of response lengths"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="simulated: response length cap")
    parser.add_argument("--step-s-per-ktoken", type=float, default=0.1, help="simulated trainer cost")
    parser.add_argument(
        "--groups-per-call", type=int, default=1, help="simulated: prompt groups per rollout engine call"
    )
    parser.add_argument(
        "--batch-prompts", type=int, default=0, help="simulated: groups per training step (0: one per worker)"
    )
    parser.add_argument(
        "--worker-niceness", type=int, default=0,
        help="niceness of Ray's worker processes (Ray's default is 15, which starves them behind any "
        "other load on a shared machine)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--peers", choices=["trl"], help="run the peers' comparison on the sort example instead (real mode)"
    )
    trl_grpo.add_arguments(parser)
    parser.add_argument(
        "--from-runs",
        type=Path,
        help="run nothing: tabulate the run directories under this one (with --mode)",
    )
    args = parser.parse_args(argv)
    if args.peers == "trl":
        args.systems = ",".join(["trl", *(s for s in args.systems.split(",") if s != "trl")])
        args.steps = args.steps or 500
        trl_grpo.compare(args)
        return 0
    systems = args.systems.split(",")
    steps = args.steps or (200 if args.mode == "real" else 40)
    groups = [0] if args.mode == "real" else [int(w) for w in args.workers.split(",")]
    out_dir = tempfile.mkdtemp(prefix="asyncflow-e2e-")

    def config(system: str, group: int, repeat: int) -> AsyncFlowConfig:
        if args.mode == "real":
            data = real_config(system, steps, args.seed, args.sync_threads)
        else:
            data = simulated_config(system, steps, args.seed, group, args)
        name = f"e2e-{system}-{group}-{repeat}"
        data.update(run_name=name, output_dir=out_dir)
        data["dataplane"]["name"] = name  # every run starts its own store in the one Ray instance
        return parse_config(data)

    runs = collect(args.from_runs) if args.from_runs else {}
    if args.from_runs:
        groups = []  # nothing to run
    else:
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)  # read by the raylet Ray starts
        need = max(cpus_needed(config(s, g, 0)) for s in systems for g in groups)
        ray.init(num_cpus=max(2, math.ceil(need)), include_dashboard=False, log_to_driver=False)
    try:
        for repeat in range(args.repeats):
            for group in groups:
                for system in systems:  # interleaved, so drift in the machine's load hits every system
                    cfg = config(system, group, repeat)
                    result = figures(train(cfg, display=False), cfg)
                    runs.setdefault(f"{group}", {}).setdefault(system, []).append(result)
                    r = result
                    print(
                        f"repeat {repeat} {'' if args.mode == 'real' else f'{group} workers '}{system}: "
                        f"{r['samples_per_s']:.1f} samples/s, trainer idle {r['trainer_idle']:.0%}, "
                        f"rollout idle {r['rollout_idle']:.0%}, reward after {r['eval_reward_after']}",
                        file=sys.stderr,
                    )  # fmt: skip
    finally:
        if ray.is_initialized():
            ray.shutdown()
    label = (lambda g: "") if args.mode == "real" else (lambda g: f"{g} workers, ")
    results = {label(int(g)): {s: median_of(r) for s, r in per.items()} for g, per in runs.items()}
    print(table(results))
    print("\nWhere a step goes (from trace.json; the trainer's parts add up to its step):\n")
    print(breakdown_table(results))
    if args.json:
        payload = {"mode": args.mode, "steps": steps, "repeats": args.repeats,
                   "args": vars(args) | {"json": None}, "results": results, "runs": runs}  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
