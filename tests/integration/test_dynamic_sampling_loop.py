"""DAPO's dynamic sampling end to end (trainer.dynamic_sampling): no trained batch holds a group
whose rewards are all equal, every dropped group is counted and replaced by a newly admitted
prompt, and exactly-once holds with the dropped rows in the ledger, in sync (k = 0) and async
mode, on the memory store and on Redis."""

from __future__ import annotations

import collections
import uuid
from pathlib import Path

import pytest

from asyncflow.config import load_config
from asyncflow.errors import WorkerError
from asyncflow.lifeline import sample_life
from asyncflow.recipes.grpo import train
from asyncflow.rundir import RunDir
from tests.integration.test_rl_loop import store_partitions

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).parents[2] / "examples" / "sort.yaml"
N, BATCH, STEPS = 8, 16, 8


def _config(tmp_path, *overrides: str):
    name = f"dapo-{uuid.uuid4().hex[:8]}"
    return load_config(
        EXAMPLE,
        [f"output_dir={tmp_path}", f"dataplane.name={name}", f"trainer.steps={STEPS}", "task.eval_prompts=0",
         "trainer.checkpoint_every=4", "trainer.dynamic_sampling=true", *overrides],
    )  # fmt: skip


def assert_exactly_once_with_drops(summary: dict) -> tuple[list, list]:
    """Every admitted sample was trained once, dropped once, or is still in the store; never two of
    these, and groups are trained or dropped whole."""
    run = RunDir(summary["run_dir"])
    trained, dropped = run.trained(), run.dropped()
    both = trained + dropped
    assert len(both) == len(set(both)), "a sample was trained twice, dropped twice, or both"
    assert len(both) + summary["untrained_rows"] == summary["admitted_prompts"] * N, "a sample was lost"
    for ledger in (trained, dropped):
        assert set(collections.Counter(p for p, _ in ledger).values()) <= {N}, "groups go whole"
    return trained, dropped


@pytest.mark.parametrize(
    "overrides",
    [
        ["mode=sync", "staleness=0"],
        ["staleness=0"],
        ["staleness=1"],
        ["staleness=1", "trainer.num_ranks=2", "trainer.parallel=ddp", "trainer.num_cpus=0.5"],
    ],
    ids=["sync-k0", "async-k0", "async-k1", "async-k1-two-ranks"],
)
def test_trained_batches_hold_no_uniform_group_and_drops_are_replaced(ray_session, tmp_path, overrides):
    summary = train(_config(tmp_path, *overrides), display=False)
    assert summary["steps"] == STEPS
    metrics = RunDir(summary["run_dir"]).metrics()
    assert all(m["uniform_groups"] == 0 for m in metrics), [m["uniform_groups"] for m in metrics]
    assert all(m["samples"] == BATCH * N for m in metrics)  # every batch full of groups with signal
    drops = [m["dropped_groups"] for m in metrics]
    assert sum(drops) > 0, "the warm-started policy fails whole groups: some must be dropped"
    assert summary["dropped_groups"] == sum(drops)
    for m in metrics:
        assert m["dropped_fraction"] == pytest.approx(m["dropped_groups"] / (m["dropped_groups"] + BATCH))
    trained, dropped = assert_exactly_once_with_drops(summary)
    assert len(dropped) == sum(drops) * N
    assert len(trained) == STEPS * BATCH * N
    k = 0 if "staleness=0" in overrides else 1
    assert set(summary["staleness_histogram"]) <= {str(lag) for lag in range(k + 1)}
    # each dropped group freed an admission slot: more prompts came in than without drops
    assert summary["admitted_prompts"] >= STEPS * BATCH + sum(drops)
    assert_step_parts_add_up(summary["run_dir"])
    prompt, sample = dropped[-1]  # its life, from the trace: generated, rewarded, dropped
    life = [s.what for s in sample_life(RunDir(summary["run_dir"]).trace(), prompt, sample)]
    assert life[0] == "admitted" and life[-1] == "dropped" and "trained" not in life, life


def assert_step_parts_add_up(run_dir: str) -> None:
    """trace.json: each trainer step holds its reads, its drops and its training as parts that
    never overlap, so they add up to at most the step (benchmarks/e2e.py's breakdown)."""
    events = RunDir(run_dir).trace()
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    trainer = [e for e in events if e.get("ph") == "X" and names.get(e["pid"]) == "trainer rank 0"]
    parts = ("store.get", "drop_groups", "forward_backward", "optimizer", "publish", "store.ack")
    steps = [e for e in trainer if e["name"] == "step"]
    assert len(steps) == STEPS
    for step in steps:
        end = step["ts"] + step["dur"]
        inside = sorted(
            (
                e
                for e in trainer
                if e["name"] in parts and step["ts"] <= e["ts"] and e["ts"] + e["dur"] <= end
            ),
            key=lambda e: e["ts"],
        )
        for a, b in zip(inside, inside[1:]):
            assert a["ts"] + a["dur"] <= b["ts"] + 1, (a["name"], b["name"])  # 1 µs of rounding
        assert sum(e["dur"] for e in inside) <= step["dur"]
    assert any(e["name"] == "drop_groups" for e in trainer)


def test_on_redis_dropped_groups_are_counted_and_the_store_is_left_clean(ray_session, tmp_path, redis_url):
    config = _config(tmp_path, "dataplane.backend=redis", f"dataplane.redis.url={redis_url}")
    summary = train(config, display=False)
    assert summary["steps"] == STEPS
    metrics = RunDir(summary["run_dir"]).metrics()
    assert all(m["uniform_groups"] == 0 for m in metrics)
    assert sum(m["dropped_groups"] for m in metrics) > 0
    assert_exactly_once_with_drops(summary)
    assert not {"samples", "dropped"} & set(store_partitions(config))


def test_without_it_batches_do_hold_uniform_groups(ray_session, tmp_path):
    """The control: the same run without dynamic sampling trains groups with no signal."""
    summary = train(_config(tmp_path, "trainer.dynamic_sampling=false"), display=False)
    metrics = RunDir(summary["run_dir"]).metrics()
    assert sum(m["uniform_groups"] for m in metrics) > 0
    assert "dropped_groups" not in metrics[0]


def test_a_reward_that_never_varies_fails_naming_the_option(ray_session, tmp_path):
    config = _config(
        tmp_path, "task.reward=tests.integration.faulty_rewards:constant", "trainer.max_dropped_batches=1"
    )
    with pytest.raises(WorkerError, match=r"trainer\.dynamic_sampling.*max_dropped_batches"):
        train(config, display=False)


def test_a_resumed_run_keeps_the_slots_dropped_groups_freed(ray_session, tmp_path):
    """At k = 0 the source admits exactly what the trainer still needs: a resumed source that forgot
    the slots dropped groups freed would admit nothing in place of the next drops, and the step
    would wait for good. The checkpoint keeps them with the cursor; exactly-once holds across."""
    import json

    first = train(
        _config(tmp_path, "staleness=0", "trainer.steps=4", "dataplane.get_timeout_s=60"), display=False
    )
    run_dir = first["run_dir"]
    state = json.loads((Path(run_dir) / "checkpoints" / "step_0000004" / "state.json").read_text())
    assert state["freed"] == sum(m["dropped_groups"] for m in RunDir(run_dir).metrics()) > 0
    resumed = train(RunDir.open(run_dir).config([f"trainer.steps={STEPS}"]), resume=run_dir, display=False)
    assert resumed["steps"] == STEPS
    metrics = RunDir(run_dir).metrics()
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(m["uniform_groups"] == 0 for m in metrics)
    assert_exactly_once_with_drops(resumed)
