"""The live metric sinks, each written to and read back through its real reader: Prometheus
scraped over HTTP, TensorBoard's event files through its EventAccumulator, a W&B offline run
on disk."""

from __future__ import annotations

import socket
import time

import pytest
from readback import dashboard_metrics, scrape, wandb_history  # tests/: on sys.path beside conftest.py

from asyncflow.errors import ConfigError
from asyncflow.exporters import Point, points
from asyncflow.exporters.prometheus import Prometheus

LINE = {
    "step": 3, "version": 3, "reward_mean": 0.5, "reward/format": 0.75, "samples_per_s": 120.5,
    "staleness": {"0": 96, "1": 32}, "time/rollout/generate": 0.25, "time/trainer/train": 0.5,
    "workers": {"rollout": {"idle_frac": 0.1, "samples": 256, "engine_tokens_per_s": 900.0},
                "queues": {"trainer": 128, "reward": 0}},
    "store": {"rows": 300, "bytes": 4096, "leased_rows": 128}, "mode_note": "text is left out",
}  # fmt: skip


def test_points_name_every_number_of_a_line_once_with_its_labels():
    found = {(p.name, p.labels): p.value for p in points(LINE)}
    assert found[("reward_mean", ())] == 0.5
    assert found[("reward_component", (("component", "format"),))] == 0.75
    assert found[("staleness_samples", (("staleness", "1"),))] == 32
    assert found[("step_time_seconds", (("role", "trainer"), ("span", "train")))] == 0.5
    assert found[("worker_idle_frac", (("role", "rollout"),))] == 0.1
    assert found[("worker_engine_tokens_per_s", (("role", "rollout"),))] == 900.0
    assert found[("queue_ready_rows", (("consumer", "trainer"),))] == 128
    assert found[("store_leased_rows", ())] == 128
    assert ("step", ()) not in found  # the axis
    assert len(found) == len(points(LINE)) == 16  # text is no point; nothing named twice
    assert Point("step_time_seconds", (("role", "rollout"), ("span", "generate")), 1).tag == (
        "step_time_seconds/rollout/generate"
    )


def test_prometheus_serves_the_last_step_over_http_and_keeps_sampled_worker_stats():
    sink = Prometheus("127.0.0.1", 0, "toy")
    try:
        sink.write(3, points(LINE))
        got = scrape(sink.port)
        assert got[("asyncflow_step", (("run", "toy"),))] == 3
        assert got[("asyncflow_reward_mean", (("run", "toy"),))] == 0.5
        assert got[("asyncflow_staleness_samples", (("run", "toy"), ("staleness", "0")))] == 96
        assert got[("asyncflow_queue_ready_rows", (("consumer", "trainer"), ("run", "toy")))] == 128
        sink.write(4, points({"step": 4, "reward_mean": 0.625, "staleness": {"1": 128}}))
        got = scrape(sink.port)
        assert got[("asyncflow_step", (("run", "toy"),))] == 4
        assert got[("asyncflow_reward_mean", (("run", "toy"),))] == 0.625
        assert ("asyncflow_staleness_samples", (("run", "toy"), ("staleness", "0"))) not in got  # that step's
        assert got[("asyncflow_worker_idle_frac", (("role", "rollout"), ("run", "toy")))] == 0.1  # kept
    finally:
        sink.close()


def test_prometheus_port_in_use_is_a_config_error_naming_it():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"logging.prometheus_port = {port}.*free port"):
            Prometheus("127.0.0.1", port, "toy")


def test_tensorboard_event_files_read_back_through_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from asyncflow.exporters.tensorboard import TensorBoard

    sink = TensorBoard(tmp_path / "tb")
    for step in (1, 2, 3):
        sink.write(step, points({**LINE, "step": step, "reward_mean": step / 4}))
    sink.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward_mean")] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert [e.value for e in events.Scalars("step_time_seconds/rollout/generate")] == [0.25] * 3
    assert "queue_ready_rows/trainer" in events.Tags()["scalars"]


def test_wandb_offline_run_is_written_to_the_run_directory_without_network(tmp_path, monkeypatch):
    from asyncflow.exporters.wandb import WandB

    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = WandB(tmp_path, "asyncflow-test", "offline", {"run_name": "toy"})
    for step in (1, 2):
        sink.write(step, points({**LINE, "step": step, "reward_mean": step / 4}))
    sink.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    file, deadline = next(runs[0].glob("run-*.wandb")), time.monotonic() + 20
    while len(history := wandb_history(file)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # wandb's writer process may finish the file just after finish() returns
    assert [(h["_step"], h["reward_mean"]) for h in history] == [(1, 0.25), (2, 0.5)]
    assert history[0]["step_time_seconds/rollout/generate"] == 0.25
    assert history[1]["queue_ready_rows/trainer"] == 128


def test_every_dashboard_expression_names_a_metric_the_exporter_serves():
    trainer_keys = ["samples", "tokens", "reward_avg10", "is_weight_mean", "is_weight_max", "loss",
                    "is_truncated_fraction", "mismatch_kl", "logprob_diff_max", "publish_s", "publish_bytes",
                    "wait_s", "step_s", "tokens_per_s", "trainer_idle_frac", "restarts"]  # fmt: skip
    line = {**LINE, **{k: 1.0 for k in trainer_keys}}
    line["workers"] = {**LINE["workers"], "rollout": {**LINE["workers"]["rollout"], "weight_sync_s": 0.5}}
    sink = Prometheus("127.0.0.1", 0, "toy")
    try:
        sink.write(3, points(line))
        served = {name for name, _ in scrape(sink.port)}
    finally:
        sink.close()
    assert dashboard_metrics() - served == set()
    assert len(dashboard_metrics()) >= 20
