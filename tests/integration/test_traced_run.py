"""A run's trace end to end: the example for a few steps on real Ray actors, its trace.json, the
per-step time breakdown, the OTLP export and `asyncflow trace --sample`."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from asyncflow.cli import main
from asyncflow.lifeline import sample_life
from asyncflow.recipes.grpo import train
from asyncflow.rundir import RunDir
from tests.integration.test_rl_loop import _config, assert_exactly_once
from tests.unit.asyncflow.test_otlp import Collector

pytestmark = pytest.mark.integration

TRACKS = {  # each actor's track and the spans it must have
    "prompt source": {"admit"},
    "rollout 0": {"generate", "weights.wait", "weights.pull", "weights.switch", "store.wait", "store.put"},
    "reward 0": {"reward", "store.wait", "store.put"},
    "reference": {"reference", "store.wait", "store.put"},
    "trainer rank 0": {
        "step",
        "store.get",
        "forward_backward",
        "optimizer",
        "publish",
        "store.ack",
        "checkpoint",
    },
}


def test_a_run_traces_every_actor_and_each_sample_s_life(ray_session, tmp_path, capsys):
    collector = Collector()
    try:
        config = _config(
            tmp_path, "trainer.steps=6", "warmup.steps=5", "task.eval_prompts=0",
            "trainer.checkpoint_every=0", "reference.enabled=true", "trainer.kl_coef=0.01",
            "trace.collect_every_s=0", f"trace.otlp_endpoint={collector.url}",
        )  # fmt: skip
        summary = train(config, display=False)
    finally:
        collector.close()
    trained = assert_exactly_once(summary)
    run = RunDir(summary["run_dir"])
    events = json.loads(run.trace_path.read_text())  # the run ended: plain JSON, the array closed
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert sorted(names.values()) == sorted(TRACKS)  # one named track per actor
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["pid"] for e in spans} <= set(names)
    for track, expected in TRACKS.items():
        have = {e["name"] for e in spans if names[e["pid"]] == track}
        assert expected <= have, (track, expected - have)
    _steps_hold_their_parts([e for e in spans if names[e["pid"]] == "trainer rank 0"])
    # the source puts a whole engine call's prompts at a time, so rollout wakes to one full call, not
    # several small ones (for a small model an engine call's cost is mostly per decode step, not per row)
    calls = config.rollout.groups_per_call
    assert {e["args"]["prompts"] for e in spans if e["name"] == "admit"} == {calls}
    assert statistics.median(e["args"]["groups"] for e in spans if e["name"] == "generate") == calls

    # the samples: every trained one was admitted, generated, rewarded, scored by the reference, trained
    ledger = {tuple(r): record["step"] for record in _ledger(run) for r in record["rows"]}
    for prompt, sample in [trained[0], trained[len(trained) // 2], trained[-1]]:
        stages = sample_life(events, prompt, sample)
        order = [s.what for s in stages]
        assert order[0] == "admitted" and order[-1] == "trained", order
        assert order.index("generated") < order.index("rewarded") < order.index("trained")
        assert "ref logprobs" in order
        assert stages[-1].args["version"] == ledger[(prompt, sample)]  # the step it trained at

    # the step lines carry the time breakdown of the latest collection
    metrics = run.metrics()
    timed = [m for m in metrics if "time/trainer/step" in m]
    assert len(timed) >= len(metrics) - 2 and all(m["time/trainer/step"] > 0 for m in timed)
    assert any(m.get("time/rollout/generate", 0) > 0 for m in timed)

    # the collector got the same spans, nested
    exported = {s.name for _, s in collector.spans}
    assert {"admit", "generate", "reward", "reference", "step", "optimizer", "publish"} <= exported

    # the command line prints one sample's life, in order, at the step the ledger names
    prompt, sample = trained[-1]
    capsys.readouterr()
    assert main(["trace", str(run.path), "--sample", f"{prompt}:{sample}"]) == 0
    out = capsys.readouterr().out
    assert out.index("admitted") < out.index("generated") < out.index("rewarded") < out.index("trained")
    assert f"at step {ledger[(prompt, sample)]} " in out and "waited" in out
    assert main(["trace", str(run.path), "--sample", "100000:0"]) == 2
    assert "no prompt 100000 in the trace: it holds prompts 0.." in capsys.readouterr().err


def _steps_hold_their_parts(trainer: list[dict]) -> None:
    """Each train step contains its wait for data, forward/backward, optimizer step and publication."""
    steps = [e for e in trainer if e["name"] == "step"]
    assert len(steps) == 6
    for step in steps:
        inside = {
            e["name"]
            for e in trainer
            if step["ts"] <= e["ts"] and e["ts"] + e["dur"] <= step["ts"] + step["dur"]
        }
        assert {"store.get", "forward_backward", "optimizer", "publish", "store.ack"} <= inside, inside


def _ledger(run: RunDir) -> list[dict]:
    return [json.loads(line) for line in Path(run.path, "trained.jsonl").read_text().splitlines()]


def test_trace_needs_a_run_that_recorded_one(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("run_name: x\n")
    assert main(["trace", str(tmp_path), "--sample", "0:0"]) == 2
    assert "has no trace.json: the run recorded no spans" in capsys.readouterr().err
