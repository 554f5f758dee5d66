"""benchmarks/ray_calls.py measures a real actor call's CPU on both sides, and an idle actor's."""

from __future__ import annotations

import json

import pytest

from benchmarks import ray_calls

pytestmark = pytest.mark.usefixtures("ray_session")


def test_each_actor_kind_has_call_and_idle_figures(tmp_path, capsys):
    out = tmp_path / "f.json"
    assert ray_calls.main(["--calls", "20", "--repeats", "1", "--idle-s", "0.5", "--json", str(out)]) == 0
    f = json.loads(out.read_text())
    for kind in ("plain", "async"):
        call = f["calls"][kind]
        assert call["wall_ms"] > 0 and call["caller_cpu_ms"] > 0  # a call cannot be free for the caller
        assert call["actor_cpu_ms"] >= 0 and f["idle_cpu_pct"][kind] >= 0
    assert "| async |" in capsys.readouterr().out
