"""Action Flow Matching on the point robot: `asyncflow run` with `flow.afm` set.

Actors plan with a misaligned model and act; a trainer keeps improving the action refiner
from the transitions they stream through the store (asyncflow.workflow.afm). The run
directory gets the config, every episode (`episodes.jsonl`) and the summary (`summary.json`):
success and median steps to the goal per `bin_s` window, and the loop's bookkeeping.
"""

from __future__ import annotations

import asyncio
import json

from asyncflow.config import AsyncFlowConfig
from asyncflow.rundir import RunDir
from asyncflow.workflow import init_ray
from asyncflow.workflow.afm import run_afm, summarize

__all__ = ["train"]


def train(config: AsyncFlowConfig, *, bin_s: float = 10.0, display: bool = True) -> dict:
    """Run AFM for flow.afm.duration_s; returns the summary."""
    if config.flow.afm is None:
        raise ValueError("asyncflow.recipes.afm needs flow.afm set; see examples/flow-robot.yaml")
    init_ray(config)
    run = RunDir.create(config)
    result = asyncio.run(run_afm(config))
    summary = summarize(result, bin_s) | {"run_dir": str(run.path), "acted_s": round(result["acted_s"], 1)}
    with open(run.path / "episodes.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in result["episodes"])
    (run.path / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if display:
        for w in summary["windows"]:
            success = "-" if w["success"] is None else f"{w['success']:.2f}"
            print(f"  {w['from_s']:5.0f}-{w['to_s']:<5.0f}s  episodes {w['episodes']:4d}  success {success}  "
                  f"median steps {w['median_steps']}")  # fmt: skip
    return summary
