"""PFGM++ against diffusion: the tables of `benchmarks/flow.py --only pfgm`.

A flow is trained from the PFGM++ kernel's noise (services.flow.pfgm: r = sigma sqrt(D),
sigma = 1 at t = 1, so x_t / (1 - t) is the PFGM++ perturbation at sigma = t / (1 - t)) to
the data, by I-CFM, for D in --aug-dims (inf: the Gaussian, i.e. diffusion / rectified flow),
and sampled by Euler from fresh kernel draws with K steps. "noisy": the K = 10 sampler with
Gaussian noise of std --sampler-noise added to every velocity evaluation (PFGM++'s claim:
smaller D is more robust to errors in the sampler).

- 2-D: torchcfm's moons (sklearn moons, noise 0.2, x * 3 - 1), a 3 x 64 MLP; W2 of
  --pfgm-points samples (2,000) against as many held-out points by an exact assignment
  (floor: two moons samples of that size).
- digits: the 1,297 training digits, a 3 x 256 MLP; FD of 500 samples against the 500 clean
  test digits (benchmarks/flow_digits.py).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from asyncflow.tasks.digits import split
from asyncflow.tasks.gaussians import moons
from benchmarks.flow_digits import Judge
from services.flow import VelocityMLP, euler, uniform_grid
from services.flow.losses import fit, make_loss
from services.flow.pfgm import pfgm_noise, pfgm_source

PFGM_STEPS = (1, 2, 4, 10, 50)


@torch.no_grad()
def noisy_euler(model: VelocityMLP, x: torch.Tensor, steps: int, noise: float, seed: int) -> torch.Tensor:
    """Euler with N(0, noise^2) added to every velocity: a sampler with estimation errors."""
    gen, grid = torch.Generator().manual_seed(seed), uniform_grid(steps)
    for t, t_next in zip(grid.tolist(), grid[1:].tolist()):
        v = model(x, x.new_full((x.shape[0],), t))
        x = x + (t_next - t) * (v + noise * torch.randn(x.shape, generator=gen))
    return x


def _train(dim: int, hidden: int, aug_dim: float, data, iters: int, seed: int) -> VelocityMLP:
    torch.manual_seed(seed)
    model = VelocityMLP(dim, hidden_size=hidden, num_layers=3)
    source = pfgm_source(dim, aug_dim, seed=seed)
    fit(model, make_loss("icfm"), data, steps=iters, batch_size=256, lr=1e-3, source=source, seed=seed)
    return model.eval()


def _scores(
    model: VelocityMLP, dim: int, count: int, aug_dim: float, args: Any, seed: int, score
) -> dict[str, float]:
    out: dict[str, float] = {}
    start = pfgm_noise(count, dim, aug_dim, generator=torch.Generator().manual_seed(seed + 1000))
    for k in PFGM_STEPS:
        out[str(k)] = score(euler(model, start, uniform_grid(k)).numpy())
    out["noisy"] = score(noisy_euler(model, start, 10, args.sampler_noise, seed).numpy())
    return out


def pfgm_2d(aug_dim: float, args: Any, seed: int, w2) -> dict[str, float]:
    def data(step: int, size: int):
        return torch.from_numpy(moons(size, np.random.default_rng([seed, 0, step]))), None

    started = time.perf_counter()
    model = _train(2, 64, aug_dim, data, args.pfgm_iters_2d, seed)
    target = moons(args.pfgm_points, np.random.default_rng([seed, 2]))

    def score(x: np.ndarray) -> float:
        # a Cauchy-tailed source (D = 1) can leave a few points far out; W2 counts them, as it should
        return w2(np.nan_to_num(x, nan=1e6, posinf=1e6, neginf=-1e6), target)

    out = _scores(model, 2, args.pfgm_points, aug_dim, args, seed, score)
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def pfgm_digits(aug_dim: float, args: Any, seed: int, judge: Judge) -> dict[str, float]:
    (train, _), _ = split()

    def data(step: int, size: int):
        return torch.from_numpy(
            train[np.random.default_rng([seed, 5, step]).integers(0, len(train), size)]
        ), None

    started = time.perf_counter()
    model = _train(64, 256, aug_dim, data, args.digits_iters, seed)

    def score(x: np.ndarray) -> float:
        return judge.fd(np.clip(np.nan_to_num(x), -3.0, 3.0))  # features of finite, bounded pixels

    out = _scores(model, 64, 500, aug_dim, args, seed, score)
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def _print(title: str, runs: dict[str, list[dict[str, float]]], median) -> dict[str, dict[str, float]]:
    columns = [str(k) for k in PFGM_STEPS] + ["noisy"]
    print(title)
    print("| D | " + " | ".join(f"K = {c}" if c != "noisy" else "K = 10, noisy" for c in columns) + " | s |")
    print("|---" * (len(columns) + 2) + "|")
    summary = {}
    for d, rs in runs.items():
        row = {c: median([r[c] for r in rs]) for c in [*columns, "seconds"]}
        summary[d] = row
        print(f"| {d} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + f" | {row['seconds']:.0f} |")
    return summary


def _moons_table(args: Any, names: list[str], dims: list[float], w2, median) -> dict[str, Any]:
    runs = {n: [pfgm_2d(d, args, s, w2) for s in range(args.seeds)] for n, d in zip(names, dims)}
    n = args.pfgm_points
    floors = [w2(moons(n, np.random.default_rng([s, 4])), moons(n, np.random.default_rng([s, 5])))
              for s in range(args.seeds)]  # fmt: skip
    title = (
        f"\nPFGM++ on moons: W2 of {n} samples vs Euler steps ({args.pfgm_iters_2d} steps, "
        f"{args.seeds} seed(s), median; floor {median(floors):.3f}; noisy: velocity noise std "
        f"{args.sampler_noise})\n"
    )
    return {"median": _print(title, runs, median), "runs": runs, "floor": floors}


def pfgm_tables(args: Any, judge: Judge | None, w2, median) -> dict[str, Any]:
    dims = [math.inf if d == "inf" else float(d) for d in args.aug_dims.split(",")]
    names = [("inf (Gaussian)" if math.isinf(d) else f"{d:g}") for d in dims]
    out: dict[str, Any] = {}
    if "2d" in args.pfgm_data:
        out["2d"] = _moons_table(args, names, dims, w2, median)
    if judge is not None:
        runs = {n: [pfgm_digits(d, args, s, judge) for s in range(args.seeds)] for n, d in zip(names, dims)}
        title = (
            f"\nPFGM++ on 8x8 digits: FD of 500 samples vs Euler steps ({args.digits_iters} steps, "
            f"{args.seeds} seed(s), median; FD floor {judge.floor():.1f}; noisy: velocity noise std "
            f"{args.sampler_noise})\n"
        )
        out["digits"] = {"median": _print(title, runs, median), "runs": runs}
    return out
