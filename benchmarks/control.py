"""Control-plane benchmark: what steering costs a run, and how fast a command takes effect.

A run publishes its status and the step's metrics to its control actor after every step
(one actor call, which also collects the commands waiting there); a client's command waits
in the actor until that call. This measures, on a real RunControl actor:

- publish_ms: the run's per-step cost (median round trip of `publish`, as Run does it);
- status_ms:  a client's `status()` (median round trip, from another thread);
- command_ms: a client's command from request to reply while a simulated run steps every
  `--step-ms`, the command sent at a random moment of a step (median; expected about half
  a step plus a few round trips: a command waits for the next step boundary).

    .venv/bin/python benchmarks/control.py [--calls 2000] [--step-ms 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asyncflow.control import RunControl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000, help="publish and status calls timed")
    parser.add_argument("--commands", type=int, default=100, help="commands timed")
    parser.add_argument("--step-ms", type=float, default=50.0, help="simulated trainer step")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    actor = ray.remote(RunControl).options(num_cpus=0, max_concurrency=1000).remote({"state": "running"})
    line = {"step": 0, "reward_mean": 0.5, "samples_per_s": 1500.0, "staleness": {"0": 64, "1": 64}}

    async def publish_loop(steps: int, step_s: float) -> list[float]:
        times = []
        for step in range(1, steps + 1):
            await asyncio.sleep(step_s)  # the trainer step
            start = time.perf_counter()
            commands = await actor.publish.remote({"state": "running", "step": step}, {**line, "step": step})
            times.append(time.perf_counter() - start)
            for key, _, _ in commands:
                await actor.reply.remote(key, {"step": step})
        return times

    publish = asyncio.run(publish_loop(args.calls, 0.0))
    status = []
    for _ in range(args.calls):
        start = time.perf_counter()
        ray.get(actor.status.remote())
        status.append(time.perf_counter() - start)

    done = threading.Event()
    commands: list[float] = []

    def client() -> None:
        for _ in range(args.commands):
            time.sleep(random.uniform(0, args.step_ms / 1000))  # arrive anywhere within a step
            start = time.perf_counter()
            ray.get(actor.request.remote("checkpoint", []))
            commands.append(time.perf_counter() - start)
        done.set()

    async def run_until_done() -> None:
        step = 0
        while not done.is_set():
            step += 1
            await publish_loop(1, args.step_ms / 1000)

    threading.Thread(target=client).start()
    asyncio.run(run_until_done())
    ms = lambda xs: round(1000 * statistics.median(xs), 3)  # noqa: E731
    figures = {
        "publish_ms": ms(publish),
        "status_ms": ms(status),
        "command_ms": ms(commands),
        "step_ms": args.step_ms,
        "calls": args.calls,
        "commands": args.commands,
    }
    print(f"{'what':<34}{'median ms':>10}")
    print(f"{'publish (per step, the run)':<34}{figures['publish_ms']:>10}")
    print(f"{'status() (a client)':<34}{figures['status_ms']:>10}")
    print(f"{'command -> reply, step ' + str(args.step_ms) + ' ms':<34}{figures['command_ms']:>10}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
