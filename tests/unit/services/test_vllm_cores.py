"""How vLLM's CPU workers of a tensor-parallel engine are bound to cores (services.serving.vllm)."""

from __future__ import annotations

import os

import pytest

from services.serving.vllm import bind_cores


def test_workers_split_this_processs_cores_evenly(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6, 7, 8})
    bind_cores(2)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "4,5|6,7"  # two cores each; the fifth stays free


def test_a_users_binding_is_kept_and_too_few_cores_are_refused(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-3|4-7")
    bind_cores(2)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0-3|4-7"
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    with pytest.raises(ValueError, match=r"tensor_parallel_size = 4 binds .* may run on 2 \(\[0, 1\]\)"):
        bind_cores(4)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
