"""Action Flow Matching on the point robot: the table of `benchmarks/flow.py --only afm`.

Per seed, two arms run examples/flow-robot.yaml through the whole loop (Ray actors, the memory
store, the weight store, staleness bound 2) for `--afm-duration-s` seconds of acting each, on
the same episodes (seeded starts and goals):

    planner  CEM with the misaligned model alone (flow.afm.refine: false); the trainer still
             trains on its transitions, so both arms share the machine alike
    afm      CEM + the action flow, which the trainer keeps improving while the robots act

Per `--afm-bin-s` window of wall time since the actors started: the success rate of the
episodes that ended in it, and the median steps to the goal of the successful ones (the oracle
that inverts the drift exactly needs about 40). Medians over seeds; the arms alternate which
runs first.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flow-robot.yaml"
ARMS = ("planner", "afm")


def afm_run(arm: str, seed: int, duration_s: float, bin_s: float, output_dir: str) -> dict[str, Any]:
    from asyncflow.config import load_config
    from asyncflow.workflow import init_ray
    from asyncflow.workflow.afm import run_afm, summarize

    config = load_config(
        EXAMPLE,
        [f"seed={seed}", f"flow.afm.duration_s={duration_s}", f"flow.afm.refine={arm == 'afm'}",
         f"output_dir={output_dir}"],
    )  # fmt: skip
    init_ray(config)
    result = asyncio.run(run_afm(config))
    return summarize(result, bin_s) | {"arm": arm, "seed": seed, "acted_s": result["acted_s"]}


def _cell(value: Any, form: str) -> str:
    return "-" if value is None else format(value, form)


def afm_table(args: Any, median) -> dict[str, Any]:
    import tempfile

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for arm in ARMS if seed % 2 == 0 else ARMS[::-1]:
                runs.append(afm_run(arm, seed, args.afm_duration_s, args.afm_bin_s, tmp))
    windows = min(len(r["windows"]) for r in runs)
    heads = [f"{w['from_s']:.0f}-{w['to_s']:.0f} s" for w in runs[0]["windows"][:windows]]
    print(
        f"\nAction Flow Matching on the point robot (examples/flow-robot.yaml: 16 robots, CEM 64 x 3, drift "
        f"gain 0.7 / turn 1.2 rad / wind 0.3; {args.afm_duration_s:g} s of acting per arm; {args.seeds} "
        f"seed(s), median). Success rate, then median steps to the goal of the successful episodes, of "
        f"the episodes ending in each window of wall time\n"
    )
    print("| arm | measure | " + " | ".join(heads) + " | episodes | updates | dropped stale | max lag |")
    print("|---" * (windows + 6) + "|")
    summary: dict[str, Any] = {}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        success = [median([r["windows"][i]["success"] for r in mine]) for i in range(windows)]
        steps = [median([r["windows"][i]["median_steps"] for r in mine]) for i in range(windows)]
        totals = {k: median([r[k] for r in mine]) for k in ("episodes", "versions", "dropped_stale")}
        totals["max_lag"] = max(r["max_lag"] for r in mine)
        summary[arm] = {"success": success, "median_steps": steps, **totals}
        tail = " | ".join(["", *(f"{totals[k]:.0f}" for k in ("episodes", "versions", "dropped_stale")), ""])
        tail += f"{totals['max_lag']} |"
        print(f"| {arm} | success | " + " | ".join(_cell(s, ".2f") for s in success) + tail)
        print(f"| {arm} | steps | " + " | ".join(_cell(s, ".0f") for s in steps) + " | | | | |")
    assert all(r["trained_twice"] == 0 for r in runs), "a transition was trained twice"
    return {"median": summary, "runs": runs}
