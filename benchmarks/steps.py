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


# Process titles (Ray names an actor's process ray::<Class>.<method>) and the role each is counted as.
ROLES = (
    ("TrainerHost", "trainer"),
    ("RolloutHost", "rollout"),
    ("RewardHost", "reward worker"),
    ("reward_child", "reward processes"),
    ("SourceHost", "prompt source"),
    ("ReferenceHost", "reference"),
    ("WeightStore", "weight store"),
    ("ray::IDLE", "Ray itself (raylet, GCS, agents, idle workers)"),
    ("ray::", "store and other actors"),
)


def role_of(title: str) -> str:
    for needle, role in ROLES:
        if needle in title:
            return role
    return "Ray itself (raylet, GCS, agents, idle workers)"


class CpuMeter:
    """CPU milliseconds per step of each role, from the kernel's counters of this process and every
    process under it (Ray's workers and their reward processes): sampled when the run's
    metrics.jsonl reaches step `first` and again at step `last`. Wall time on a shared machine
    moves with everyone else's load; CPU time per step hardly does, so this is the figure to compare
    across runs made at different loads (and it counts every process, Ray's own included)."""

    def __init__(self, metrics_glob: str, root: Path, first: int, last: int):
        import threading

        self.glob, self.root, self.first, self.last = metrics_glob, root, first, last
        self.marks: list[dict[int, tuple[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> CpuMeter:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _steps(self) -> int:
        paths = list(self.root.glob(self.glob))
        return max((sum(1 for _ in p.open()) for p in paths), default=0)

    def _watch(self) -> None:
        for target in (self.first, self.last):
            while self._steps() < target:
                if self._stop.wait(0.05):
                    return
            self.marks.append(snapshot())

    def per_step(self) -> dict[str, float]:
        """ms of CPU per step by role, and their total ({} if the run ended before step `last`)."""
        if len(self.marks) < 2:
            return {}
        (a, b), out = self.marks, {}
        for pid, (role, cpu) in b.items():
            before = a[pid][1] if pid in a and a[pid][0] == role else 0.0
            out[role] = out.get(role, 0.0) + 1000 * (cpu - before) / (self.last - self.first)
        return dict(sorted(out.items(), key=lambda kv: -kv[1])) | {"total": sum(out.values())}


def snapshot() -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds so far) of this process and every process under it."""
    import psutil

    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            with p.oneshot():
                title = " ".join(p.cmdline())
                times = p.cpu_times()
            out[p.pid] = ("driver" if p.pid == me.pid else role_of(title), times.user + times.system)
        except psutil.Error:  # ended meanwhile
            continue
    return out


def cpu_window(steps: int) -> tuple[int, int]:
    """The steps between which CPU is counted: past the first tenth (start-up), before the last (the
    run's end, its final eval, stops processes)."""
    return max(1, min(10, steps // 10)), steps - 1


def cpu_table(results: dict[str, dict[str, Any]]) -> str:
    """CPU ms per step by role, per system (systems without figures left out)."""
    systems = [(s, r["cpu_ms_per_step"]) for s, r in results.items() if r.get("cpu_ms_per_step")]
    if not systems:
        return ""
    roles = list(dict.fromkeys(k for _, cpu in systems for k in cpu if k != "total")) + ["total"]
    lines = [
        "| CPU ms per step | " + " | ".join(s for s, _ in systems) + " |",
        "|---|" + "---|" * len(systems),
    ]
    for role in roles:
        lines.append(f"| {role} | " + " | ".join(f"{cpu.get(role, 0.0):.1f}" for _, cpu in systems) + " |")
    return "\n".join(lines)
