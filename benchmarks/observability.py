"""Tracing overhead: the example run with trace.enabled on and off, alternating, in one Ray.

Each repeat runs examples/sort.yaml twice, once with tracing (spans in every actor, drained
after every step into trace.json) and once without, in alternating order; the figures are
medians over the repeats of:

- step_ms:         the median time between two steps' metrics lines (steps after the first
                   `--skip`, so start-up is left out): the loop's pace, tracing's cost included;
- samples_per_s:   trained samples per second over those steps;
- events_per_step: spans written per step, trace_kb_per_step: trace.json's growth per step;
- collect_ms:      a background collection's duration (beside the loop, not on its path),
                   about one per trace.collect_every_s.

It also times one span in a loop (span_us: on; span_off_us: off), the cost per recorded unit
of work. The overhead is the median over the pairs of on / off - 1 of step_ms: the two runs of
a pair run back to back, so a load that drifts between pairs skews it least.

    .venv/bin/python benchmarks/observability.py [--steps 60] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

import ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asyncflow.config import load_config  # noqa: E402
from asyncflow.recipes.grpo import train  # noqa: E402
from asyncflow.rundir import RunDir  # noqa: E402
from asyncflow.tracing import Tracer  # noqa: E402
from asyncflow.workflow.traces import Traces  # noqa: E402

COLLECT: list[float] = []  # seconds of each background collection of spans


def _timed_collect() -> None:
    """Time every collection (it runs beside the loop, not on its path: for information)."""
    collect = Traces._collect

    async def timed(self: Traces, actors: list, steps: int) -> None:
        start = time.perf_counter()
        try:
            await collect(self, actors, steps)
        finally:
            COLLECT.append(time.perf_counter() - start)

    Traces._collect = timed  # type: ignore[method-assign]


def one_run(out: Path, steps: int, skip: int, enabled: bool, extra: list[str]) -> dict:
    config = load_config(
        ROOT / "examples" / "sort.yaml",
        [f"output_dir={out}", f"dataplane.name=obs-{uuid.uuid4().hex[:8]}", f"trainer.steps={steps}",
         "task.eval_prompts=0", "trainer.checkpoint_every=0", f"trace.enabled={str(enabled).lower()}",
         *extra],
    )  # fmt: skip
    COLLECT.clear()
    summary = train(config, display=False)
    run = RunDir(summary["run_dir"])
    metrics = run.metrics()[skip:]
    elapsed = [m["elapsed_s"] for m in metrics]
    steps_timed = len(elapsed) - 1
    events = len(run.trace()) if enabled else 0
    size = run.trace_path.stat().st_size if enabled else 0
    return {
        "step_ms": 1000 * statistics.median(b - a for a, b in zip(elapsed, elapsed[1:])),
        "samples_per_s": sum(m["samples"] for m in metrics[1:]) / (elapsed[-1] - elapsed[0]),
        "events_per_step": events / steps,
        "trace_kb_per_step": size / 1024 / steps,
        "collect_ms": 1000 * statistics.median(COLLECT) if enabled else 0.0,
        "collections_per_step": len(COLLECT) / steps,
        "steps_timed": steps_timed,
    }


def span_cost(enabled: bool, n: int = 100_000, per_drain: int = 100) -> float:
    """Microseconds per span (with a row-id list as its args), recorded and drained every
    `per_drain` spans, as an actor's are (a few dozen per step)."""
    tracer, rows = Tracer(enabled=enabled), list(range(64))
    start = time.perf_counter()
    for i in range(n):
        with tracer.span("generate", row_ids=rows, version=3) as span:
            span["tokens"] = 512
        if i % per_drain == 0:
            tracer.drain()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60, help="trainer steps per run")
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs (on, off), alternating")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    parser.add_argument("--out", default="/tmp/asyncflow-bench-observability", help="run directories")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    args = parser.parse_args()
    _timed_collect()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for r in range(args.repeats):
        for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
            runs[mode].append(one_run(Path(args.out), args.steps, args.skip, mode == "on", args.set))
            print(f"repeat {r + 1} trace {mode}: {runs[mode][-1]}", file=sys.stderr)
    ray.shutdown()
    keys = ["step_ms", "samples_per_s", "collect_ms", "events_per_step", "trace_kb_per_step"]
    table = {mode: {k: statistics.median(x[k] for x in rs) for k in keys} for mode, rs in runs.items()}
    # each pair ran back to back, under the same load: the median of the pairs' ratios drifts least
    pairs = [on["step_ms"] / off["step_ms"] - 1 for on, off in zip(runs["on"], runs["off"])]
    overhead = statistics.median(pairs)
    spans = {"span_us": span_cost(True), "span_off_us": span_cost(False)}
    print(
        f"{'trace':<6}{'step_ms':>10}{'(min-max)':>14}{'samples/s':>12}{'collect_ms':>12}{'events/step':>13}"
        f"{'trace KB/step':>15}"
    )
    for mode, row in table.items():
        lo, hi = min(x["step_ms"] for x in runs[mode]), max(x["step_ms"] for x in runs[mode])
        cells = [f"{row['step_ms']:>10.1f}", f"{f'({lo:.0f}-{hi:.0f})':>14}",
                 f"{row['samples_per_s']:>12.0f}", f"{row['collect_ms']:>12.2f}",
                 f"{row['events_per_step']:>13.1f}", f"{row['trace_kb_per_step']:>15.1f}"]  # fmt: skip
        print(f"{mode:<6}" + "".join(cells))
    each = ", ".join(f"{p:+.1%}" for p in pairs)
    print(f"overhead of tracing: {overhead:+.1%} of step time (median of the pairs' on / off - 1: {each})")
    print(f"one span: {spans['span_us']:.2f} us recorded, {spans['span_off_us']:.2f} us with tracing off")
    if args.json:
        result = {"steps": args.steps, "skip": args.skip, "repeats": args.repeats, "overrides": args.set,
                  "median": table, "runs": runs, "pairs": pairs, "overhead": overhead, **spans}  # fmt: skip
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
