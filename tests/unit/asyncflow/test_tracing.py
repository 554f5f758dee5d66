"""The tracer, trace.json in the run directory, the writer of tracks and a sample's life."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from asyncflow.config import AsyncFlowConfig, TraceConfig
from asyncflow.errors import ConfigError
from asyncflow.lifeline import format_life, parse_sample, sample_life
from asyncflow.rundir import RunDir
from asyncflow.tracing import Tracer, breakdown, traced
from asyncflow.workflow.traces import Traces


def test_a_span_is_a_complete_event_in_wall_clock_microseconds_with_its_args():
    tracer = Tracer()
    before = time.time_ns() // 1000
    with tracer.span("step", held=3) as args:
        with tracer.span("optimizer"):
            time.sleep(0.01)
        args["version"] = 4  # known only at the end
    after = time.time_ns() // 1000
    inner, outer = tracer.drain()  # in the order they ended
    assert (outer["name"], outer["ph"], outer["args"]) == ("step", "X", {"held": 3, "version": 4})
    assert before <= outer["ts"] <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"]
    assert outer["ts"] + outer["dur"] <= after and inner["dur"] >= 10_000
    assert tracer.drain() == []  # drained once


def test_the_spans_in_flight_are_those_begun_and_not_ended_with_their_rows():
    tracer = Tracer()
    with tracer.span("step"):
        with tracer.span("store.get", row_ids=[4, 5]):
            time.sleep(0.01)
            doing = tracer.in_flight()
        assert [s["name"] for s in tracer.in_flight()] == ["step"]
    assert [s["name"] for s in doing] == ["step", "store.get"]  # oldest first
    assert doing[1]["row_ids"] == [4, 5] and doing[0]["for_s"] >= doing[1]["for_s"] >= 0.01
    assert tracer.in_flight() == []
    with pytest.raises(ValueError), tracer.span("reward"):
        raise ValueError("bad reward")
    assert tracer.in_flight() == []  # an error ends a span too


def test_an_exception_leaving_a_span_is_noted_and_raised():
    tracer = Tracer()
    with pytest.raises(ValueError), tracer.span("reward"):
        raise ValueError("bad reward")
    assert tracer.drain()[0]["args"] == {"error": "ValueError"}


def test_a_tracer_that_is_off_records_nothing():
    tracer = Tracer(enabled=False)
    with tracer.span("generate", tokens=3) as args:
        args["more"] = 1  # a throw-away dict
    tracer.complete("store.wait", 0, 1000)
    tracer.instant("version", v=1)
    assert tracer.drain() == []


def test_the_buffer_is_bounded_and_says_how_many_it_dropped():
    tracer = Tracer(max_events=3)
    for i in range(5):
        tracer.complete("store.put", i * 1000, i * 1000 + 500, rows=i)
    events = tracer.drain()
    assert [e["args"]["rows"] for e in events[:3]] == [0, 1, 2]
    assert events[3]["name"] == "trace.dropped" and events[3]["args"] == {"events": 2, "max_events": 3}
    tracer.complete("store.put", 0, 1)
    assert len(tracer.drain()) == 1  # the count starts again


def test_traced_makes_each_call_a_span_with_args_from_its_arguments(monkeypatch):
    import asyncflow.tracing as tracing

    class Worker:
        @traced("reward", lambda batch: {"row_ids": batch})
        async def process(self, batch):
            return len(batch)

    assert asyncio.run(Worker().process([7])) == 1 and tracing.tracer.drain() == []  # off until a host
    monkeypatch.setattr(tracing, "tracer", Tracer())  # turns it on
    assert asyncio.run(Worker().process([7, 8])) == 2
    (event,) = tracing.tracer.drain()
    assert event["name"] == "reward" and event["args"] == {"row_ids": [7, 8]}


def test_breakdown_sums_seconds_per_role_and_span():
    x = {"ph": "X", "name": "generate", "dur": 250_000}
    events = [("rollout", x), ("rollout", x), ("reward", {**x, "name": "reward"}), ("rollout", {"ph": "i"})]
    assert breakdown(events) == {"time/reward/reward": 0.25, "time/rollout/generate": 0.5}


def test_trace_json_is_appended_left_open_closed_and_reopened(tmp_path):
    run = RunDir(tmp_path)
    run.append_trace([{"name": "a", "ph": "X", "ts": 1, "dur": 2, "pid": 1, "tid": 0}])
    run.append_trace([])
    run.append_trace([{"name": "b", "ph": "X", "ts": 3, "dur": 1, "pid": 1, "tid": 0}])
    assert run.trace_path.read_text().startswith("[\n") and not run.trace_path.read_text().endswith("]\n")
    assert [e["name"] for e in run.trace()] == ["a", "b"]  # open, as Chrome reads it
    run.close_trace()
    run.close_trace()  # once only
    assert [e["name"] for e in json.loads(run.trace_path.read_text())] == ["a", "b"]  # plain JSON
    run.append_trace([{"name": "c", "ph": "i", "ts": 5, "pid": 1, "tid": 0}])  # a resumed run
    run.close_trace()
    assert [e["name"] for e in json.loads(run.trace_path.read_text())] == ["a", "b", "c"]


def test_a_trace_cut_short_by_a_kill_reads_up_to_its_last_whole_event(tmp_path):
    run = RunDir(tmp_path)
    run.append_trace(
        [{"name": "a", "ph": "X", "ts": 1, "dur": 2}, {"name": "b", "ph": "X", "ts": 3, "dur": 1}]
    )
    with open(run.trace_path, "a") as f:
        f.write(',\n{"name": "c", "ph"')
    assert [e["name"] for e in run.trace()] == ["a", "b"]


def test_the_writer_names_each_track_once_and_puts_events_on_it(tmp_path):
    run = RunDir(tmp_path)
    traces = Traces(TraceConfig(), run)
    span = {"name": "generate", "ph": "X", "ts": 10, "dur": 500_000, "args": {}}
    reply = {"role": "rollout", "track": 3001, "name": "rollout 1", "events": [dict(span)]}
    assert traces.write([reply]) == {"time/rollout/generate": 0.5}
    traces.write([{**reply, "events": [dict(span)]}])
    events = run.trace()
    names = [e for e in events if e["name"] == "process_name"]
    assert names == [
        {"name": "process_name", "ph": "M", "pid": 3001, "tid": 0, "args": {"name": "rollout 1"}}
    ]
    assert [(e["pid"], e["tid"]) for e in events if e["name"] == "generate"] == [(3001, 0), (3001, 0)]


# ---------------------------------------------------------------------- one sample's life


def _span(name, pid, ts, dur, **args):
    return {"name": name, "ph": "X", "pid": pid, "tid": 0, "ts": ts, "dur": dur, "args": args}


def _life_events() -> list[dict]:
    """Prompts 4 and 5 (n = 2, rows 10..13) admitted, generated, rewarded in two batches, trained."""
    return [
        {"name": "process_name", "ph": "M", "pid": 1000, "tid": 0, "args": {"name": "prompt source"}},
        {"name": "process_name", "ph": "M", "pid": 3000, "tid": 0, "args": {"name": "rollout 0"}},
        {"name": "process_name", "ph": "M", "pid": 4000, "tid": 0, "args": {"name": "reward 0"}},
        {"name": "process_name", "ph": "M", "pid": 2000, "tid": 0, "args": {"name": "trainer rank 0"}},
        _span("step", 2000, 0, 901_000, held=0, version=1, row_ids=[10, 11, 12, 13]),  # waits from 0
        _span("store.get", 2000, 0, 601_000, rows=4),
        _span("admit", 1000, 500, 1_000, prompt=4, prompts=2, n=2, version=0, row_ids=[10, 11, 12, 13]),
        _span("generate", 3000, 100_000, 200_000, row_ids=[10, 11, 12, 13], groups=2, version=0, tokens=9),
        _span("reward", 4000, 350_000, 10_000, row_ids=[10, 11]),
        _span("reward", 4000, 400_000, 10_000, row_ids=[12, 13]),
    ]


def test_a_sample_s_life_is_its_row_s_spans_in_time_order():
    stages = sample_life(_life_events(), 5, 1)  # row 13
    assert [(s.what, s.track) for s in stages] == [
        ("admitted", "prompt source"), ("generated", "rollout 0"), ("rewarded", "reward 0"),
        ("trained", "trainer rank 0"),
    ]  # fmt: skip
    assert stages[2].start_us == 400_000  # its own reward batch, not its group's other one
    assert stages[3].start_us == 601_000  # training starts when the batch arrived (store.get's end)
    text = format_life(stages, "5:1")
    assert text.index("admitted") < text.index("generated") < text.index("rewarded") < text.index("trained")
    assert "waited 0.099 s" in text and "+0.000s  admitted" in text and "at step 1 (version 0 -> 1)" in text
    assert "waited 0.191 s" in text  # ready at 0.410 s, taken by the trainer at 0.601 s


def test_a_group_s_life_has_every_sample_s_spans():
    assert [s.what for s in sample_life(_life_events(), 4)] == [
        "admitted",
        "generated",
        "rewarded",
        "trained",
    ]
    assert [s.what for s in sample_life(_life_events(), 5)].count("rewarded") == 1


def test_an_unknown_sample_is_refused_with_the_ones_the_trace_holds():
    with pytest.raises(
        ConfigError, match=r"no prompt 9 in the trace: it holds prompts 4\.\.5, samples 0\.\.1"
    ):
        sample_life(_life_events(), 9, 0)
    with pytest.raises(ConfigError, match=r"prompt 4 has samples 0\.\.1 \(rollout.n = 2\), not 2"):
        sample_life(_life_events(), 4, 2)
    with pytest.raises(ConfigError, match="trace.enabled false"):
        sample_life([], 0, 0)


def test_sample_ids_are_prompt_colon_sample_or_a_prompt():
    assert parse_sample("12:3") == (12, 3) and parse_sample("12") == (12, None)
    with pytest.raises(ConfigError, match=r"'12-3' is not PROMPT:SAMPLE \(e\.g\. 12:3"):
        parse_sample("12-3")


def test_the_trace_section_is_on_by_default_and_refuses_an_endpoint_that_is_not_http():
    assert AsyncFlowConfig().trace.enabled
    with pytest.raises(ValueError, match="otlp_endpoint 'localhost:4318' is not an http"):
        TraceConfig(otlp_endpoint="localhost:4318")
