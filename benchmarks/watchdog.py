"""Watchdog benchmark: how fast a frozen worker is diagnosed and the run trains again.

Runs the tiny sort example (examples/sort.yaml) on a local Ray, freezes one worker's process
(SIGSTOP: it stops answering, as a deadlock would) once the run has trained a few steps, and
times, per stage:

- detect_s:   freeze -> the diagnosis is in <run_dir>/stalls/ (the stage's deadline, the
              stacks read by py-spy, the store's queues);
- recover_s:  freeze -> the next trained step (the stuck actor killed and restarted, its rows
              redelivered; a frozen trainer: the run restarted from its last checkpoint);
- dump_s:     reading the frozen actor's stacks with py-spy (the diagnosis' stacks_read_in_s);
- steps_per_s before the freeze, and the run's wall time.

    .venv/bin/python benchmarks/watchdog.py [--stages reward rollout trainer] [--floor-s 10]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import ray
from ray._private import state

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asyncflow.config import load_config  # noqa: E402
from asyncflow.recipes.grpo import train  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sort.yaml"


def steps_of(run_dir: Path) -> list[dict]:
    file = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []


def freeze_one(stage: str, steps: int, floor_s: float) -> dict:
    output = Path(tempfile.mkdtemp(prefix="asyncflow-watchdog-bench-"))
    name = f"wd-{uuid.uuid4().hex[:6]}"
    config = load_config(EXAMPLE, [
        f"output_dir={output}", f"dataplane.name={name}", f"trainer.steps={steps}", "task.eval_prompts=0",
        "warmup.steps=5", "trainer.checkpoint_every=3", "dataplane.lease_s=8", f"watchdog.floor_s={floor_s}",
        "watchdog.factor=4", "watchdog.first_deadline_s=60", "watchdog.check_every_s=0.5",
    ])  # fmt: skip
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(train(config, display=False)))
    started = time.monotonic()
    runner.start()
    while not any(len(steps_of(p)) >= 4 for p in output.iterdir()) and runner.is_alive():
        time.sleep(0.05)
    (run_dir,) = output.iterdir()
    before = steps_of(run_dir)
    actor = ray.get_actor(f"{name}.{stage}0", namespace="asyncflow")
    pid = int(state.actors(actor._actor_id.hex())["Pid"])
    os.kill(pid, signal.SIGSTOP)
    frozen, detect, recover = time.monotonic(), None, None
    while runner.is_alive() and (detect is None or recover is None):
        if detect is None and list((run_dir / "stalls").glob(f"*-{stage}.json")):
            detect = time.monotonic() - frozen
        if recover is None and len(steps_of(run_dir)) > len(before) + (stage != "trainer"):
            recover = time.monotonic() - frozen
        time.sleep(0.05)
    runner.join()
    (diagnosis,) = [json.loads(p.read_text()) for p in (run_dir / "stalls").glob(f"*-{stage}.json")][:1]
    dump = diagnosis["stacks_read_in_s"]
    rate = (len(before) - 1) / max(before[-1]["elapsed_s"] - before[0]["elapsed_s"], 1e-9)
    wall = time.monotonic() - started
    return {"stage": stage, "detect_s": detect, "recover_s": recover, "dump_s": dump,
            "steps_per_s": rate, "wall_s": wall, "steps": result.get("steps")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", nargs="+", default=["reward", "rollout", "trainer"])
    parser.add_argument("--steps", type=int, default=12, help="trainer steps per run")
    parser.add_argument("--floor-s", type=float, default=10.0, help="watchdog.floor_s of the runs")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    args = parser.parse_args()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    rows = [freeze_one(stage, args.steps, args.floor_s) for stage in args.stages]
    print(
        f"{'stage':<10}{'detect_s':>10}{'recover_s':>11}{'dump_s':>8}{'steps/s':>9}{'wall_s':>8}{'steps':>7}"
    )
    for r in rows:
        print(
            f"{r['stage']:<10}{r['detect_s'] or float('nan'):>10.1f}{r['recover_s'] or float('nan'):>11.1f}"
            f"{r['dump_s']:>8.2f}{r['steps_per_s']:>9.1f}{r['wall_s']:>8.0f}{r['steps'] or 0:>7}"
        )
    print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps({"floor_s": args.floor_s, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
