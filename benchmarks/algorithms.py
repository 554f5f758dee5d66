"""Each policy objective and advantage estimator on the sort example: held-out success before and
after the same number of async steps, several seeds, one Ray instance.

    .venv/bin/python benchmarks/algorithms.py --steps 150 --seeds 0,1 --json docs/bench-algorithms.json
    .venv/bin/python benchmarks/algorithms.py --algorithms gspo,cispo --steps 50 --seeds 0   # quick look

An algorithm is a set of `--set` overrides of examples/sort.yaml (ALGORITHMS below); the rest of
the example (model, warm-start, task, staleness k = 1, decoupled correction) is shared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asyncflow.config import load_config  # noqa: E402
from asyncflow.recipes.grpo import train  # noqa: E402
from asyncflow.rundir import RunDir  # noqa: E402
from asyncflow.workflow import cpus_needed  # noqa: E402

ALGORITHMS: dict[str, list[str]] = {
    "grpo": [],
    "drgrpo": ["trainer.estimator=drgrpo", "trainer.loss_agg=seq-mean-token-sum"],
    "rloo": ["trainer.estimator=rloo"],
    "reinforce++": ["trainer.estimator=reinforce++"],
    "dapo-clip": ["trainer.clip_eps_high=0.28", "reward.overlong_buffer=2"],
    "gspo": [
        "trainer.objective=gspo",
        "trainer.clip_eps=3e-4",
        "trainer.clip_eps_high=4e-4",
        "trainer.loss_agg=seq-mean-token-mean",
    ],  # fmt: skip
    "cispo": ["trainer.objective=cispo", "trainer.clip_eps=0.9", "trainer.clip_eps_high=0.28"],
    "dynamic-sampling": ["trainer.dynamic_sampling=true"],
    "dapo": ["trainer.clip_eps_high=0.28", "trainer.loss_agg=token-mean", "trainer.dynamic_sampling=true"],
    "ppo": ["trainer.estimator=gae", "trainer.critic={lr: 2.0e-3}"],  # GAE from a learned critic
    "ppo-lam1": ["trainer.estimator=gae", "trainer.critic={lr: 2.0e-3, lam: 1.0}"],  # critic as a baseline
}


def run(algorithm: str, seed: int, steps: int, out: Path) -> dict:
    store = f"alg-{algorithm.replace('+', 'p')}-{seed}"  # a store name has no '+'
    overrides = [f"output_dir={out}", f"seed={seed}", f"trainer.steps={steps}", "trainer.checkpoint_every=0",
                 f"dataplane.name={store}", *ALGORITHMS[algorithm]]  # fmt: skip
    summary = train(load_config(ROOT / "examples" / "sort.yaml", overrides), display=False)
    metrics = RunDir(summary["run_dir"]).metrics()
    return {"algorithm": algorithm, "seed": seed, "before": summary["eval_reward_before"],
            "after": summary["eval_reward_after"], "seconds": summary["seconds"],
            "admitted_prompts": summary["admitted_prompts"],  # a dropped group is replaced by one more
            "dropped_groups": sum(m.get("dropped_groups", 0) for m in metrics),
            "uniform_groups_trained": sum(m["uniform_groups"] for m in metrics),
            **critic_figures(metrics)}  # fmt: skip


def critic_figures(metrics: list[dict]) -> dict:
    """With a learned critic: its value loss over the first and last tenth of the steps, and its
    explained variance over the last tenth (medians); nothing for group estimators."""
    if "value_loss" not in metrics[0]:
        return {}
    tenth = max(1, len(metrics) // 10)
    first, last = metrics[:tenth], metrics[-tenth:]
    ev = [m["explained_variance"] for m in last if m["explained_variance"] == m["explained_variance"]]
    return {"value_loss_first": statistics.median(m["value_loss"] for m in first),
            "value_loss_last": statistics.median(m["value_loss"] for m in last),
            "explained_variance_last": statistics.median(ev) if ev else float("nan")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated names")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    names = args.algorithms.split(",")
    rows = sweep(parser, run, names, ALGORITHMS, args.seeds, args.steps, args.json)
    print(
        f"\n| algorithm | eval before (per seed) | eval after {args.steps} steps (per seed) | median gain "
        "| prompts admitted | groups dropped | uniform groups trained | seconds |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        mine = [r for r in rows if r["algorithm"] == name]
        before = " / ".join(f"{r['before']:.3f}" for r in mine)
        after = " / ".join(f"{r['after']:.3f}" for r in mine)
        gain = statistics.median(r["after"] - r["before"] for r in mine)
        costs = ("admitted_prompts", "dropped_groups", "uniform_groups_trained", "seconds")
        per_seed = " | ".join(" / ".join(str(r[k]) for r in mine) for k in costs)
        print(f"| {name} | {before} | {after} | {gain:+.3f} | {per_seed} |")
    critics = [r for r in rows if "value_loss_last" in r]
    if critics:
        header = "| algorithm | seed | value loss, first 10 % | last 10 % | explained variance, last 10 % |"
        print(f"\n{header}")
        print("| --- | --- | --- | --- | --- |")
        for r in critics:
            loss = f"{r['value_loss_first']:.4f} | {r['value_loss_last']:.4f}"
            print(f"| {r['algorithm']} | {r['seed']} | {loss} | {r['explained_variance_last']:.3f} |")


def sweep(
    parser: argparse.ArgumentParser, run: Callable[[str, int, int, Path], dict], names: list[str],
    known: dict, seeds: str, steps: int, out: Path | None,
) -> list[dict]:  # fmt: skip
    """`run(name, seed, steps, dir)` for every seed, then every name, on one Ray instance sized for
    the sort example; each row is printed, and written to `out` as it lands (a run cut short
    keeps what finished)."""
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown name(s) {unknown}; expected some of {list(known)}")
    example = load_config(ROOT / "examples" / "sort.yaml", [])
    ray.init(num_cpus=max(2, round(cpus_needed(example) + 0.5)), include_dashboard=False, log_to_driver=False)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in seeds.split(",")):
            for name in names:
                rows.append(run(name, seed, steps, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
                if out:
                    out.write_text(json.dumps({"steps": steps, "runs": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
