"""Where a step goes: milliseconds per step of every role's spans, from a run's trace.json.

The trainer's step and its parts add up to it ("other" is the Python between them); every other
role's spans are summed per step beside it. benchmarks/e2e.py prints it for every AsyncFlow run,
and so does its TRL comparison (benchmarks/peers/trl_grpo.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TRAINER_PARTS = ("store.get", "drop_groups", "forward_backward", "optimizer", "publish", "store.ack")


def breakdown(run_dir: Path, steps: int) -> dict[str, float]:
    """Milliseconds per step of each part of the trainer's step, from the run's trace.json (every
    span, summed over the run, over `steps`): its parts, and "other" (Python between them), so
    that the parts add up to the step; and each other role's busy spans per step."""
    from asyncflow.rundir import RunDir

    names = {e["pid"]: e["args"]["name"] for e in RunDir(run_dir).trace() if e.get("name") == "process_name"}
    total: dict[str, float] = {}
    for e in RunDir(run_dir).trace():
        if e.get("ph") == "X":
            role = names.get(e["pid"], "?").split(" rank ")[0].rstrip(" 0123456789")
            key = f"{role}/{e['name']}"
            total[key] = total.get(key, 0.0) + e["dur"] / 1e3 / steps
    parts = {f"trainer/{p}": total.pop(f"trainer/{p}", 0.0) for p in TRAINER_PARTS}
    step = total.pop("trainer/step", 0.0)
    parts["trainer/other"] = step - sum(parts.values())
    return {"trainer/step": step, **parts, **dict(sorted(total.items()))}


def breakdown_table(results: dict[str, dict[str, Any]]) -> str:
    """Where a step's milliseconds go, per system: the trainer's step and its parts (they add up to
    it), then the other roles' busy spans per step."""
    keys = list(
        dict.fromkeys(k for per in results.values() for r in per.values() for k in r.get("breakdown", {}))
    )
    systems = [(g, s, r) for g, per in results.items() for s, r in per.items() if r.get("breakdown")]
    if not systems:
        return ""
    lines = ["| ms per step | " + " | ".join(f"{g}{s}" for g, s, _ in systems) + " |",
             "|---|" + "---|" * len(systems)]  # fmt: skip
    for key in keys:
        cells = " | ".join(f"{r['breakdown'].get(key, 0.0):.2f}" for _, _, r in systems)
        lines.append(f"| {key} | {cells} |")
    return "\n".join(lines)
