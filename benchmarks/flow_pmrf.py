"""PMRF on 8 x 8 digits: the table of `benchmarks/flow.py --only pmrf`.

For each degradation of asyncflow.tasks.digits (noise, blur, mask) and seed, four
restorers train on the 1,297 training digits, degraded afresh in every batch:

    mmse       f(y), a 3 x 256 MLP trained by MSE (PMRF's stage 1)
    posterior  a flow from N(0, I) to x conditioned on y (posterior sampling)
    from-y     a flow from y + sigma_s eps to x (the source is the degraded image itself)
    pmrf       a flow from f(y) + sigma_s eps to x (services.flow.pmrf), f as above

Every flow is the same 3 x 256 velocity MLP (services.flow.VelocityMLP) trained by I-CFM
for the same steps, batch and rate. On the 500 test digits, each degraded once with a fixed
seed, each restorer is sampled with K Euler steps; reported: MSE per pixel (pixels in
[-1, 1]) against the clean digit, FD to the clean test digits and the classifier's accuracy
(benchmarks/flow_digits.py), medians over seeds.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from asyncflow.tasks.digits import DEGRADATIONS, degrade, split
from benchmarks.flow_digits import Judge
from services.flow import VelocityMLP, euler, uniform_grid
from services.flow.losses import fit, make_loss
from services.flow.pmrf import MeanMLP, fit_mean, restore

FLOWS = ("posterior", "from-y", "pmrf")
PMRF_STEPS = (1, 2, 5, 10, 50)


def pairs_of(kind: str, seed: int):
    """`pairs(step, size)`: clean training digits and a fresh degradation, the same for every method."""
    (train, _), _ = split()

    def pairs(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([seed, 11, step])
        x = train[rng.integers(0, len(train), size)]
        return torch.from_numpy(x), torch.from_numpy(degrade(x, kind, rng))

    return pairs


def train_flow(method: str, kind: str, mean: MeanMLP, args: Any, seed: int) -> VelocityMLP:
    pairs, sigma_s = pairs_of(kind, seed), args.sigma_s
    torch.manual_seed(seed)
    model = VelocityMLP(64, 64 if method == "posterior" else 0, hidden_size=256, num_layers=3)
    gen = torch.Generator().manual_seed(seed)

    def data(step: int, size: int):
        x, y = pairs(step, size)
        return x, (y if method == "posterior" else None)

    def source(step: int, size: int) -> torch.Tensor:
        _, y = pairs(step, size)
        if method == "posterior":
            return torch.randn(size, 64, generator=gen)
        with torch.no_grad():
            center = y if method == "from-y" else mean(y)
        return center + sigma_s * torch.randn(size, 64, generator=gen)

    fit(
        model,
        make_loss("icfm"),
        data,
        steps=args.digits_iters,
        batch_size=256,
        lr=1e-3,
        source=source,
        seed=seed,
    )
    return model.eval()


def restorations(kind: str, args: Any, seed: int) -> dict[str, dict[int, np.ndarray]]:
    """Every method's restorations of the 500 degraded test digits, by K."""
    _, (test, _) = split()
    y = torch.from_numpy(degrade(test, kind, np.random.default_rng([seed, 99])))
    torch.manual_seed(seed)
    mean = MeanMLP(64, 64, hidden_size=256, num_layers=3)
    fit_mean(mean, pairs_of(kind, seed), steps=args.digits_iters, batch_size=256, lr=1e-3)
    mean.eval()
    with torch.no_grad():
        out: dict[str, dict[int, np.ndarray]] = {"mmse": {0: mean(y).numpy()}}
    for method in FLOWS:
        flow = train_flow(method, kind, mean, args, seed)
        out[method] = {}
        for k in PMRF_STEPS:
            gen = torch.Generator().manual_seed(seed * 1000 + k)
            if method == "pmrf":
                x = restore(mean, flow, y, uniform_grid(k), args.sigma_s, gen)
            elif method == "from-y":
                x = euler(flow, y + args.sigma_s * torch.randn(y.shape, generator=gen), uniform_grid(k))
            else:
                x = euler(flow, torch.randn(y.shape, generator=gen), uniform_grid(k), y)
            out[method][k] = x.numpy()
    return out


def pmrf_run(kind: str, args: Any, seed: int, judge: Judge) -> dict[str, Any]:
    started = time.perf_counter()
    images = restorations(kind, args, seed)
    row: dict[str, Any] = {"seconds": round(time.perf_counter() - started, 1)}
    for method, by_k in images.items():
        for k, x in by_k.items():
            row[f"{method}-{k}"] = {
                "mse": float(((x - judge.test) ** 2).mean()),
                "fd": judge.fd(x),
                "acc": judge.score_labels(x),
            }
    return row


def pmrf_table(args: Any, judge: Judge, median) -> dict[str, Any]:
    kinds = args.degradations.split(",")
    unknown = set(kinds) - set(DEGRADATIONS)
    if unknown:
        raise SystemExit(f"--degradations: unknown {sorted(unknown)}; expected some of {DEGRADATIONS}")
    runs = {kind: [pmrf_run(kind, args, s, judge) for s in range(args.seeds)] for kind in kinds}
    summary: dict[str, Any] = {}
    print(
        f"\nPMRF on 8x8 digits ({args.digits_iters} Adam steps per model, sigma_s {args.sigma_s}, "
        f"{args.seeds} seed(s), median): MSE per pixel / FD / classifier accuracy on 500 test digits. "
        f"FD floor {judge.floor():.1f}; clean test accuracy {judge.accuracy:.3f}\n"
    )
    print("| degradation | method | " + " | ".join(f"K = {k}" for k in PMRF_STEPS) + " |")
    print("|---" * (len(PMRF_STEPS) + 2) + "|")
    for kind, rs in runs.items():
        for method in ("mmse", *FLOWS):
            ks = (0,) if method == "mmse" else PMRF_STEPS
            cells = []
            for k in ks:
                cell = {m: median([r[f"{method}-{k}"][m] for r in rs]) for m in ("mse", "fd", "acc")}
                summary[f"{kind}/{method}-{k}"] = cell
                cells.append(f"{cell['mse']:.3f} / {cell['fd']:.1f} / {cell['acc']:.2f}")
            if method == "mmse":
                cells = [cells[0] + " (no steps)"] + [""] * (len(PMRF_STEPS) - 1)
            print(f"| {kind} | {method} | " + " | ".join(cells) + " |")
    seconds = [r["seconds"] for rs in runs.values() for r in rs]
    print(f"\nseconds per (degradation, seed), all four methods: {seconds}")
    return {"median": summary, "runs": runs, "fd_floor": judge.floor(), "clean_accuracy": judge.accuracy}
