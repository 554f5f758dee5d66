"""Every CLI command runs end to end at toy size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asyncflow.cli", *args], capture_output=True, text=True)


def test_validate_prints_the_resolved_config():
    out = run_cli("validate", str(ROOT / "examples" / "dataplane.yaml"), "--set", "dataplane.lease_s=7")
    assert out.returncode == 0, out.stderr
    assert "lease_s: 7.0" in out.stdout and "valid" in out.stderr


def test_validate_reports_errors_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataplane:\n  num_storage_units: 0\n")
    out = run_cli("validate", str(bad))
    assert out.returncode == 2 and "dataplane.num_storage_units = 0" in out.stderr


@pytest.mark.integration
def test_demo_streams_every_sample_exactly_once():
    out = run_cli("demo", "--samples", "256", "--group-size", "4")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "every sample trained exactly once: yes" in out.stdout
