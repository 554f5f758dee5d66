"""The math example end to end: held-out accuracy before and after RL, speed and bytes per update,
for the torch engine, vLLM and LoRA, over seeds.

Makes the example's inputs once (examples/make_math.py: a Qwen2-shaped checkpoint with a BPE
tokenizer and chat template, pre-trained briefly on `#### n` word problems, JSON-lines data), then
runs examples/math.yaml once per variant and seed, each a fresh run in this process (real Ray
actors), and prints one row per run: eval accuracy before and after (256 held-out problems, one
sample each at temperature 1), RL seconds, samples/s, tokens/s and the mean bytes a weight update
moved.

    .venv/bin/python benchmarks/math_example.py --json docs/bench-math.json
    .venv/bin/python benchmarks/math_example.py --variants torch --seeds 0 1 2 --steps 300
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "torch": [],
    "vllm": ["rollout.engine=vllm"],
    "lora": [
        "trainer.trainable={lora: {rank: 16, alpha: 32, targets: [q_proj, k_proj, v_proj, o_proj]}}",
        "trainer.lr=5.0e-4",
    ],  # fmt: skip
}


def run(inputs: Path, out: Path, variant: str, seed: int, steps: int) -> dict:
    from asyncflow.config import load_config
    from asyncflow.recipes.grpo import train
    from asyncflow.rundir import RunDir

    overrides = [
        f"output_dir={out}", f"seed={seed}", f"trainer.steps={steps}", f"model.path={inputs / 'model'}",
        f"task.options.path={inputs / 'train.jsonl'}", f"task.options.eval_path={inputs / 'eval.jsonl'}",
        f"dataplane.name=math-{variant}-{seed}", "trainer.checkpoint_every=0", *VARIANTS[variant],
    ]  # fmt: skip
    summary = train(load_config(ROOT / "examples" / "math.yaml", overrides), display=False)
    metrics = RunDir(summary["run_dir"]).metrics()
    return {
        "variant": variant,
        "seed": seed,
        "steps": steps,
        "eval_before": summary["eval_reward_before"],
        "eval_after": summary["eval_reward_after"],
        "seconds": summary["seconds"],
        "samples_per_s": summary["samples_per_s"],
        "tokens_per_s": summary["tokens_per_s"],
        "update_bytes": statistics.mean(m["publish_bytes"] for m in metrics[1:]),
        "publish_s": statistics.median(m["publish_s"] for m in metrics),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--inputs", default="", help="made inputs to reuse (default: make them in a temp dir)")
    ap.add_argument("--json", default="", help="write the rows here")
    args = ap.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(args.inputs or Path(tmp) / "inputs")
        if not (inputs / "model").is_dir():
            subprocess.run([sys.executable, str(ROOT / "examples" / "make_math.py"), "--out", str(inputs)],
                           check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        ray.init(num_cpus=4, include_dashboard=False)
        rows = []
        for variant in args.variants:
            for seed in args.seeds:
                rows.append(run(inputs, Path(tmp) / "runs", variant, seed, args.steps))
                print(json.dumps(rows[-1]), flush=True)
        ray.shutdown()
    head = f"{'variant':8} {'seed':>4} {'eval before':>11} {'eval after':>10} {'RL s':>6} {'samples/s':>9} "
    print("\n" + head + f"{'tokens/s':>8} {'bytes/update':>12} {'publish s':>9}")
    for r in rows:
        print(f"{r['variant']:8} {r['seed']:>4} {r['eval_before']:>11.3f} {r['eval_after']:>10.3f} "
              f"{r['seconds']:>6.0f} {r['samples_per_s']:>9.0f} {r['tokens_per_s']:>8.0f} "
              f"{r['update_bytes']:>12,.0f} {r['publish_s']:>9.4f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
