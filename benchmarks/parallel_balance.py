"""Data-parallel balance on 2 gloo ranks: equal counts vs token Karmarkar–Karp vs fitted cost.

What it measures, and how: two processes (torch.multiprocessing spawn, gloo over
tcp://127.0.0.1, one torch thread each) hold a DDP copy of a small causal LM
(services.models.build_model: Llama, hidden 128, 2 layers, vocab 1000). Every step draws one
global batch of long-tailed lengths (lognormal, median 128, clipped to 16..1024) and runs it
under each policy of services.parallelism.balance.plan in turn (count, tokens, cost; the order
rotates per step, so the three share the machine's noise). A policy's run starts at a barrier;
each rank runs its micro-batches (forward, token-mean log-likelihood loss weighted by the
micro-batch's share of the global token count, backward; DDP `no_sync` on all but the last),
and the last backward's gradient all-reduce lines the ranks up. Per rank:
  compute_s  from the start to the moment its gradients are ready (DDP's comm hook fires; one
             bucket, so that is the end of its backward);
  wait_s     from then until the all-reduce returns: the wait for the slower rank, plus the
             transfer (~3 MB over loopback).
Per policy and step: step_s = the slower rank's compute + wait; imbalance = max/mean of
compute_s; idle_fastest = (max - min)/max of compute_s; predicted imbalance of the same plan
under the cost model as it stood. The cost model (one per rank, fed the same all-gathered
micro-batch timings of all three policies in the same order, so both ranks plan alike) is
fitted online from the measured micro-batch times: `warmup` steps (not reported) give it its
first observations, and it refits every 16. Medians over the measured steps.

This is a 2-core CPU with gloo, shared with other jobs: the numbers say how well each policy
equalises rank time on this machine, not what a GPU cluster gains.

    flock /tmp/asyncflow-bench.lock .venv/bin/python benchmarks/parallel_balance.py \\
        --json docs/bench-parallel-balance.json
    .venv/bin/python benchmarks/parallel_balance.py --quick    # the first setting, ~1 minute
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.models import build_model  # noqa: E402
from services.parallelism.balance import POLICIES, CostModel, imbalance, plan, predicted_times  # noqa: E402

SHAPE = {"hidden_size": 128, "intermediate_size": 512, "num_layers": 2, "num_heads": 4}
VOCAB, MAX_LEN, MIN_LEN, MEDIAN_LEN, SIGMA = 1000, 1024, 16, 128, 1.0
REFIT_EVERY = 16
# The three policies, and a control: every rank runs the same micro-batches (rank 0's share of the
# cost plan), so its measured imbalance is the machine's noise floor.
RUNS = (*POLICIES, "control")


def batch_lengths(seed: int, step: int, rows: int) -> list[int]:
    """One global batch: lognormal lengths (median MEDIAN_LEN), clipped to MIN_LEN..MAX_LEN."""
    rng = np.random.default_rng([seed, step])
    return np.clip(rng.lognormal(np.log(MEDIAN_LEN), SIGMA, rows), MIN_LEN, MAX_LEN).astype(int).tolist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_policy(ddp: Any, ready: dict, rows: list[torch.Tensor], mine: list[list[int]], total: int,
               world: int) -> tuple[float, float, list[tuple[list[int], float]]]:  # fmt: skip
    """This rank's micro-batches of one plan: (compute_s, wait_s, [(lengths, seconds)] per micro-batch)."""
    if not mine:  # a rank with no rows still joins the all-reduce, with a zero-weighted dummy
        mine, rows, total = [[len(rows)]], [*rows, torch.tensor([3, 4])], 0
    dist.barrier()
    start = time.perf_counter()
    timings = []
    for j, mb in enumerate(mine):
        last = j == len(mine) - 1
        began = time.perf_counter()
        with contextlib.nullcontext() if last else ddp.no_sync():
            width = max(len(rows[i]) for i in mb)
            ids = torch.zeros(len(mb), width, dtype=torch.long)  # (b, T), right-padded
            mask = torch.zeros(len(mb), width, dtype=torch.long)  # (b, T)
            for k, i in enumerate(mb):
                ids[k, : len(rows[i])], mask[k, : len(rows[i])] = rows[i], 1
            logits = ddp(input_ids=ids, attention_mask=mask).logits  # (b, T, V)
            logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
            # token-mean over the global batch: this micro-batch's share, times world (DDP averages)
            loss = -(logp * mask[:, 1:]).sum() * (world / total if total else 0.0)
            loss.backward()
        timings.append(([len(rows[i]) for i in mb], (ready["t"] if last else time.perf_counter()) - began))
    end = time.perf_counter()
    return ready["t"] - start, end - ready["t"], timings if total else []


def worker(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = build_model(VOCAB, max_positions=MAX_LEN, seed=0, **SHAPE).train()
    model.config._attn_implementation = cfg["attention"]
    # One bucket: the hook fires when the whole backward is done. No buffer broadcast: the only
    # buffers are the rotary frequencies, equal everywhere, and the broadcast would be a collective
    # inside the first forward (and a deadlock if ranks ran different numbers of synced forwards).
    ddp = DistributedDataParallel(model, bucket_cap_mb=1024, broadcast_buffers=False)
    ready = {"t": 0.0}

    def timed_allreduce(state, bucket):  # unannotated: DDP rejects any annotation but its own types
        ready["t"] = time.perf_counter()
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, timed_allreduce)
    cost = CostModel(refit_every=REFIT_EVERY)
    records = []
    for step in range(cfg["warmup"] + cfg["steps"]):
        lengths = batch_lengths(cfg["seed"], step, cfg["rows"])
        g = torch.Generator().manual_seed(cfg["seed"] * 100_003 + step)
        rows = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
        order = RUNS[step % len(RUNS) :] + RUNS[: step % len(RUNS)]
        plans = {policy: plan(lengths, world, cfg["token_budget"], policy, cost) for policy in POLICIES}
        plans["control"] = [plans["cost"][0]] * world  # every rank the same work: the noise floor
        mine: dict[str, Any] = {}
        for policy in order:
            p = plans[policy]
            compute, wait, timings = run_policy(ddp, ready, rows, p[rank], sum(lengths), world)
            model.zero_grad(set_to_none=True)
            mine[policy] = {
                "compute_s": compute, "wait_s": wait, "timings": timings, "plan": p,
                "predicted_imbalance": imbalance(predicted_times(lengths, p, cost))["imbalance"],
            }  # fmt: skip
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        for policy in POLICIES:  # the same observations in the same order on every rank
            for r in range(world):
                for lens, seconds in gathered[r][policy]["timings"]:
                    cost.observe(lens, max(seconds, 1e-9))
        if rank == 0:
            records.append(step_record(step, lengths, gathered, cost))
            print(f"step {step}: " + ", ".join(f"{p} {records[-1][p]['step_s']:.2f} s" for p in POLICIES),
                  file=sys.stderr, flush=True)  # fmt: skip
    if rank == 0:
        Path(out).write_text(json.dumps(records))
    dist.barrier()
    del ddp  # before the process group: tearing both down together can deadlock gloo's threads
    dist.destroy_process_group()


def step_record(step: int, lengths: list[int], gathered: list[Any], cost: CostModel) -> dict:
    record: dict[str, Any] = {"step": step, "batch_tokens": sum(lengths), "cost_model": cost.metrics()}
    for policy in RUNS:
        ranks = [g[policy] for g in gathered]
        p = ranks[0]["plan"]
        assert all(r["plan"] == p for r in ranks), f"ranks planned {policy} differently at step {step}"
        compute = [r["compute_s"] for r in ranks]
        fastest = min(range(len(ranks)), key=lambda r: compute[r])
        real = sum(lengths[i] for rank in p for mb in rank for i in mb)
        padded = sum(len(mb) * max(lengths[i] for i in mb) for rank in p for mb in rank)
        record[policy] = {
            "compute_s": compute,
            "wait_s": [r["wait_s"] for r in ranks],
            "step_s": max(c + r["wait_s"] for c, r in zip(compute, ranks)),
            **imbalance(compute),
            "wait_fastest_s": ranks[fastest]["wait_s"],
            "predicted_imbalance": ranks[0]["predicted_imbalance"],
            "micro_batches": [len(rank) for rank in p],
            "rows": [sum(len(mb) for mb in rank) for rank in p],
            "padding_efficiency": real / padded,
        }
    return record


def measure(steps: int = 24, warmup: int = 3, rows: int = 96, token_budget: int = 4096,
            attention: str = "sdpa", seed: int = 0, world: int = 2) -> dict:  # fmt: skip
    """Run the benchmark (see the module docstring); the figures per policy and the per-step records."""
    import torch.multiprocessing as mp

    cfg = {"steps": steps, "warmup": warmup, "rows": rows, "token_budget": token_budget,
           "attention": attention, "seed": seed}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "records.json")
        started = time.perf_counter()
        mp.spawn(worker, args=(world, free_port(), cfg, out), nprocs=world, join=True)
        wall_s = time.perf_counter() - started
        records = json.loads(Path(out).read_text())
    measured = [r for r in records if r["step"] >= warmup]

    def median(policy: str, key: str) -> float:
        return statistics.median(r[policy][key] for r in measured)

    summary = {
        policy: {
            "step_s": median(policy, "step_s"),
            "imbalance": median(policy, "imbalance"),
            "idle_fastest": median(policy, "idle_fastest"),
            "wait_fastest_s": median(policy, "wait_fastest_s"),
            "predicted_imbalance": median(policy, "predicted_imbalance"),
            "compute_sum_s": statistics.median(sum(r[policy]["compute_s"]) for r in measured),
            "micro_batches": statistics.median(sum(r[policy]["micro_batches"]) for r in measured),
            "padding_efficiency": median(policy, "padding_efficiency"),
        }
        for policy in RUNS
    }
    return {
        "workload": {**cfg, "world": world, "shape": SHAPE, "vocab": VOCAB, "lengths": {"distribution":
            "lognormal", "median": MEDIAN_LEN, "sigma": SIGMA, "min": MIN_LEN, "max": MAX_LEN}},
        "device": "2-core CPU, gloo, 1 torch thread per rank, shared machine",
        "wall_s": wall_s,
        "policies": summary,
        "cost_model": records[-1]["cost_model"],
        "predicted_at_scale": predicted_at_scale(cfg, records[-1]["cost_model"]),
        "steps": records,
    }  # fmt: skip


def predicted_at_scale(cfg: dict, fitted: dict, ranks: tuple[int, ...] = (2, 4, 8, 16)) -> dict:
    """Predicted only: the measured steps' batches planned over more ranks, priced by the final
    fitted cost model. Per rank count and policy: median imbalance, and median step relative to
    the token-balanced plan's."""
    model = CostModel(alpha=fitted["alpha"], beta=fitted["beta"], gamma=fitted["gamma"])
    out: dict[str, Any] = {}
    for r in ranks:
        figures: dict[str, list[tuple[float, float]]] = {p: [] for p in POLICIES}
        for step in range(cfg["warmup"], cfg["warmup"] + cfg["steps"]):
            lengths = batch_lengths(cfg["seed"], step, cfg["rows"])
            steps = {p: predicted_times(lengths, plan(lengths, r, cfg["token_budget"], p, model), model)
                     for p in POLICIES}  # fmt: skip
            for p, times in steps.items():
                figures[p].append((imbalance(times)["imbalance"], max(times) / max(steps["tokens"])))
        out[str(r)] = {
            p: {
                "imbalance": statistics.median(i for i, _ in v),
                "step_vs_tokens": statistics.median(s for _, s in v),
            }
            for p, v in figures.items()
        }
    return out


def table(result: dict) -> str:
    w, cm = result["workload"], result["cost_model"]
    lines = [
        f"{w['world']} ranks, gloo, 2-core CPU; Llama {w['shape']}, vocab {w['vocab']}, "
        f"attention {w['attention']}; {w['rows']} rows/step, lognormal lengths (median {MEDIAN_LEN}, "
        f"sigma {SIGMA}, {MIN_LEN}..{MAX_LEN}); token budget {w['token_budget']}; medians over "
        f"{w['steps']} steps after {w['warmup']} warm-up",
        "| policy | step s | imbalance (max/mean compute) | idle of fastest | wait of fastest s | predicted "
        "imbalance | compute Σ ranks s | micro-batches | padding efficiency |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for policy, s in result["policies"].items():
        lines.append(
            f"| {'control (same work)' if policy == 'control' else policy} "
            f"| {s['step_s']:.3f} | {s['imbalance']:.3f} | {s['idle_fastest']:.1%} | "
            f"{s['wait_fastest_s']:.3f} | {s['predicted_imbalance']:.3f} | {s['compute_sum_s']:.3f} | "
            f"{s['micro_batches']:.0f} | {s['padding_efficiency']:.1%} |"
        )
    lines.append(
        f"cost model (fitted online, seconds): alpha {cm['alpha']:.3e}/token, beta {cm['beta']:.3e}/token², "
        f"gamma {cm['gamma']:.3e}/micro-batch; r² {cm.get('r2', float('nan')):.3f}, median relative error "
        f"{cm.get('rel_err', float('nan')):.1%} over {cm['observations']:.0f} micro-batches; "
        f"attention = linear at L = {cm['alpha'] / cm['beta'] if cm['beta'] else float('inf'):.0f}"
    )
    scale = result["predicted_at_scale"]
    lines.append("predicted only (fitted model, same batches, more ranks): imbalance, step vs tokens")
    for r, policies in scale.items():
        each = (f"{p} {v['imbalance']:.3f}, {v['step_vs_tokens']:.2f}x" for p, v in policies.items())
        lines.append(f"  {r:>2} ranks: " + "; ".join(each))
    return "\n".join(lines)


# (token budget, attention): the trainer's defaults, where packing differs between the policies;
# a tight budget, where every policy packs densely and only the balance differs; and the same with
# eager attention, whose T x T scores make the L² term large at these lengths.
SETTINGS = [(4096, "sdpa"), (1024, "sdpa"), (1024, "eager")]


def rounded(value: Any) -> Any:
    """Floats to 4 significant digits, throughout: timings on a shared machine carry no more."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--quick", action="store_true", help="the first setting only, fewer and smaller steps"
    )
    parser.add_argument("--steps", type=int, help="measured steps per setting (default 16, quick 6)")
    args = parser.parse_args(argv)
    steps = args.steps or (6 if args.quick else 16)
    runs = []
    for budget, attention in SETTINGS[:1] if args.quick else SETTINGS:
        runs.append(measure(steps=steps, warmup=2 if args.quick else 3, rows=64 if args.quick else 96,
                            token_budget=budget, attention=attention))  # fmt: skip
        print(table(runs[-1]) + "\n", flush=True)
    print(f"wall {sum(r['wall_s'] for r in runs):.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"runs": rounded(runs)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
