"""benchmarks/rollout_scheduler.py runs end to end at toy size; its simulator runs the engine's
policy with a fitted step cost."""

from __future__ import annotations

import json

import pytest

from benchmarks.rollout_scheduler import main
from benchmarks.rollout_sim import Episode, StepCost, Turn, fit_step_cost, simulate_engine

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_fit_recovers_a_linear_step_cost():
    truth = StepCost(0.002, 1e-4, 3e-6, 5e-5)
    log = [(r, kv, p, truth.seconds(r, kv, p)) for r in (1, 4, 9) for kv in (10, 300) for p in (0, 40)]
    fitted = fit_step_cost(log)
    for got, want in zip(fitted.__dict__.values(), truth.__dict__.values()):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="3 steps logged"):
        fit_step_cost(log[:3])


def test_simulator_runs_groups_by_policy():
    # One row, 1 s a step: group 0 has two 3-token episodes, group 1 one 3-token episode.
    turn = (Turn(prompt_tokens=2, new_tokens=3, tool_s=0.0),)
    episodes = [Episode(0, 0, turn), Episode(0, 1, turn), Episode(1, 0, turn)]
    cost = StepCost(1.0, 0.0, 0.0, 0.0)
    fcfs = simulate_engine(episodes, policy="fcfs", cost=cost, budget_tokens=100, max_rows=1)
    rl = simulate_engine(episodes, policy="rl", cost=cost, budget_tokens=100, max_rows=1)
    assert fcfs["group_done_s"] == {0: 6.0, 1: 9.0}  # arrival order
    assert rl["group_done_s"] == {1: 3.0, 0: 9.0}  # the group one sample from complete first
    tight = simulate_engine(episodes, policy="fcfs", cost=cost, budget_tokens=9, max_rows=3, keep_kv=False)
    assert tight["preemptions"] > 0 and tight["recomputed_tokens"] > 0


def test_benchmark_runs_at_toy_size(tmp_path, capsys):
    out = tmp_path / "bench.json"
    toy = ["--groups", "4", "--n", "2", "--b", "2", "--kv-budget", "700", "--max-rows", "4", "--hidden", "64"]
    main(
        [
            *toy,
            "--engines",
            "3",
            "--repeats",
            "1",
            "--gap-s",
            "0.01",
            "--tool-scale",
            "0.05",
            "--json",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())["rows"]
    real = {r["policy"]: r for r in rows if r["where"] == "real (median of 1)"}
    assert set(real) == {"fcfs", "rl", "rl recompute", "rl + turn KV"}
    assert real["rl"]["recomputed"] == 0  # preempted KV kept: nothing computed twice
    # recomputing: every preemption costs tokens (whether the toy preempts depends on the machine's speed)
    recompute = real["rl recompute"]
    assert (recompute["recomputed"] > 0) == (recompute["preemptions"] > 0)
    assert real["rl"]["reused"] == 0 and real["rl + turn KV"]["reused"] > 0
    assert all(0 < r["optimal_pct"] < 100 and r["p50_s"] <= r["p99_s"] for r in real.values())
    assert {r["where"] for r in rows} == {"real (median of 1)", "sim (this run)", "sim x3 engines"}
    assert "first_B_s" in capsys.readouterr().out
