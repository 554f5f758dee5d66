"""The calculator example end to end: held-out success before and after RL, sync vs async.

Runs examples/calculator.yaml (multi-turn episodes: the tiny model must call the calculator tool to
multiply two 3-digit numbers) once per mode and seed, each a fresh run in this process (real Ray
actors: rollout, reward, trainer and the environment's own actor), and prints one row per run:
success on 256 held-out products before and after RL (one episode each at temperature 1), RL
seconds, samples/s and model tokens per sample; `async-no-tool` is the control without the tool.

    .venv/bin/python benchmarks/calculator_example.py --json docs/bench-calculator.json
    .venv/bin/python benchmarks/calculator_example.py --modes async --seeds 0 1 2 --steps 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# The control: the same model and budget without the tool (one turn, the product answered directly).
NO_TOOL = ["env.source=null", "task.reward=asyncflow.envs.arithmetic:direct", "rollout.max_new_tokens=8"]


def run(out: Path, mode: str, seed: int, steps: int) -> dict:
    from asyncflow.config import load_config
    from asyncflow.recipes.grpo import train
    from asyncflow.rundir import RunDir

    overrides = [
        f"output_dir={out}", f"seed={seed}", f"trainer.steps={steps}", "trainer.checkpoint_every=0",
        f"mode={mode.removesuffix('-no-tool')}", f"dataplane.name=calculator-{mode}-{seed}",
        *(NO_TOOL if mode.endswith("-no-tool") else []),
    ]  # fmt: skip
    summary = train(load_config(ROOT / "examples" / "calculator.yaml", overrides), display=False)
    metrics = RunDir(summary["run_dir"]).metrics()
    return {
        "mode": mode,
        "seed": seed,
        "steps": steps,
        "success_before": summary["eval_reward_before"],
        "success_after": summary["eval_reward_after"],
        "seconds": summary["seconds"],
        "samples_per_s": summary["samples_per_s"],
        "train_reward_last": statistics.mean(m["reward_mean"] for m in metrics[-max(1, steps // 10) :]),
        "model_tokens_per_sample": statistics.mean(m["response_len"] for m in metrics),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--modes", nargs="+", default=["sync", "async"], choices=["sync", "async", "async-no-tool"]
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--json", default="", help="write the rows here")
    args = ap.parse_args()
    import ray

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=4, include_dashboard=False)
        for mode in args.modes:
            for seed in args.seeds:
                rows.append(run(Path(tmp) / "runs", mode, seed, args.steps))
                print(json.dumps(rows[-1]), flush=True)
                if args.json:  # rows written as they land
                    Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        ray.shutdown()
    print(f"\n{'mode':6} {'seed':>4} {'steps':>5} {'success before':>14} {'success after':>13} {'RL s':>6} "
          f"{'samples/s':>9} {'model tokens':>12}")  # fmt: skip
    for r in rows:
        print(f"{r['mode']:6} {r['seed']:>4} {r['steps']:>5} {r['success_before']:>14.3f} "
              f"{r['success_after']:>13.3f} {r['seconds']:>6.0f} {r['samples_per_s']:>9.0f} "
              f"{r['model_tokens_per_sample']:>12.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
