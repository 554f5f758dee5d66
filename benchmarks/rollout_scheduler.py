"""The rollout scheduler on a long-tailed multi-turn workload: FCFS vs the RL priority, in one run.

Workload (seeded): G groups of n episodes, a group arriving every --gap-s seconds; an
episode is 1-4 turns (geometric), each turn generates a heavy-tailed number of tokens
(log-normal, clipped) and is followed by a tool call of heavy-tailed latency (log-normal,
simulated by asyncio.sleep while the engine keeps decoding others) whose observation (a few
tokens) starts the next turn. Each turn is
one request to the real ScheduledTorchEngine (services/serving/torch_scheduled.py), with
the RL priority computed from the group's state (unfinished episodes, version, arrival).
The KV budget is below what the episodes would hold at once, so the scheduler preempts.
Weights are random; each turn's length is fixed by max_new_tokens (EOS is unreachable).

Per policy (fcfs, rl; KV kept on preemption, and for rl also recomputed):
  first_B_s        seconds until B groups are complete (what a trainer step of B groups waits)
  p50_s, p99_s     group completion times
  trainer_idle_s   a trainer taking B groups per step (train_s each) waits this long in all
  staleness        mean versions between a group's arrival and the trainer step that trains it
  recomputed       tokens whose KV was computed twice; preemptions; restores
  optimal_pct      generated tokens/s over this machine's bound (matmul FLOP/s / 2 params)
  sched_pct        share of step time outside the decode forward: planning, preempting, restoring,
                   prefilling (what NanoFlow's asynchronous scheduling would overlap, prefill aside)
  plan_pct         share of step time in the policy's decision alone (plan_step)

Then the discrete-event simulator (benchmarks/rollout_sim.py), with the step cost fitted to
all real runs' measured steps, predicts the same run (checked against the measurement), and
runs the same policies at cluster scale (--engines engines, each with its own groups).

    flock /tmp/asyncflow-bench.lock .venv/bin/python benchmarks/rollout_scheduler.py \\
        --json docs/bench-rollout-scheduler.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.rollout_sim import Episode, Turn, fit_step_cost, simulate_engine  # noqa: E402

VOCAB, MAX_POSITIONS = 64, 512
# name: (policy, keep KV on preemption, keep a finished turn's KV for the next turn)
POLICIES = {
    "fcfs": ("fcfs", True, False), "rl": ("rl", True, False), "rl recompute": ("rl", False, False),
    "rl + turn KV": ("rl", True, True),
}  # fmt: skip


def workload(
    groups: int, n: int, seed: int, gap_s: float, first_group: int = 0, tool_scale: float = 1.0
) -> list[Episode]:
    """Seeded episodes: heavy-tailed turn lengths and tool latencies; group g arrives at g * gap_s."""
    rng = random.Random(seed)
    episodes = []
    for g in range(first_group, first_group + groups):
        for i in range(n):
            count = min(4, 1 + int(rng.expovariate(1.0)))  # turns: 1 (63%), 2, 3, 4
            turns = tuple(
                Turn(
                    prompt_tokens=rng.randint(6, 12) if t == 0 else rng.randint(2, 5),
                    new_tokens=max(4, min(160, int(rng.lognormvariate(3.0, 0.9)))),  # median 20
                    tool_s=tool_scale * min(1.0, rng.lognormvariate(-4.0, 1.0)) if t < count - 1 else 0.0,
                )
                for t in range(count)
            )
            episodes.append(Episode(g, i, turns, (g - first_group) * gap_s))
    return episodes


async def run_real(episodes: list[Episode], *, policy: str, keep_kv: bool, turns: bool, args: Any) -> dict:
    """The workload through a real ScheduledTorchEngine; group completion times and its stats."""
    from services.models import PAD_ID, build_model
    from services.serving import Request, SamplingParams
    from services.serving.scheduler import priority_key
    from services.serving.torch_scheduled import ScheduledTorchEngine

    model = build_model(VOCAB, hidden_size=args.hidden, num_layers=args.layers, max_positions=MAX_POSITIONS)
    engine = ScheduledTorchEngine(
        model, eos_token_id=VOCAB, pad_token_id=PAD_ID, policy=policy, keep_kv=keep_kv,  # type: ignore[arg-type]
        turn_cache_tokens=args.kv_budget if turns else 0,
        kv_budget_tokens=args.kv_budget, max_batch_size=args.max_rows,
    )  # fmt: skip
    remaining = {e.group: 0 for e in episodes}
    for e in episodes:
        remaining[e.group] += 1
    done: dict[int, float] = {}
    rng = random.Random(1)
    start = time.perf_counter()

    async def episode(e: Episode) -> None:
        await asyncio.sleep(e.start_s)
        context: list[int] = []
        for t, turn in enumerate(e.turns):
            context += [rng.randint(3, VOCAB - 1) for _ in range(turn.prompt_tokens)]
            key = priority_key(remaining=remaining[e.group], version=0, arrival=e.group)
            params = SamplingParams(max_new_tokens=turn.new_tokens)
            (c,) = await engine.generate(
                [Request(f"{e.group}.{e.index}.{t}", context, 1, params, priority=key)]
            )
            context += c.response_ids
            if turn.tool_s:
                await asyncio.sleep(turn.tool_s)
        remaining[e.group] -= 1
        if remaining[e.group] == 0:
            done[e.group] = time.perf_counter() - start

    await asyncio.gather(*(episode(e) for e in episodes))
    wall = time.perf_counter() - start
    stats = dict(engine.stats)
    busy = sum(s for *_, s in engine.step_log)
    return {
        "group_done_s": done, "seconds": wall, "stats": stats, "step_log": engine.step_log,
        "optimal_pct": 100 * stats["tokens_generated"] / wall / stats["optimal_tokens_per_s"],
        "sched_pct": 100 * (1 - stats["forward_s"] / busy) if busy else 0.0,
        "plan_pct": 100 * stats["plan_s"] / busy if busy else 0.0,
    }  # fmt: skip


def summarize(done: dict[int, float], starts: dict[int, float], b: int, train_s: float) -> dict:
    """First B groups, p50/p99 completion time (from the group's arrival), and a trainer taking the
    first B complete groups per step (train_s each, publishing version k+1 after step k): its idle
    seconds, and the mean staleness of trained groups (step that trains it - versions published
    before the group arrived)."""
    order = sorted(done, key=done.get)  # type: ignore[arg-type]
    idle, clock, stale, published = 0.0, 0.0, [], []  # published: when each version appeared
    for step, first in enumerate(range(0, len(order) - b + 1, b)):
        batch = order[first : first + b]
        ready = done[batch[-1]]
        idle += max(0.0, ready - clock)
        clock = max(clock, ready) + train_s
        stale += [step - sum(t <= starts[g] for t in published) for g in batch]
        published.append(clock)
    took = sorted(done[g] - starts[g] for g in done)
    q = statistics.quantiles(took, n=100, method="inclusive")
    return {
        "first_B_s": done[order[b - 1]], "p50_s": statistics.median(took), "p99_s": q[98],
        "trainer_idle_s": idle, "staleness": statistics.mean(stale) if stale else 0.0,
    }  # fmt: skip


def real_rows(args: Any) -> tuple[list[dict], list]:
    """Each policy --repeats times, interleaved (a load spike hits all of them alike); medians."""
    episodes = workload(args.groups, args.n, args.seed, args.gap_s, tool_scale=args.tool_scale)
    starts = {e.group: e.start_s for e in episodes}
    per: dict[str, list[dict]] = {}
    steps: list = []  # every run's measured steps, for the simulator's fit
    for _ in range(args.repeats):
        for name, (policy, keep, turns) in POLICIES.items():
            run = asyncio.run(run_real(episodes, policy=policy, keep_kv=keep, turns=turns, args=args))
            steps += run["step_log"]
            s = run["stats"]
            per.setdefault(name, []).append({
                **summarize(run["group_done_s"], starts, args.b, args.train_s),
                "seconds": run["seconds"], "preemptions": int(s["preemptions"]),
                "restores": int(s["restores"]), "recomputed": int(s["recomputed_tokens"]),
                "reused": int(s["reused_tokens"]),
                "optimal_pct": run["optimal_pct"],
                "sched_pct": run["sched_pct"], "plan_pct": run["plan_pct"],
            })  # fmt: skip
    rows = [
        {"where": f"real (median of {args.repeats})", "policy": name,
         **{k: statistics.median(r[k] for r in runs) for k in runs[0]}}
        for name, runs in per.items()
    ]  # fmt: skip
    return rows, steps


def sim_rows(args: Any, steps: list) -> tuple[list[dict], dict]:
    cost = fit_step_cost(steps)
    rows = []
    for engines, label in ((1, "sim (this run)"), (args.engines, f"sim x{args.engines} engines")):
        for name, (policy, keep, turns) in POLICIES.items():
            done: dict[int, float] = {}
            starts: dict[int, float] = {}
            counters = {"preemptions": 0, "recomputed_tokens": 0}
            for engine in range(engines):
                seed = args.seed + engine  # engine 0 runs the real run's own workload
                first = engine * args.groups
                episodes = workload(args.groups, args.n, seed, args.gap_s, first, args.tool_scale)
                starts.update({e.group: e.start_s for e in episodes})
                out = simulate_engine(
                    episodes, policy=policy, cost=cost, budget_tokens=args.kv_budget, max_rows=args.max_rows,  # type: ignore[arg-type]
                    keep_kv=keep, turn_cache=turns,
                )  # fmt: skip
                done.update(out["group_done_s"])
                for k in counters:
                    counters[k] += out[k]
            rows.append({
                "where": label, "policy": name, **summarize(done, starts, args.b * engines, args.train_s),
                "seconds": max(done.values()), "preemptions": counters["preemptions"],
                "recomputed": counters["recomputed_tokens"],
            })  # fmt: skip
    return rows, cost.__dict__


def table(rows: list[dict]) -> str:
    cols = ["where", "policy", "first_B_s", "p50_s", "p99_s", "trainer_idle_s", "staleness", "seconds",
            "preemptions", "restores", "recomputed", "reused", "optimal_pct", "sched_pct",
            "plan_pct"]  # fmt: skip
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(fmt(r.get(c, "")) for c in cols) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--groups", type=int, default=24, help="prompt groups per engine")
    p.add_argument("--n", type=int, default=4, help="episodes (samples) per group")
    p.add_argument("--b", type=int, default=6, help="groups per trainer step (first_B_s, trainer idle)")
    p.add_argument("--kv-budget", type=int, default=700, help="KV tokens an engine may hold")
    p.add_argument("--max-rows", type=int, default=32, help="sequences decoded per step at most")
    p.add_argument("--hidden", type=int, default=128, help="model width")
    p.add_argument("--layers", type=int, default=2, help="model layers")
    p.add_argument("--gap-s", type=float, default=0.0, help="seconds between group arrivals (per engine)")
    p.add_argument("--tool-scale", type=float, default=1.0, help="factor on tool latencies (median 18 ms)")
    p.add_argument("--train-s", type=float, default=0.2, help="seconds a trainer step takes (idle model)")
    p.add_argument("--engines", type=int, default=256, help="engines in the cluster-scale simulation")
    p.add_argument("--repeats", type=int, default=3, help="runs of each policy (interleaved); medians")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a rollout worker's default (rollout.torch_threads = 1)
    try:
        real, steps = real_rows(args)
    finally:
        torch.set_num_threads(threads)
    sim, cost = sim_rows(args, steps)
    print(table(real + sim))
    load = os.getloadavg()
    print(f"step cost fit (s): {cost}; load average {load[0]:.2f}; torch threads 1")
    if args.json:
        config = {k: str(v) for k, v in vars(args).items()}
        out = {"args": config, "rows": real + sim, "step_cost": cost, "load_avg": load}
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
