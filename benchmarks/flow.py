"""Flow-matching benchmark: pre-training losses' quality, the RL curve, PMRF, PFGM++, AFM, BOSS.

1. Quality. Transport eight Gaussians (torchcfm's: radius 5, covariance sqrt(0.1) I) to
   moons (torchcfm's: sklearn moons, noise 0.2, x * 3 - 1). Each method trains the same
   MLP shape (3 hidden layers of 64) on the same batches for the same number of Adam steps;
   samples from 2000 held-out source points are compared with 2000 held-out moons points by
   the exact 2-Wasserstein distance (an optimal assignment, scipy). Steps 1, 2, 4 and 100
   on the uniform grid, and 2 and 4 on BOSS's Bellman grid (stage 1 only: the grid, no
   fine-tuning; 100 fine steps, 500 cost samples). Methods: ours (services.flow) I-CFM,
   OT-CFM (exact minibatch OT), W-CFM (eps 10 and 30), SplitMeanFlow (mean-flow jumps; BOSS
   does not apply), and torchcfm 1.0.7's ConditionalFlowMatcher and
   ExactOptimalTransportConditionalFlowMatcher with its own MLP, trained in the same run and
   sampled with the same Euler sampler (its time runs the other way: v(x, t) = -v_tc(x, 1 - t)).
   The floor is the W2 between two independent moons samples.

2. RL. examples/flow-2d.yaml through the full workflow (Ray actors, store, weight store) at
   staleness k = 0, 1, 4: hit rate (share of 2000 SDE samples within distance 1 of the target
   mode, the policy's own sampler) of every checkpoint (every 20 steps), seconds from the
   first RL step to the first checkpoint at >= 0.95, and an SVG of the curves.

3. PMRF on 8 x 8 digits (benchmarks/flow_pmrf.py): PMRF against the MMSE predictor, a flow
   conditioned on y and a flow from y, on digits degraded by noise, blur and masks; MSE,
   FD in a small classifier's features and its accuracy, at K = 1, 2, 5, 10, 50 steps.

4. PFGM++ (benchmarks/flow_pfgm.py): W2 on moons and FD on digits against Euler steps, and
   with a noisy sampler, for several augmented dimensions D (inf: the Gaussian).

5. The plug-in context encoder (benchmarks/flow_encoder.py): digits inpainting by a context
   encoder on a frozen pre-trained backbone against full fine-tuning, supervised then
   Flow-GRPO, at equal time (CPU seconds of the one-thread process): bytes per weight update,
   agreement, MSE, FD.

6. Action Flow Matching (benchmarks/flow_afm.py): examples/flow-robot.yaml, a CEM planner with a
   misaligned model alone against planner + the action flow trained online through the store:
   success rate and steps to the goal per window of wall time.
7. BOSS stage 2 (benchmarks/flow_boss.py): the model fine-tuned on its K chosen steps against
   the Bellman grid alone (stage 1) and the uniform grid, W2 on the quality table's data.

    flock /tmp/asyncflow-bench.lock .venv/bin/python benchmarks/flow.py --iters 20000 --rl-seeds 3 \\
        --json docs/bench-flow.json --svg docs/bench-flow-rl.svg
    .venv/bin/python benchmarks/flow.py --iters 500 --skip-rl    # quick look
    .venv/bin/python -m benchmarks.flow --only pmrf,pfgm --seeds 3    # tables 3 and 4 (see --help)
    .venv/bin/python -m benchmarks.flow --only encoder --seeds 3      # table 5
    .venv/bin/python -m benchmarks.flow --only afm --seeds 3          # table 6
    .venv/bin/python -m benchmarks.flow --only boss --seeds 3         # table 7

Needs the `bench` extra (torchcfm, POT, scipy, scikit-learn; see pyproject.toml for the light
install).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asyncflow.config import load_config  # noqa: E402
from asyncflow.plot import line_chart  # noqa: E402
from asyncflow.tasks.gaussians import eight_gaussians, hit, moons  # noqa: E402
from services.flow import VelocityMLP, euler, mean_flow_sample, sde_sample, uniform_grid  # noqa: E402
from services.flow.boss import bellman_grid, jump_costs  # noqa: E402
from services.flow.losses import fit, make_loss  # noqa: E402

STEPS = (1, 2, 4, 100)
BOSS_STEPS = (2, 4)
METHODS = ("icfm", "otcfm", "wcfm-10", "wcfm-30", "splitmeanflow", "torchcfm-icfm", "torchcfm-otcfm")
GAUSS_STD = 0.1**0.25  # torchcfm samples with covariance sqrt(0.1) * I


# ------------------------------------------------------------------------------------- quality


def w2(x: np.ndarray, y: np.ndarray) -> float:
    """Exact 2-Wasserstein distance between two equal-size empirical distributions."""
    from scipy.optimize import linear_sum_assignment

    cost = ((x[:, None, :].astype(np.float64) - y[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


def batches(seed: int):
    """Training batch `step` of both ends: (moons data, eight-Gaussians source), the same for every method."""

    def data(step: int, size: int) -> tuple[torch.Tensor, None]:
        return torch.from_numpy(moons(size, np.random.default_rng([seed, 0, step]))), None

    def source(step: int, size: int) -> torch.Tensor:
        rng = np.random.default_rng([seed, 1, step])
        return torch.from_numpy(eight_gaussians(size, rng, radius=5.0, std=GAUSS_STD))

    return data, source


class TorchCFMVelocity(torch.nn.Module):
    """torchcfm's model (t = 0 source, t = 1 data) seen in our convention (t = 1 source)."""

    dim, condition_dim, mean_flow = 2, 0, False

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, t, cond=None):
        return -self.net(torch.cat([x, (1 - t)[:, None]], dim=-1))


def train_torchcfm(method: str, iters: int, seed: int) -> TorchCFMVelocity:
    from torchcfm.conditional_flow_matching import (
        ConditionalFlowMatcher,
        ExactOptimalTransportConditionalFlowMatcher,
    )
    from torchcfm.models import MLP

    torch.manual_seed(seed)
    net = MLP(dim=2, time_varying=True, w=64)
    matcher = (
        ConditionalFlowMatcher(0.0) if method == "icfm" else ExactOptimalTransportConditionalFlowMatcher(0.0)
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    data, source = batches(seed)
    for step in range(iters):
        x1, x0 = data(step, 256)[0], source(step, 256)
        t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
        loss = (net(torch.cat([xt, t[:, None]], dim=-1)) - ut).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return TorchCFMVelocity(net.eval())


def train_ours(method: str, iters: int, seed: int) -> VelocityMLP:
    torch.manual_seed(seed)
    mean_flow = method == "splitmeanflow"
    model = VelocityMLP(2, 0, hidden_size=64, num_layers=3, mean_flow=mean_flow)
    name, _, eps = method.partition("-")
    loss = make_loss(name, wcfm_eps=float(eps or 10))
    data, source = batches(seed)
    fit(model, loss, data, steps=iters, batch_size=256, lr=1e-3, source=source, seed=seed)
    return model.eval()


def quality(method: str, iters: int, seed: int) -> dict[str, Any]:
    start = time.perf_counter()
    if method.startswith("torchcfm-"):
        model: Any = train_torchcfm(method.removeprefix("torchcfm-"), iters, seed)
    else:
        model = train_ours(method, iters, seed)
    seconds = time.perf_counter() - start
    rng = np.random.default_rng([seed, 2])
    noise = torch.from_numpy(eight_gaussians(2000, rng, radius=5.0, std=GAUSS_STD))
    target = moons(2000, rng)
    out: dict[str, Any] = {"train_s": round(seconds, 1)}
    with torch.no_grad():
        for k in STEPS:
            sampler = mean_flow_sample if method == "splitmeanflow" else euler
            out[f"uniform-{k}"] = w2(sampler(model, noise, uniform_grid(k)).numpy(), target)
        if method != "splitmeanflow":
            cost_noise = torch.from_numpy(
                eight_gaussians(500, np.random.default_rng([seed, 3]), radius=5.0, std=GAUSS_STD)
            )
            costs = jump_costs(model, cost_noise, 100)
            for k in BOSS_STEPS:
                grid = bellman_grid(costs, k)
                out[f"boss-{k}"] = w2(euler(model, noise, grid).numpy(), target)
                out[f"boss-{k}-grid"] = [round(float(t), 2) for t in grid]
    return out


def floor(seed: int) -> float:
    rng = np.random.default_rng([seed, 4])
    return w2(moons(2000, rng), moons(2000, rng))


# ------------------------------------------------------------------------------------------ RL


def rl_run(staleness: int, seed: int, steps: int, out_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    from asyncflow.recipes.grpo import train
    from asyncflow.rundir import RunDir
    from workers.kinds import make_kind
    from workers.policy import make_task

    config = load_config(
        ROOT / "examples" / "flow-2d.yaml",
        [f"output_dir={out_dir}", f"staleness={staleness}", f"seed={seed}", f"trainer.steps={steps}",
         "trainer.checkpoint_every=20", f"dataplane.name=bench-flow-{staleness}-{seed}-{time.time_ns()}"],
    )  # fmt: skip
    summary = train(config, display=False)
    run = RunDir(summary["run_dir"])
    metrics = run.metrics()
    task = make_task(config.task, config.seed)
    kind: Any = make_kind(config, task)
    model = kind.model(0)
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(12345))
    answer = task.eval_example(0).answer
    curve = {0: summary["eval_reward_before"]}
    for path in sorted(Path(summary["run_dir"], "checkpoints").glob("step_*")):
        model.load_state_dict(load_file(str(path / "trainer" / "model.safetensors")))
        latents, _ = sde_sample(
            model, noise, uniform_grid(config.flow.steps), None, config.flow.noise_level,
            generator=torch.Generator().manual_seed(54321),
        )  # fmt: skip
        curve[int(path.name.removeprefix("step_"))] = float(
            np.mean([hit((), x, answer) for x in latents[-1].numpy()])
        )
    elapsed = {m["step"]: m["elapsed_s"] for m in metrics}
    reached = next((s for s, h in sorted(curve.items()) if s and h >= 0.95), None)
    return {
        "staleness": staleness,
        "seed": seed,
        "hit": curve,
        "eval_after": summary["eval_reward_after"],
        "reward_first_10pct": summary["reward_first_10pct"],
        "reward_last_10pct": summary["reward_last_10pct"],
        "seconds_to_0.95": elapsed[reached] if reached else None,
        "step_to_0.95": reached,
        "rl_seconds": summary["seconds"],
        "staleness_histogram": summary["staleness_histogram"],
        "is_weight_max": max(m["is_weight_max"] for m in metrics),
        "logprob_diff_max": max(m["logprob_diff_max"] for m in metrics),
    }


# ---------------------------------------------------------------------------------------- main


def median(values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def seed_tables(args: argparse.Namespace, tables: set[str]) -> dict[str, Any]:
    """The PMRF, PFGM++ and encoder tables (benchmarks/flow_pmrf.py, flow_pfgm.py, flow_encoder.py)."""
    if not tables & {"pmrf", "pfgm", "encoder"}:
        return {}
    from benchmarks.flow_digits import Judge
    from benchmarks.flow_pfgm import pfgm_tables
    from benchmarks.flow_pmrf import pmrf_table

    judge = Judge(0)
    out: dict[str, Any] = {}
    if "pmrf" in tables:
        out["pmrf"] = pmrf_table(args, judge, median)
    if "pfgm" in tables:
        out["pfgm"] = pfgm_tables(args, judge if "digits" in args.pfgm_data else None, w2, median)
    if "encoder" in tables:
        from benchmarks.flow_encoder import encoder_table

        out["encoder"] = encoder_table(args, judge, median)
    return out


def afm_tables(args: argparse.Namespace, tables: set[str]) -> dict[str, Any]:
    """The Action Flow Matching table (benchmarks/flow_afm.py): Ray runs, so after the digits tables."""
    if "afm" not in tables:
        return {}
    import ray

    from benchmarks.flow_afm import afm_table

    try:
        return {"afm": afm_table(args, median)}
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10000, help="Adam steps per pre-training run")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per method (medians are reported)")
    parser.add_argument("--rl-seeds", type=int, default=1, help="seeds per RL staleness")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS)
    )
    parser.add_argument("--staleness", default="0,1,4", help="RL runs at these k")
    parser.add_argument("--rl-steps", type=int, default=300)
    parser.add_argument("--skip-rl", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument(
        "--only",
        help="comma-separated tables to run, of quality,rl,pmrf,pfgm,encoder,afm,boss (default: "
        "quality,rl, less --skip-*)",
    )
    parser.add_argument(
        "--digits-iters", type=int, default=3000, help="Adam steps per digits model (pmrf, pfgm)"
    )
    parser.add_argument("--degradations", default="noise,blur,mask", help="pmrf: of asyncflow.tasks.digits")
    parser.add_argument(
        "--sigma-s", type=float, default=0.1, help="pmrf: source noise std (paper: 0.025-0.1)"
    )
    parser.add_argument("--aug-dims", default="1,8,64,inf", help="pfgm: the D values (inf: Gaussian)")
    parser.add_argument("--pfgm-iters-2d", type=int, default=5000, help="pfgm: Adam steps per 2-D model")
    parser.add_argument("--pfgm-data", default="2d,digits", help="pfgm: which tables, of 2d,digits")
    parser.add_argument(
        "--pfgm-points", type=int, default=2000, help="pfgm: 2-D samples per W2 (exact assignment)"
    )
    parser.add_argument(
        "--sampler-noise", type=float, default=0.5, help="pfgm: velocity noise std, noisy column"
    )
    parser.add_argument(
        "--encoder-sup-s",
        type=float,
        default=60.0,
        help="encoder: CPU seconds of supervised training per arm",
    )
    parser.add_argument(
        "--encoder-rl-s", type=float, default=60.0, help="encoder: CPU seconds of Flow-GRPO per arm"
    )
    parser.add_argument("--afm-duration-s", type=float, default=60.0, help="afm: seconds of acting per arm")
    parser.add_argument("--afm-bin-s", type=float, default=10.0, help="afm: width of a window of wall time")
    parser.add_argument("--boss-iters", type=int, default=10000, help="boss: Adam steps of the I-CFM teacher")
    parser.add_argument("--boss-steps", default="2,4", help="boss: the step counts K")
    parser.add_argument("--boss-tune-steps", type=int, default=2000, help="boss: stage 2 Adam steps")
    parser.add_argument("--boss-lr", type=float, default=1e-4, help="boss: stage 2 learning rate")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--svg", type=Path, help="write the RL hit-rate curves here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    payload: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    tables = (
        set(args.only.split(","))
        if args.only
        else {"quality", "rl"}
        - {t for t, skip in (("quality", args.skip_quality), ("rl", args.skip_rl)) if skip}
    )
    known = {"quality", "rl", "pmrf", "pfgm", "encoder", "afm", "boss"}
    if tables - known:
        parser.error(f"--only: unknown tables {sorted(tables - known)}; expected some of {sorted(known)}")
    payload.update(seed_tables(args, tables))
    payload.update(afm_tables(args, tables))
    if "boss" in tables:
        from benchmarks.flow_boss import boss_table

        payload["boss"] = boss_table(args, train_ours, w2, median, GAUSS_STD, floor)

    if "quality" in tables:
        methods = args.methods.split(",")
        runs = {m: [quality(m, args.iters, s) for s in range(args.seeds)] for m in methods}
        floors = [floor(s) for s in range(args.seeds)]
        columns = [f"uniform-{k}" for k in STEPS] + [f"boss-{k}" for k in BOSS_STEPS]
        print(f"\nW2 8gaussians -> moons ({args.iters} iterations, {args.seeds} seed(s), median; floor "
              f"{median(floors):.3f})\n")  # fmt: skip
        print("| method | " + " | ".join(c.replace("-", " ") for c in columns) + " | train s |")
        print("|---" * (len(columns) + 2) + "|")
        summary = {}
        for m, rs in runs.items():
            row = {c: median([r.get(c) for r in rs]) for c in [*columns, "train_s"]}
            summary[m] = row
            cells = ["" if row[c] is None else f"{row[c]:.2f}" for c in columns]
            print(f"| {m} | " + " | ".join(cells) + f" | {row['train_s']:.0f} |")
        payload["quality"] = {"median": summary, "runs": runs, "floor": floors}

    if "rl" in tables:
        import ray

        ks = [int(k) for k in args.staleness.split(",")]
        with tempfile.TemporaryDirectory() as tmp:
            rl = [rl_run(k, s, args.rl_steps, Path(tmp)) for k in ks for s in range(args.rl_seeds)]
        ray.shutdown()
        marks = sorted({s for r in rl for s in r["hit"]})
        print(
            f"\nRL on examples/flow-2d.yaml: hit rate of 2000 SDE samples ({args.rl_seeds} seed(s), median)\n"
        )
        shown = [s for s in marks if s in (0, 20, 40, 60, 100, 200, 300) or s == marks[-1]]
        print("| k | " + " | ".join(f"@{s}" for s in shown) + " | s to 0.95 | RL s | max IS weight |")
        print("|---" * (len(shown) + 4) + "|")
        for k in ks:
            rs = [r for r in rl if r["staleness"] == k]
            hits = [f"{median([r['hit'].get(s) for r in rs]):.2f}" for s in shown]
            to = median([r["seconds_to_0.95"] for r in rs])
            print(
                f"| {k} | " + " | ".join(hits) + f" | {'-' if to is None else f'{to:.1f}'} | "
                f"{median([r['rl_seconds'] for r in rs]):.1f} | {max(r['is_weight_max'] for r in rs):.2f} |"
            )
        payload["rl"] = rl
        if args.svg:
            series = {
                f"k = {k}": sorted(
                    (s, median([r["hit"].get(s) for r in rl if r["staleness"] == k])) for s in marks
                )
                for k in ks
            }
            args.svg.write_text(
                line_chart(
                    series,
                    title="flow-2d: hit rate of the target mode",
                    x_label="RL step",
                    y_label="hit rate",
                )
            )
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
