"""The live view renders every figure it promises, and the reward plot is valid SVG."""

from __future__ import annotations

import io
import xml.dom.minidom

import pytest
from rich.console import Console

from asyncflow.display import RunView
from asyncflow.plot import line_chart

METRICS = {
    "step": 7, "version": 7, "elapsed_s": 3.2, "reward_mean": 0.5, "reward_avg10": 0.45,
    "samples_per_s": 812.0,
    "tokens_per_s": 4900.0, "staleness": {"0": 16, "1": 112}, "loss": 0.01, "mismatch_kl": 1e-7,
    "trainer_idle_frac": 0.25,
}  # fmt: skip


def test_the_table_shows_progress_reward_throughput_staleness_queues_and_idle_time():
    view = RunView(total_steps=10, title="sort")
    out = io.StringIO()
    Console(file=out, width=120).print(
        view._table(METRICS, {"rollout": "idle 12%  samples 900", "queues": "trainer 64"})
    )
    text = out.getvalue()
    for expected in (
        "step 7/10",
        "0.450",
        "812.0 samples/s",
        "lag 1: 112",
        "idle 25%",
        "idle 12%",
        "trainer 64",
    ):
        assert expected in text, expected


def test_line_chart_is_svg_with_one_line_per_series():
    svg = line_chart({"a": [(0, 0.1), (1, 0.5)], "b<&>": [(0, 0.2)]}, title="t", x_label="step", y_label="r")
    doc = xml.dom.minidom.parseString(svg)
    assert len(doc.getElementsByTagName("polyline")) == 1 and len(doc.getElementsByTagName("circle")) == 1
    assert "b&lt;&amp;&gt;" in svg
    with pytest.raises(ValueError, match="at least one point"):
        line_chart({}, title="t", x_label="x", y_label="y")
