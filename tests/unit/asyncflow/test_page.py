"""The `asyncflow report` page from run directories written here: what it shows of each run,
the trace timeline (a live trace.json included), and the errors for what it cannot show."""

from __future__ import annotations

import json
from pathlib import Path
from xml.dom import minidom

import pytest

from asyncflow import page
from asyncflow.cli import main
from asyncflow.config import load_config
from asyncflow.errors import ConfigError
from asyncflow.rundir import RunDir

EXAMPLE = Path(__file__).parents[3] / "examples" / "sort.yaml"


def make_run(tmp_path: Path, mode: str, steps: int) -> RunDir:
    run = RunDir.create(load_config(EXAMPLE, [f"output_dir={tmp_path}", f"mode={mode}", f"run_name={mode}"]))
    for step in range(1, steps + 1):
        run.log({
            "step": step, "reward_mean": step / (steps + 1), "reward_avg10": step / (steps + 2),
            "samples_per_s": 100.0 + step, "tokens_per_s": 600.0 + step, "elapsed_s": 0.5 * step,
            "trainer_idle_frac": 0.25, "staleness": {"0": 96, "1": 32},
            "time/rollout/generate": 0.125, "time/trainer/train": 0.25,
            **({"workers": {"rollout": {"idle_frac": 0.5}}} if step % 2 else {}),
        })  # fmt: skip
    return run


def test_the_page_shows_each_run_side_by_side_with_its_numbers(tmp_path):
    a, b = make_run(tmp_path, "async", 4), make_run(tmp_path, "sync", 6)
    html = page.render([a.path, b.path])
    assert html.count("<svg") == 5 + 2  # five plots, a time breakdown per run
    assert 'data-run="0" data-key="steps">4<' in html and 'data-run="1" data-key="steps">6<' in html
    assert 'data-run="1" data-key="final_reward">0.857143<' in html  # 6/7, step 6's reward_mean
    assert 'data-run="0" data-key="mean_staleness">0.25<' in html  # 32 of 128 samples one behind
    assert f'data-series="{a.path.name} (async, k=1)"' in html and "(sync, k=1)" in html
    assert "rollout/generate" in html and "no trace (no trace.json)" in html
    for svg in html.split("<svg")[1:]:
        minidom.parseString("<svg" + svg.split("</svg>")[0] + "</svg>")  # each plot is well-formed


def test_the_timeline_reads_a_live_trace_without_its_closing_bracket(tmp_path):
    run = make_run(tmp_path, "async", 2)
    events = [{"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "rollout-0"}},
              {"ph": "X", "name": "generate", "pid": 7, "tid": 1, "ts": 0, "dur": 250_000},
              {"ph": "X", "name": "train", "pid": 8, "tid": 1, "ts": 100_000, "dur": 50_000}]  # fmt: skip
    text = json.dumps(events)[:-1] + ',\n{"ph": "X", "name": "cut'  # a run still writing it
    (run.path / "trace.json").write_text(text)
    names, spans = page.read_trace(run)  # type: ignore[misc]
    assert [e["name"] for e in spans] == ["generate", "train"] and names[(7, None)] == "rollout-0"
    html = page.render([run.path])
    assert html.count('class="span"') == 2 and ">rollout-0<" in html and "no trace" not in html


def test_cli_writes_the_page_into_the_run_directory_and_refuses_a_run_without_steps(tmp_path, capsys):
    run = make_run(tmp_path, "async", 3)
    assert main(["report", str(run.path)]) == 0
    assert capsys.readouterr().out.strip() == str(run.path / "report.html")
    assert (run.path / "report.html").read_text().startswith("<!DOCTYPE html>")
    empty = RunDir.create(load_config(EXAMPLE, [f"output_dir={tmp_path}", "run_name=empty"]))
    with pytest.raises(ConfigError, match="no step in metrics.jsonl yet"):
        page.render([empty.path])
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_a_run_that_logged_fewer_keys_gets_notes_instead_of_plots(tmp_path):
    run = RunDir.create(load_config(EXAMPLE, [f"output_dir={tmp_path}", "run_name=old"]))
    run.log({"step": 1, "reward_mean": 0.5, "staleness": {}})  # no rates, idle, times: an older run
    html = page.render([run.path])
    assert "no data for samples / s" in html and "no data for idle fraction per role" in html
    assert html.count("<svg") == 1  # reward over steps; over wall time (no elapsed_s): a note
