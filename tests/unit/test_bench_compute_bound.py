"""benchmarks/compute_bound.py runs and its bounds follow from its own figures."""

from __future__ import annotations

import json

import pytest

from benchmarks import compute_bound

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_bounds_are_the_samples_over_the_measured_compute(tmp_path, capsys):
    out = tmp_path / "f.json"
    assert compute_bound.main(["--repeats", "1", "--json", str(out)]) == 0
    f = json.loads(out.read_text())
    assert f["samples"] == 128 and f["generate_ms"] > 0 and f["train_ms"] > 0 and f["pack_64_rows_us"] > 0
    assert f["sync_bound_samples_per_s"] == pytest.approx(1000 * 128 / (f["generate_ms"] + f["train_ms"]))
    assert f["async_2core_bound_samples_per_s"] >= f["sync_bound_samples_per_s"]
    # the engine with finished rows dropped, every row to the end, and transformers' generate
    assert f["generate_every_row_to_the_end_ms"] > 0 and f["hf_generate_ms (TRL's generation)"] > 0
    assert f["generate_bf16_ms (rollout.autocast)"] > 0 and f["train_bf16_ms (trainer.autocast)"] > 0
    assert "| train_ms |" in capsys.readouterr().out
