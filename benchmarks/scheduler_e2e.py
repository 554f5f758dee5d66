"""The rollout scheduler inside real RL runs: FCFS against the RL priority (and the plain engine).

`examples/calculator.yaml` (multi-turn episodes with a tool call, async k = 1) from one shared
warm-start, with `rollout.scheduler.policy` off (the plain torch engine), fcfs and rl, the
scheduled ones under a KV budget below what a step's episodes hold at once (so they preempt,
KV kept on the host), interleaved repeats in one Ray instance. Per run, from its metrics:

  samples/s        trained samples over the RL loop
  trainer idle     the trainer's wait for data over the loop (what a slow last group costs)
  mean lag         versions between a sample's policy and the step that trained it
  eval after       held-out success after RL (256 prompts, one episode each)
  % of optimal     the engine's tokens/s over this machine's bound (matmul FLOP/s / 2 params)

    .venv/bin/python benchmarks/scheduler_e2e.py --steps 40 --repeats 2 --json PATH
    .venv/bin/python benchmarks/scheduler_e2e.py --from-runs /tmp/asyncflow-sched-e2e-XXXX   # tabulate runs
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asyncflow.config import parse_config  # noqa: E402
from benchmarks.peers.trl_grpo import warm_start  # noqa: E402

POLICIES = ("off", "fcfs", "rl")


def config(base: dict, model_dir: str, policy: str, args: Any, name: str, out: str) -> Any:
    data = json.loads(json.dumps(base))
    data.update(run_name=name, output_dir=out, model={"path": model_dir})
    data["warmup"] = {"steps": 0}
    data["trainer"].update(steps=args.steps, checkpoint_every=0)
    data["rollout"]["scheduler"] = {"policy": policy, "kv_budget_tokens": args.kv_budget}
    data.setdefault("dataplane", {})["name"] = name
    return parse_config(data)


def figures(summary: dict) -> dict[str, float]:
    run = Path(summary["run_dir"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loop_s = metrics[-1]["elapsed_s"] - metrics[0]["elapsed_s"] + metrics[0]["step_s"]
    hist = {int(k): v for k, v in summary["staleness_histogram"].items()}
    rollout = [m.get("workers", {}).get("rollout", {}) for m in metrics]
    optimal = [v for r in rollout if math.isfinite(v := r.get("engine_optimal_pct") or float("nan"))]
    return {
        "samples_per_s": summary["samples_per_s"],
        "trainer_idle": sum(m["wait_s"] for m in metrics) / loop_s,
        "mean_lag": sum(k * v for k, v in hist.items()) / sum(hist.values()),
        "eval_after": summary["eval_reward_after"],
        "eval_before": summary["eval_reward_before"],
        "optimal_pct": statistics.median(optimal) if optimal else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--kv-budget", type=int, default=2000, help="KV tokens the scheduled engine may hold")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--from-runs", type=Path, help="run nothing: tabulate the sched-* runs under this directory"
    )
    args = p.parse_args(argv)
    runs = collect(args.from_runs) if args.from_runs else measure(args)
    keys = list(next(iter(runs.values()))[0])
    print("| policy | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for policy, per in runs.items():
        print(
            f"| {policy} | " + " | ".join(f"{statistics.median(r[k] for r in per):.3f}" for k in keys) + " |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": None}, "runs": runs}, indent=2, default=str)
        )
    return 0


def collect(root: Path) -> dict[str, list[dict]]:
    """Figures of finished runs (run directories sched-<policy>-<repeat>-<time>), by policy."""
    runs: dict[str, list[dict]] = {}
    for path in sorted(root.glob("sched-*/summary.json")):
        policy = path.parent.name.split("-")[1]
        runs.setdefault(policy, []).append(figures(json.loads(path.read_text())))
    return runs


def measure(args: Any) -> dict[str, list[dict]]:
    import ray

    from asyncflow.recipes.grpo import train

    base = yaml.safe_load((ROOT / "examples" / "calculator.yaml").read_text())
    out = tempfile.mkdtemp(prefix="asyncflow-sched-e2e-")
    model_dir = str(warm_start(parse_config(base), Path(out, "warm"), threads=1))
    runs: dict[str, list[dict]] = {}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        for repeat in range(args.repeats):
            for policy in args.policies.split(","):  # interleaved: the machine's drift hits each
                name = f"sched-{policy}-{repeat}"
                f = figures(train(config(base, model_dir, policy, args, name, out), display=False))
                runs.setdefault(policy, []).append(f)
                print(f"repeat {repeat} {policy}: {f}", file=sys.stderr)
    finally:
        ray.shutdown()
    return runs


if __name__ == "__main__":
    raise SystemExit(main())
