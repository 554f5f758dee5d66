"""The trainer's parallelism, measured on this machine: step time and learning of the sort
example on 1 and 2 trainer ranks, and the three parallelism services against the naive way.

Parts (each in a process of its own, one after another, so they do not share the CPU):

- ranks:   `asyncflow run examples/sort.yaml` with trainer.num_ranks = 1, then 2 (FSDP2 and DDP),
           same seed and steps: wall time, samples/s, median step and its parts (train =
           step - wait - publish), eval success before and after.
- balance: benchmarks/parallel_balance.py (equal counts vs token Karmarkar-Karp vs fitted cost
           over 2 gloo ranks: imbalance and idle of the fastest rank, per step).
- vocab:   benchmarks/parallel_vocab.py (peak memory and time of vocab-sharded log-probs vs dense).
- sync:    benchmarks/parallel_sync.py (publish -> every rollout worker switched, GB/s over 1, 2
           and 4 channels and several bucket sizes, against this machine's memcpy).

    .venv/bin/python benchmarks/parallel.py --json docs/bench-parallel.json          # ~25 min
    .venv/bin/python benchmarks/parallel.py --quick --parts ranks                     # ~3 min

CPU only, 2 cores, gloo: these are not GPU figures, and ranks that share 2 cores cannot run
faster than one rank; the 2-rank rows show the cost of the group, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("ranks", "balance", "vocab", "sync")
RANKS = [  # label, overrides
    ("1 rank", ["trainer.num_ranks=1"]),
    ("2 ranks FSDP2", ["trainer.num_ranks=2", "trainer.parallel=fsdp", "trainer.num_cpus=0.5"]),
    ("2 ranks DDP", ["trainer.num_ranks=2", "trainer.parallel=ddp", "trainer.num_cpus=0.5"]),
]


def run_example(overrides: list[str], steps: int, evals: int, out: Path) -> dict:
    """One run of the sort example; its summary and per-step medians."""
    args = [
        sys.executable, "-m", "asyncflow.cli", "run", str(ROOT / "examples" / "sort.yaml"), "--quiet",
        "--set", f"output_dir={out}", "--set", f"trainer.steps={steps}",
        "--set", f"task.eval_prompts={evals}",
        "--set", f"dataplane.name=bench-parallel-{time.monotonic_ns()}",
    ]  # fmt: skip
    for o in overrides:
        args += ["--set", o]
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(overrides)} failed:\n{done.stderr[-3000:]}")
    run_dir = max(out.iterdir(), key=lambda p: p.stat().st_mtime)
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = metrics[len(metrics) // 10 :]  # past the first steps (compilation, warm caches)
    med = lambda key: statistics.median(m[key] for m in steady)  # noqa: E731
    train = statistics.median(m["step_s"] - m["wait_s"] - m["publish_s"] for m in steady)
    return {
        "wall_s": wall,
        "samples_per_s": summary["samples_per_s"],
        "step_s": med("step_s"),
        "train_s": train,
        "wait_s": med("wait_s"),
        "publish_s": med("publish_s"),
        "eval_before": summary["eval_reward_before"],
        "eval_after": summary["eval_reward_after"],
        "reward_last_10pct": summary["reward_last_10pct"],
        "imbalance": statistics.median(m.get("balance/imbalance", 1.0) for m in steady),
    }


def ranks_part(steps: int, evals: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory(prefix="asyncflow-bench-parallel-") as tmp:
        for label, overrides in RANKS:
            print(f"  {label}: {steps} steps ...", flush=True)
            out[label] = run_example(overrides, steps, evals, Path(tmp))
    return out


def ranks_table(result: dict) -> str:
    head = "| trainer | wall s | samples/s | step ms | train ms | wait ms | publish ms | imbalance | eval |"
    rows = [head, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, r in result.items():
        evals = "-" if r["eval_after"] is None else f"{r['eval_before']:.3f} -> {r['eval_after']:.3f}"
        rows.append(
            f"| {label} | {r['wall_s']:.0f} | {r['samples_per_s']:.0f} | {r['step_s'] * 1e3:.0f} | "
            f"{r['train_s'] * 1e3:.0f} | {r['wait_s'] * 1e3:.0f} | {r['publish_s'] * 1e3:.1f} | "
            f"{r['imbalance']:.3f} | {evals} |"
        )
    return "\n".join(rows)


def service_part(name: str, quick: bool) -> tuple[str, dict]:
    """benchmarks/parallel_<name>.py in a process of its own: its printed tables and figures."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        args = [sys.executable, str(ROOT / "benchmarks" / f"parallel_{name}.py"), "--json", f.name]
        done = subprocess.run(args + (["--quick"] if quick else []), capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"parallel_{name}.py failed:\n{done.stderr[-3000:]}")
        return done.stdout, json.loads(Path(f.name).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--quick", action="store_true", help="30 steps without eval; the services' quick grids"
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--steps", type=int, help="steps of each sort run (default 500, quick 30)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts {unknown}: each part is one of {', '.join(PARTS)}")
    figures: dict = {"quick": args.quick}
    if "ranks" in parts:
        steps = args.steps or (30 if args.quick else 500)
        print(f"# trainer ranks: the sort example, {steps} steps (2-core CPU, gloo)")
        figures["ranks"] = ranks_part(steps, 0 if args.quick else 256)
        print(ranks_table(figures["ranks"]))
    for name in ("balance", "vocab", "sync"):
        if name in parts:
            print(f"\n# {name}")
            text, figures[name] = service_part(name, args.quick)
            print(text)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
