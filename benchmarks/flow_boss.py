"""BOSS, stage 1 against stages 1 + 2: the table of `benchmarks/flow.py --only boss`.

Per seed, an I-CFM model transports eight Gaussians to moons (the quality table's data, MLP
and batches: benchmarks/flow.py); that model is the teacher. For K in --boss-steps, four
K-step Euler samplers of 2,000 held-out source points are compared with 2,000 held-out moons
points by W2 (exact assignment):

    uniform         the teacher on the uniform K-step grid
    boss-1          the teacher on BOSS's Bellman grid (stage 1: 100 fine steps, 500 cost samples)
    uniform+redress a copy fine-tuned on the uniform grid by stage 2's loss (services.flow.boss.redress)
    boss-1+2        a copy fine-tuned on the Bellman grid (stage 2, as the paper does)

Stage 2 regresses v(x_tau_k, tau_k) onto the secant of the teacher's 100-step trajectory to the
next chosen time, from a pool of 4,096 trajectories (fresh source samples, not the held-out
ones), --boss-tune-steps Adam steps of 256 trajectories at --boss-lr. "uniform+redress"
separates what the fine-tuning buys from what the grid buys. The reference is the teacher's
own 100-step sample (what a redressed K-step sampler imitates); the floor two moons samples.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from asyncflow.tasks.gaussians import eight_gaussians, moons
from services.flow import euler, uniform_grid
from services.flow.boss import bellman_grid, jump_costs, redress

FINE = 100
ARMS = ("uniform", "boss-1", "uniform+redress", "boss-1+2")


def boss_seed(args: Any, seed: int, train: Callable, w2: Callable, std: float) -> dict[str, Any]:
    start = time.perf_counter()
    teacher = train("icfm", args.boss_iters, seed)
    rng = np.random.default_rng([seed, 2])
    noise = torch.from_numpy(eight_gaussians(2000, rng, radius=5.0, std=std))
    target = moons(2000, rng)
    cost_noise = torch.from_numpy(eight_gaussians(500, np.random.default_rng([seed, 3]), radius=5.0, std=std))
    pool = torch.from_numpy(eight_gaussians(4096, np.random.default_rng([seed, 5]), radius=5.0, std=std))
    out: dict[str, Any] = {
        "seed": seed,
        "reference-100": w2(euler(teacher, noise, uniform_grid(FINE)).numpy(), target),
    }
    with torch.no_grad():
        costs = jump_costs(teacher, cost_noise, FINE)
    for k in (int(s) for s in args.boss_steps.split(",")):
        grids = {"uniform": uniform_grid(k), "boss-1": bellman_grid(costs, k)}
        out[f"grid-{k}"] = [round(float(t), 2) for t in grids["boss-1"]]
        for arm in ARMS:
            grid = grids["uniform" if arm.startswith("uniform") else "boss-1"]
            model = teacher
            if "+" in arm:
                model = copy.deepcopy(teacher)
                redress(
                    model, teacher, pool, grid, fine_steps=FINE, steps=args.boss_tune_steps,
                    batch_size=256, lr=args.boss_lr, seed=seed,
                )  # fmt: skip
            out[f"{arm}-{k}"] = w2(euler(model, noise, grid).numpy(), target)
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def boss_table(
    args: Any, train: Callable, w2: Callable, median: Callable, std: float, floor: Callable
) -> dict:
    runs = [boss_seed(args, s, train, w2, std) for s in range(args.seeds)]
    steps = [int(s) for s in args.boss_steps.split(",")]
    floors = [floor(s) for s in range(args.seeds)]
    print(
        f"\nBOSS stage 1 vs 1 + 2: W2 8gaussians -> moons, I-CFM teacher of {args.boss_iters} steps, stage 2 "
        f"{args.boss_tune_steps} steps at lr {args.boss_lr}; {args.seeds} seed(s), medians (floor "
        f"{median(floors):.3f}, teacher at 100 steps {median([r['reference-100'] for r in runs]):.3f})\n"
    )
    print("| K | " + " | ".join(ARMS) + " | stage 2 gain over stage 1 | seeds where 1+2 < 1 |")
    print("|---" * (len(ARMS) + 3) + "|")
    summary: dict[str, Any] = {
        "floor": median(floors),
        "reference-100": median([r["reference-100"] for r in runs]),
    }
    for k in steps:
        row = {arm: median([r[f"{arm}-{k}"] for r in runs]) for arm in ARMS}
        gain = 1 - row["boss-1+2"] / row["boss-1"]
        wins = sum(r[f"boss-1+2-{k}"] < r[f"boss-1-{k}"] for r in runs)
        summary[str(k)] = {**row, "gain": gain, "wins": wins}
        print(
            f"| {k} | " + " | ".join(f"{row[a]:.3f}" for a in ARMS) + f" | {gain:.0%} | {wins}/{len(runs)} |"
        )
    return {"median": summary, "runs": runs, "floor": floors}
