"""Learning at high staleness: the sort example in sync mode and async at k = 1, 2, 4, with and
without each off-policy remedy, several seeds, one Ray instance; held-out success after the
same number of steps, and the per-step diagnostics that say where a stale run loses.

    .venv/bin/python benchmarks/staleness.py --steps 500 --seeds 0,1 --json docs/bench-staleness.json
    .venv/bin/python benchmarks/staleness.py --runs sync,k4,k4-icepop --steps 100 --seeds 0   # quick look

A run is a set of `--set` overrides of examples/sort.yaml (RUNS below). The diagnostics are the
means over the run's steps of what the trainer logs (metrics.jsonl): the share of tokens PPO's
clip holds, of weights truncated at is_cap, of tokens is_mask drops, the importance weights'
effective sample size, the sampler/trainer KL, and the samples' mean lag.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asyncflow.config import load_config  # noqa: E402
from asyncflow.recipes.grpo import train  # noqa: E402
from benchmarks.algorithms import sweep  # noqa: E402

ICEPOP = ["trainer.is_mask=[0.5,5]"]
RUNS: dict[str, list[str]] = {
    "sync": ["mode=sync", "staleness=0"],
    "k1": ["staleness=1"],
    "k2": ["staleness=2"],
    "k4": ["staleness=4"],
    "k4-icepop": ["staleness=4", *ICEPOP],
    "k4-none": ["staleness=4", "trainer.correction=none"],  # no off-policy correction at all
    "k4-ahead1": ["staleness=4", "admit_ahead=1"],  # admission on demand: no lag that buys nothing
    "k2-ahead1": ["staleness=2", "admit_ahead=1"],
}
DIAGNOSTICS = ("clip_fraction", "is_truncated_fraction", "is_masked_fraction", "is_ess", "mismatch_kl")


def lag(histogram: dict) -> float:
    """The mean lag of a step's samples, from its staleness histogram ({lag: samples})."""
    total = sum(histogram.values())
    return sum(int(k) * v for k, v in histogram.items()) / total if total else 0.0


def diagnostics(run_dir: Path) -> dict[str, float]:
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps = [m for m in steps if "staleness" in m]
    out = {key: statistics.fmean(m.get(key, 0.0) for m in steps) for key in DIAGNOSTICS}
    out["mean_lag"] = statistics.fmean(lag(m["staleness"]) for m in steps)
    return out


def run(name: str, seed: int, steps: int, out: Path) -> dict:
    overrides = [f"output_dir={out}", f"seed={seed}", f"trainer.steps={steps}", "trainer.checkpoint_every=0",
                 f"dataplane.name=stale-{name}-{seed}", *RUNS[name]]  # fmt: skip
    summary = train(load_config(ROOT / "examples" / "sort.yaml", overrides), display=False)
    return {"run": name, "seed": seed, "before": summary["eval_reward_before"],
            "after": summary["eval_reward_after"], "seconds": summary["seconds"],
            **diagnostics(Path(summary["run_dir"]))}  # fmt: skip


def table(rows: list[dict], steps: int) -> str:
    lines = [
        f"| run | eval after {steps} steps (per seed) | median | mean lag | clipped | truncated | masked "
        "| ESS | mismatch KL |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == name]

        def med(key: str, rows: list[dict] = mine) -> float:
            return statistics.median(r[key] for r in rows)

        after = " / ".join(f"{r['after']:.3f}" for r in mine)
        lines.append(
            f"| {name} | {after} | {med('after'):.3f} | {med('mean_lag'):.2f} | {med('clip_fraction'):.3f} "
            f"| {med('is_truncated_fraction'):.3f} | {med('is_masked_fraction'):.3f} | {med('is_ess'):.3f} "
            f"| {med('mismatch_kl'):.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {list(RUNS)}")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    rows = sweep(parser, run, args.runs.split(","), RUNS, args.seeds, args.steps, args.json)
    print("\n" + table(rows, args.steps))


if __name__ == "__main__":
    main()
