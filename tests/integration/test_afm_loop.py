"""examples/flow-robot.yaml at toy size: robot actors stream transitions through the real store to
a trainer that trains the action flow on each one once, within the staleness bound, and
publishes weights the actors pick up while they act."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from asyncflow.config import load_config
from asyncflow.workflow.afm import run_afm, summarize

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).parents[2] / "examples" / "flow-robot.yaml"


def _config(tmp_path, *overrides: str):
    return load_config(
        EXAMPLE,
        [f"output_dir={tmp_path}", "flow.afm.duration_s=4", "flow.afm.robots=8", "flow.afm.batch_size=32",
         "flow.afm.put_every=2", "flow.afm.max_steps=20", *overrides],
    )  # fmt: skip


def test_each_transition_is_trained_once_within_the_staleness_bound(ray_session, tmp_path):
    config = _config(tmp_path, "staleness=1", "flow.afm.num_actors=2")
    result = asyncio.run(run_afm(config))  # a memory store of its own
    trainer, summary = result["trainer"], summarize(result, bin_s=2.0)
    put = summary["transitions_put"]
    assert put > 100 and trainer["version"] == len(trainer["losses"]) > 2  # slow on a loaded machine
    # exactly once: no row trained twice, and every row put was trained or dropped as stale by the store
    assert summary["trained_twice"] == 0
    assert len(trainer["trained"]) + trainer["store"]["dropped_stale"] == put
    assert trainer["store"]["acked"] == len(trainer["trained"])
    # the staleness bound: every row trained at lag <= k
    assert 0 <= min(trainer["lags"]) and max(trainer["lags"]) <= 1
    # actors picked new weights up while acting, never going back
    for versions in result["put_versions"]:
        assert versions == sorted(versions) and versions[-1] > 0
    assert {e["actor"] for e in result["episodes"]} == {0, 1}


def test_the_cli_runs_the_example_and_writes_its_episodes(ray_session, tmp_path):
    from asyncflow.recipes.afm import train

    summary = train(_config(tmp_path, "flow.afm.duration_s=3"), bin_s=1.0, display=False)
    run = Path(summary["run_dir"])
    episodes = [json.loads(line) for line in (run / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == summary["episodes"] > 0 and (run / "config.yaml").exists()
    assert json.loads((run / "summary.json").read_text())["trained_twice"] == 0
    assert summary["max_lag"] <= 2 and len(summary["windows"]) >= 3


def test_the_benchmark_table_runs_at_toy_size(ray_session, tmp_path, capsys):
    import json as json_

    from benchmarks.flow import main

    out = tmp_path / "afm.json"
    main(["--only", "afm", "--seeds", "1", "--afm-duration-s", "2", "--afm-bin-s", "1", "--json", str(out)])
    figures = json_.loads(out.read_text())["afm"]
    assert set(figures["median"]) == {"planner", "afm"}
    assert all(r["trained_twice"] == 0 and r["max_lag"] <= 2 for r in figures["runs"])
    assert "| afm | success |" in capsys.readouterr().out
