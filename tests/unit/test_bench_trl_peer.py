"""benchmarks/peers/trl_grpo.py without TRL: the shared warm-start's reuse, and the table's CPU
per sample against TRL's."""

from __future__ import annotations

import json

import pytest

from asyncflow.config import parse_config
from benchmarks.peers import trl_grpo


def test_a_saved_warm_start_is_reused_only_for_its_own_size_and_seed(tmp_path):
    large = parse_config(trl_grpo.example_config("large", seed=0))
    stamp = tmp_path / "warm_start.json"
    stamp.write_text(json.dumps({"model": large.model.model_dump(),
                                 "task": large.task.model_dump(mode="json"),
                                 "warmup": large.warmup.model_dump(), "seed": 0}))  # fmt: skip
    assert trl_grpo.reuse_or_warm_start(large, tmp_path, threads=1) == tmp_path  # no training
    more_eval = large.model_copy(update={"task": large.task.model_copy(update={"eval_prompts": 1024})})
    assert trl_grpo.reuse_or_warm_start(more_eval, tmp_path, threads=1) == tmp_path  # the eval: not stamped
    other = parse_config(trl_grpo.example_config("large", seed=1))
    with pytest.raises(ValueError, match="another size or seed") as e:
        trl_grpo.reuse_or_warm_start(other, tmp_path, threads=1)
    assert str(tmp_path) in str(e.value) and "Fix:" in str(e.value)


def run(samples_per_s: float, cpu_total: float, load: float) -> dict:
    return {
        "samples_per_s": samples_per_s, "tokens_per_s": 5 * samples_per_s, "loop_s": 1280 / samples_per_s,
        "steps": 10, "samples": 1280, "reward_last_10pct": 0.5, "load_before": load, "load_after": load + 1,
        "curve": [{"step": 10, "elapsed_s": 1280 / samples_per_s, "eval": 0.6}],
        "cpu_ms_per_step": {"trainer": cpu_total / 2, "total": cpu_total},
    }  # fmt: skip


def test_the_table_gives_cpu_per_sample_and_the_load_beside_samples_per_s():
    runs = {"trl": [run(100.0, 2560.0, 3.0)], "sync": [run(150.0, 1280.0, 4.0)]}
    results = trl_grpo.summarise(runs, before=0.5)
    assert trl_grpo.cpu_per_sample(results["trl"]) == pytest.approx(20.0)  # 2560 ms / 128 samples
    assert trl_grpo.cpu_per_sample(results["sync"]) == pytest.approx(10.0)
    text = trl_grpo.table(results, 0.5, 10, prompts=1024)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
    assert "1024 prompts: a standard error of at most 0.016" in text
    assert "| 1.50x | 4.0 -> 5.0 | 10.00 | 2.00x |" in rows["sync"]
    assert "| 1.00x | 3.0 -> 4.0 | 20.00 | 1.00x |" in rows["trl"]


def test_the_tail_eval_averages_the_snapshots_of_the_last_fifth_of_the_steps():
    curve = [
        {"step": s, "elapsed_s": s / 10, "eval": e} for s, e in ((70, 0.1), (80, 0.3), (90, 0.5), (100, 0.7))
    ]
    assert trl_grpo.tail_eval({"steps": 100, "curve": curve}) == pytest.approx(0.6)  # steps 90 and 100
    assert trl_grpo.tail_eval({"steps": 100, "curve": curve[-1:]}) == pytest.approx(0.7)
    assert trl_grpo.tail_eval({"steps": 100, "curve": [{"step": 50, "eval": 0.2}]}) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "system, mode, engine",
    [("sync", "sync", "torch"), ("async-k1", "async", "torch"), ("async-k1-vllm", "async", "vllm")],
)
def test_each_asyncflow_system_is_the_example_from_the_warm_start_with_its_mode_and_engine(
    system, mode, engine
):
    base = trl_grpo.example_config("medium", seed=0)
    config = parse_config(trl_grpo.system_config(system, base, "/warm", steps=7, threads=2, snapshot_every=3))
    assert (config.mode, config.rollout.engine, config.model.path) == (mode, engine, "/warm")
    assert (config.trainer.steps, config.trainer.checkpoint_every, config.warmup.steps) == (7, 3, 0)
    assert config.rollout.torch_threads == (2 if mode == "sync" else 1)  # async: one thread per role
    assert config.trainer.torch_threads == (2 if mode == "sync" else 1)


def test_the_async_system_with_a_two_thread_trainer_keeps_one_rollout_thread():
    base = trl_grpo.example_config("small", seed=0)
    config = parse_config(
        trl_grpo.system_config("async-k1-t2", base, "/warm", steps=7, threads=1, snapshot_every=7)
    )
    assert (config.mode, config.trainer.torch_threads, config.rollout.torch_threads) == ("async", 2, 1)


def test_a_system_with_overrides_is_its_base_with_those_settings_changed():
    base = trl_grpo.example_config("small", seed=0)
    system = "async-k1+dataplane.num_storage_units=1+reward.isolation=thread"
    config = parse_config(trl_grpo.system_config(system, base, "/warm", steps=7, threads=1, snapshot_every=7))
    plain = parse_config(
        trl_grpo.system_config("async-k1", base, "/warm", steps=7, threads=1, snapshot_every=7)
    )
    assert (config.dataplane.num_storage_units, config.reward.isolation) == (1, "thread")
    assert (plain.dataplane.num_storage_units, plain.reward.isolation) == (2, "auto")
    assert config.model_dump(exclude={"dataplane", "reward"}) == plain.model_dump(
        exclude={"dataplane", "reward"}
    )
