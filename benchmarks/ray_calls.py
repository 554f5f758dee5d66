"""What a Ray actor costs on this machine: CPU per actor call, and CPU of an idle actor.

Every role of a run is a Ray actor, and a step of the small example makes about seven actor
calls (the trainer's step and publish, weight-store waits and gets, the control actor's
metrics). This measures, on a private local Ray, the CPU (the kernel's counters, user +
system) that one call to an actor costs the caller and the actor, for a plain and an async
actor, and the CPU an actor burns while it does nothing. The small example's step costs
about 150 ms of CPU in all, of which its compute is about 63: these figures say how much of
the rest the calls themselves explain.

    .venv/bin/python benchmarks/ray_calls.py [--calls 500] [--repeats 3] [--idle-s 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import psutil
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (psutil, as benchmarks/steps.py counts a run's)."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


@ray.remote(num_cpus=0.1)
class Plain:
    def pid(self) -> int:
        return os.getpid()


@ray.remote(num_cpus=0.1)
class Async:
    async def pid(self) -> int:
        return os.getpid()


def per_call(actor, pid: int, calls: int) -> dict[str, float]:
    """CPU ms per call on each side, and wall ms per call, for `calls` sequential calls."""
    mine, theirs, start = time.process_time(), cpu_s(pid), time.perf_counter()
    for _ in range(calls):
        ray.get(actor.pid.remote())
    return {
        "wall_ms": 1000 * (time.perf_counter() - start) / calls,
        "caller_cpu_ms": 1000 * (time.process_time() - mine) / calls,
        "actor_cpu_ms": 1000 * (cpu_s(pid) - theirs) / calls,
    }


def measure(calls: int, repeats: int, idle_s: float) -> dict:
    actors = {"plain": Plain.remote(), "async": Async.remote()}
    pids = {name: ray.get(a.pid.remote()) for name, a in actors.items()}
    out: dict = {"calls": {}, "idle_cpu_pct": {}}
    for name, actor in actors.items():
        per_call(actor, pids[name], 50)  # warm
        runs = [per_call(actor, pids[name], calls) for _ in range(repeats)]
        out["calls"][name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    before = {name: cpu_s(pid) for name, pid in pids.items()}
    time.sleep(idle_s)
    for name, pid in pids.items():
        out["idle_cpu_pct"][name] = 100 * (cpu_s(pid) - before[name]) / idle_s
    for actor in actors.values():
        ray.kill(actor)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500, help="sequential calls per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per actor; figures are medians")
    parser.add_argument("--idle-s", type=float, default=10.0, help="seconds the idle actors are watched")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    started = not ray.is_initialized()  # a private local Ray, unless the caller runs one already
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        figures = measure(args.calls, args.repeats, args.idle_s)
    finally:
        if started:
            ray.shutdown()
    print("| actor | wall ms per call | caller CPU ms per call | actor CPU ms per call | CPU % while idle |")
    print("|---|---|---|---|---|")
    for name, c in figures["calls"].items():
        print(
            f"| {name} | {c['wall_ms']:.3f} | {c['caller_cpu_ms']:.3f} | {c['actor_cpu_ms']:.3f} "
            f"| {figures['idle_cpu_pct'][name]:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": None}, **figures}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
