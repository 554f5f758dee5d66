"""`asyncflow report RUN_DIR [RUN_DIR ...]`: one self-contained HTML page about finished or
live runs, side by side (sync against async, k = 0 against k = 2): a summary table, and
plots of reward and eval over steps and wall time, throughput, staleness, idle per role,
the time breakdown per step, and an excerpt of the trace's timeline.

Reads run directories only (metrics.jsonl, summary.json, config.yaml, trace.json); the
page needs no network (inline SVG, no script, no style sheet from elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

import yaml

from asyncflow.errors import ConfigError
from asyncflow.plot import bar_chart, line_chart, timeline_chart
from asyncflow.rundir import RunDir

TRACE_WINDOW_S = 2.0  # the timeline shows this much of the trace, from its last complete step
TRACE_MAX_SPANS = 400


class RunData:
    """What the page shows of one run directory."""

    def __init__(self, path: str | Path):
        run = RunDir.open(path)
        self.path = run.path
        self.metrics = run.metrics()
        if not self.metrics:
            raise ConfigError(
                f"{str(path)!r} has no step in metrics.jsonl yet; report on it once its first step is logged"
            )
        self.summary = run.summary() or {}
        config = yaml.safe_load(run.config_path.read_text()) or {}
        self.mode, self.k = config.get("mode", "async"), config.get("staleness", 1)
        self.label = f"{run.path.name} ({self.mode}, k={self.k})"
        self.trace = read_trace(run)

    def series(self, key: str, x: str = "step") -> list[tuple[float, float]]:
        number = int | float
        return [
            (m[x], m[key])
            for m in self.metrics
            if isinstance(m.get(key), number) and isinstance(m.get(x), number)
        ]

    def numbers(self) -> dict[str, float | None]:
        """The summary table's numbers, each taken from metrics.jsonl (evals: summary.json)."""
        last, hist = self.metrics[-1], self.staleness_totals()
        samples = sum(hist.values())
        return {
            "steps": last["step"],
            "final_reward": last["reward_mean"],
            "reward_avg10": last.get("reward_avg10"),
            "samples_per_s": last.get("samples_per_s"),
            "tokens_per_s": last.get("tokens_per_s"),
            "wall_s": last.get("elapsed_s"),
            "eval_before": self.summary.get("eval_reward_before"),
            "eval_after": self.summary.get("eval_reward_after"),
            "mean_staleness": sum(int(k) * v for k, v in hist.items()) / samples if samples else None,
            "trainer_idle_frac": last.get("trainer_idle_frac"),
            "restarts": last.get("restarts", 0),
        }

    def staleness_totals(self) -> dict[str, int]:
        hist: dict[str, int] = {}
        for m in self.metrics:
            for k, v in m.get("staleness", {}).items():
                hist[k] = hist.get(k, 0) + v
        return dict(sorted(hist.items(), key=lambda kv: int(kv[0])))

    def idle(self) -> dict[str, list[tuple[float, float]]]:
        """Idle fraction per role over steps: the trainer's every step, the workers' when sampled."""
        out = {"trainer": self.series("trainer_idle_frac")}
        for m in self.metrics:
            for role, stats in m.get("workers", {}).items():
                if isinstance(stats, dict) and "idle_frac" in stats:
                    out.setdefault(role, []).append((m["step"], stats["idle_frac"]))
        return out

    def time_breakdown(self) -> dict[str, float]:
        """Mean seconds per step of each `time/<role>/<span>` key."""
        sums: dict[str, list[float]] = {}
        for m in self.metrics:
            for k, v in m.items():
                if k.startswith("time/") and isinstance(v, int | float):
                    sums.setdefault(k[len("time/") :], []).append(v)
        return {k: sum(v) / len(v) for k, v in sorted(sums.items())}


LABELS = {  # the summary table's rows: key -> what it shows
    "steps": "steps", "final_reward": "final reward (last step's mean)",
    "reward_avg10": "reward, last 10 steps' mean", "samples_per_s": "samples / s",
    "tokens_per_s": "tokens / s", "wall_s": "wall time of the steps (s)",
    "eval_before": "held-out eval before", "eval_after": "held-out eval after",
    "mean_staleness": "mean staleness", "trainer_idle_frac": "trainer idle fraction",
    "restarts": "restarts",
}  # fmt: skip


def render(paths: Sequence[str | Path]) -> str:
    """The page's HTML for the run directories `paths` (one column, or one line per plot, each)."""
    if not paths:
        raise ConfigError("asyncflow report needs at least one RUN_DIR")
    runs = [RunData(p) for p in paths]
    title = "AsyncFlow report: " + ", ".join(r.label for r in runs)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        summary_table(runs),
        *plots(runs),
        *(timeline(r) for r in runs),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write(paths: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Write the page to `out` (default: report.html in the first run directory); returns its path."""
    html = render(paths)
    target = Path(out) if out is not None else Path(paths[0]) / "report.html"
    target.write_text(html)
    return target


def summary_table(runs: list[RunData]) -> str:
    head = "".join(f'<th data-run="{i}">{escape(r.label)}</th>' for i, r in enumerate(runs))
    rows = []
    numbers = [r.numbers() for r in runs]
    for key, label in LABELS.items():
        cells = "".join(
            f'<td data-run="{i}" data-key="{key}">{_shown(n[key])}</td>' for i, n in enumerate(numbers)
        )
        rows.append(f"<tr><th>{escape(label)}</th>{cells}</tr>")
    hist = "".join(
        f'<td data-run="{i}" data-key="staleness_histogram">'
        f"{escape(', '.join(f'{k}: {v}' for k, v in r.staleness_totals().items()))}</td>"
        for i, r in enumerate(runs)
    )
    rows.append(f"<tr><th>samples by staleness</th>{hist}</tr>")
    return f'<table id="summary"><tr><th></th>{head}</tr>{"".join(rows)}</table>'


def _shown(value: Any) -> str:
    if value is None:
        return "–"
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def plots(runs: list[RunData]) -> list[str]:
    """One figure per plot; each run is a series (or a group of series) in it."""
    reward = {r.label: r.series("reward_mean") for r in runs}
    timed = {r.label: r.series("reward_mean", x="elapsed_s") for r in runs}
    for r in runs:  # held-out evals: before the first step, after the last
        before, after = r.summary.get("eval_reward_before"), r.summary.get("eval_reward_after")
        first, last = r.metrics[0], r.metrics[-1]
        if before is not None or after is not None:
            at = [(first["step"] - 1, 0.0, before), (last["step"], last.get("elapsed_s", 0.0), after)]
            reward[f"{r.label} eval"] = [(step, v) for step, _, v in at if v is not None]
            timed[f"{r.label} eval"] = [(t, v) for _, t, v in at if v is not None]
    figures = [
        ("reward-step", "reward over steps", _lines(reward, title="reward (and held-out eval)",
                                                        x_label="step", y_label="reward")),
        ("reward-time", "reward over wall time", _lines(
            timed, title="reward (and held-out eval) over wall time", x_label="seconds", y_label="reward")),
        ("throughput", "throughput", _lines(
            {r.label: r.series("samples_per_s") for r in runs}, title="samples / s (run so far)",
            x_label="step", y_label="samples / s")),
        ("staleness", "staleness", _lines(
            {r.label: _mean_staleness(r) for r in runs}, title="mean staleness of the step's samples",
            x_label="step", y_label="versions behind")),
        ("idle", "idle per role", _lines(
            {f"{r.label}: {role}": pts for r in runs for role, pts in r.idle().items() if pts},
            title="idle fraction per role", x_label="step", y_label="idle fraction")),
    ]  # fmt: skip
    out = [_figure(key, caption, svg) for key, caption, svg in figures]
    for i, r in enumerate(runs):
        breakdown = r.time_breakdown()
        svg = (
            bar_chart(breakdown, title=f"{r.label}: mean seconds per step", x_label="seconds")
            if breakdown
            else '<p class="none">no time breakdown (no time/... keys in metrics.jsonl)</p>'
        )
        out.append(_figure(f"time-{i}", f"time breakdown per step: {r.label}", svg))
    return out


def _lines(series: dict[str, list[tuple[float, float]]], *, title: str, x_label: str, y_label: str) -> str:
    """A line chart, or a note when no run has a point of it (a key older runs did not log)."""
    if not any(series.values()):
        return f'<p class="none">no data for {escape(title)}</p>'
    kept = {k: v for k, v in series.items() if v}
    return line_chart(kept, title=title, x_label=x_label, y_label=y_label)


def _mean_staleness(r: RunData) -> list[tuple[float, float]]:
    out = []
    for m in r.metrics:
        hist = m.get("staleness", {})
        n = sum(hist.values())
        if n:
            out.append((m["step"], sum(int(k) * v for k, v in hist.items()) / n))
    return out


def _figure(key: str, caption: str, body: str) -> str:
    return f'<figure data-plot="{key}">{body}<figcaption>{escape(caption)}</figcaption></figure>'


def timeline(run: RunData) -> str:
    """A window of the run's trace (Chrome trace events): one lane per process and thread."""
    key = f"timeline-{run.path.name}"
    if run.trace is None:
        return _figure(key, f"timeline: {run.label}", '<p class="none">no trace (no trace.json)</p>')
    names, spans = run.trace
    if not spans:
        return _figure(key, f"timeline: {run.label}", '<p class="none">no trace (no complete spans)</p>')
    end = max(e["ts"] + e["dur"] for e in spans)
    window = [e for e in spans if e["ts"] + e["dur"] >= end - TRACE_WINDOW_S * 1e6][-TRACE_MAX_SPANS:]
    lanes: dict[str, list[tuple[float, float, str]]] = {}
    for e in sorted(window, key=lambda e: (str(e.get("pid")), str(e.get("tid")))):
        process, thread = (
            names.get((e.get("pid"), None), str(e.get("pid"))),
            names.get((e.get("pid"), e.get("tid"))),
        )
        lane = f"{process} / {thread}" if thread and thread != process else process
        lanes.setdefault(lane, []).append((e["ts"] / 1e6, e["dur"] / 1e6, str(e.get("name", "?"))))
    svg = timeline_chart(lanes, title=f"{run.label}: the last {TRACE_WINDOW_S:g} s of the trace")
    return _figure(key, f"timeline: {run.label}", svg)


def read_trace(run: RunDir) -> tuple[dict[tuple[Any, Any], str], list[dict]] | None:
    """Lane names and complete ("X") events of the run's trace.json (a live run's too: RunDir.trace
    reads an array not closed yet, or cut inside an event). None when there is no file."""
    if not run.trace_path.exists():
        return None
    events = run.trace()
    names: dict[tuple[Any, Any], str] = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name"):
            tid = e.get("tid") if e["name"] == "thread_name" else None
            names[(e.get("pid"), tid)] = str(e.get("args", {}).get("name", ""))
    spans = [e for e in events if e.get("ph") == "X" and "ts" in e and "dur" in e]
    return names, spans


STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin-bottom: 24px; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: right; }
th:first-child { text-align: left; }
figure { display: inline-block; margin: 8px; vertical-align: top; }
figcaption { font-size: 12px; color: #666; text-align: center; }
.none { color: #999; font-style: italic; }
"""
