"""Metrics leave a real run live and come back equal to metrics.jsonl: Prometheus scraped over
HTTP while the run trains, Ray's metrics agent, TensorBoard's event files, a W&B offline run;
and `asyncflow report` of an async and a sync run, opened in a real headless browser."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest
from readback import dashboard_metrics, scrape, wandb_history  # tests/: on sys.path beside conftest.py
from test_rl_loop import _config, train_in_thread

from asyncflow.cli import main
from asyncflow.recipes.grpo import train
from asyncflow.rundir import RunDir

pytestmark = pytest.mark.integration
STEPS = 4
FAST = [f"trainer.steps={STEPS}", "task.eval_prompts=16", "warmup.steps=0", "trainer.checkpoint_every=0"]


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    """An async run with every sink on (Prometheus scraped while it trains) and a sync run."""
    out = tmp_path_factory.mktemp("observe")
    for attempt in range(3):  # a free port may be taken before the run binds it (a busy machine)
        result, scrapes, agent = observed_run(out / f"async-{attempt}")
        if "logging.prometheus_port" not in str(result.get("error", "")):
            break
    assert "error" not in result, result.get("error")
    sync = train(
        _config(out / "sync", *FAST, "mode=sync", "staleness=0", "task.eval_prompts=0"), display=False
    )
    return {"async": result, "sync": sync, "scrapes": scrapes, "agent": agent}


def observed_run(out: Path) -> tuple[dict, list[dict], dict[str, float]]:
    """Train with every sink on; scrape /metrics while it trains, and Ray's agent until it shows
    the last step. Returns the run's summary (or error), the scrapes and the agent's metrics."""
    from conftest import free_port

    port = free_port()
    sinks = [f"logging.prometheus_port={port}", "logging.ray_metrics=true", "logging.tensorboard=true",
             "logging.wandb=true", "run_name=observed"]  # fmt: skip
    runner, result = train_in_thread(_config(out, *FAST, *sinks))
    scrapes, agent, polled, deadline = [], {}, 0.0, float("inf")
    while runner.is_alive() or (agent.get("ray_asyncflow_step") != STEPS and time.monotonic() < deadline):
        if runner.is_alive():
            try:
                scrapes.append(scrape(port))
            except OSError:
                pass  # not serving yet
        elif "error" in result:
            break
        elif deadline == float("inf"):
            deadline = time.monotonic() + 60  # the agent may export the last step a little later
        if time.monotonic() - polled > 1:  # Ray's agent exports what it was sent every few seconds
            agent, polled = ray_agent_metrics(), time.monotonic()
        time.sleep(0.05)
    runner.join()
    return result, scrapes, agent


def ray_agent_metrics() -> dict[str, float]:
    """ray_asyncflow_* without labels of run "observed", from this node's Ray metrics agent."""
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ray_asyncflow_") and 'run="observed"' in line
    }


def test_prometheus_scraped_during_the_run_shows_each_step_as_metrics_jsonl_has_it(runs):
    lines = {m["step"]: m for m in RunDir(runs["async"]["run_dir"]).metrics()}
    run = (("run", "observed"),)
    seen = {s[("asyncflow_step", run)]: s for s in runs["scrapes"] if ("asyncflow_step", run) in s}
    assert seen, f"no scrape of /metrics saw a step ({len(runs['scrapes'])} scrapes)"
    for step, scraped in seen.items():  # each scrape holds one whole step, equal to its line
        line = lines[int(step)]
        assert scraped[("asyncflow_reward_mean", run)] == pytest.approx(line["reward_mean"])
        assert scraped[("asyncflow_samples_per_s", run)] == pytest.approx(line["samples_per_s"])
        assert scraped[("asyncflow_publish_bytes", run)] == line["publish_bytes"] > 0
        for k, n in line["staleness"].items():
            assert scraped[("asyncflow_staleness_samples", (*run, ("staleness", k)))] == n
    served = {name for s in seen.values() for name, _ in s}
    # all the dashboard shows, but for spans (time/... keys, there when tracing is) and reward
    # components (the sorting reward has none)
    assert dashboard_metrics() - served <= {"asyncflow_step_time_seconds", "asyncflow_reward_component"}
    if any(k.startswith("time/") for k in lines[STEPS]):
        assert "asyncflow_step_time_seconds" in served


def test_ray_metrics_agent_publishes_the_last_step(runs):
    last = RunDir(runs["async"]["run_dir"]).metrics()[-1]
    assert runs["agent"].get("ray_asyncflow_step") == STEPS, sorted(runs["agent"])
    assert runs["agent"]["ray_asyncflow_reward_mean"] == pytest.approx(last["reward_mean"])


def test_tensorboard_and_wandb_hold_every_step_of_metrics_jsonl(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(runs["async"]["run_dir"])
    lines = RunDir(run_dir).metrics()
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for key in ("reward_mean", "samples_per_s", "publish_s", "mismatch_kl"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == [
            (m["step"], pytest.approx(m[key])) for m in lines
        ]
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history = wandb_history(wandb_file)
    assert [(h["_step"], h["reward_mean"]) for h in history] == [(m["step"], m["reward_mean"]) for m in lines]


class Dom(HTMLParser):
    """The rendered page's table cells (by run and key), per figure its series' names, and the
    figures that hold timeline spans or bars."""

    def __init__(self, text: str):
        super().__init__()
        self.cells: dict[tuple[str, str], str] = {}
        self.series: dict[str, list[str]] = {}
        self.texts: list[str] = []
        self.spans: set[str] = set()  # figures holding timeline spans
        self.bars: set[str] = set()  # figures holding bars
        self._cell: tuple[str, str] | None = None
        self._figure = ""
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure":
            self._figure = a.get("data-plot", "")
        if tag == "td" and "data-key" in a:
            self._cell = (a["data-run"], a["data-key"])
            self.cells[self._cell] = ""
        if a.get("class") == "series":
            self.series.setdefault(self._figure, []).append(a["data-series"])
        if a.get("class") in ("span", "bar"):  # a timeline's span, a time breakdown's bar
            (self.spans if a["class"] == "span" else self.bars).add(self._figure)

    def handle_data(self, data):
        self.texts.append(data)
        if self._cell is not None:
            self.cells[self._cell] += data

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None


def test_report_page_renders_in_a_browser_with_the_numbers_of_metrics_jsonl(runs, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium is not None, (
        "no chromium binary: the report's test opens the page in a real browser; scripts/setup installs "
        "it as root (apt-get install chromium), or install it by hand"
    )
    dirs = [runs["async"]["run_dir"], runs["sync"]["run_dir"]]
    page = tmp_path / "report.html"
    assert main(["report", *dirs, "-o", str(page)]) == 0
    browse = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,2400"]
    dom = subprocess.run([*browse, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0 and "<table" in dom.stdout, dom.stderr[-2000:]
    doc = Dom(dom.stdout)
    for i, run_dir in enumerate(dirs):  # the numbers shown are those of metrics.jsonl
        lines = RunDir(run_dir).metrics()
        assert int(doc.cells[(str(i), "steps")]) == STEPS == lines[-1]["step"]
        assert float(doc.cells[(str(i), "final_reward")]) == pytest.approx(lines[-1]["reward_mean"], rel=1e-5)
        assert float(doc.cells[(str(i), "samples_per_s")]) == pytest.approx(
            lines[-1]["samples_per_s"], rel=1e-5
        )
        assert float(doc.cells[(str(i), "wall_s")]) == pytest.approx(lines[-1]["elapsed_s"], rel=1e-5)
    labels = [f"{Path(d).name} (async, k=1)" for d in dirs[:1]] + [f"{Path(dirs[1]).name} (sync, k=0)"]
    for plot in ("reward-step", "reward-time", "throughput", "staleness"):
        assert set(labels) <= set(doc.series[plot]), (plot, doc.series.get(plot))
    assert any(s.endswith(": trainer") for s in doc.series["idle"])
    for i, run_dir in enumerate(dirs):  # a timeline of the trace, or a note that there is none
        traced = (Path(run_dir) / "trace.json").exists()
        assert (f"timeline-{Path(run_dir).name}" in doc.spans) == traced
        assert any(t == "no trace (no trace.json)" for t in doc.texts) or traced
        timed = any(k.startswith("time/") for k in RunDir(run_dir).metrics()[-1])
        assert (f"time-{i}" in doc.bars) == timed
    shot = tmp_path / "page.png"
    subprocess.run(
        [*browse, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True
    )
    assert_drawn(shot, ["#1f77b4", "#d62728"])  # the two runs' lines, as pixels


def assert_drawn(png: Path, colors: list[str]) -> None:
    """Each colour covers some pixels of the screenshot: the plots were drawn, not just parsed."""
    from PIL import Image

    pixels = list(Image.open(png).convert("RGB").getdata())
    for color in colors:
        want = tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))
        near = sum(1 for p in pixels if sum(abs(a - b) for a, b in zip(p, want)) < 40)
        assert near > 200, f"{color}: {near} pixels of that colour in {png}"
