"""The rollout scheduling policy: the RL priority orders as specified, and plan_step fills and
preempts by it within the KV budget."""

from __future__ import annotations

import pytest

from services.serving.scheduler import Slot, fcfs_priority, plan_step, priority_key, vllm_priority


def test_priority_orders_group_completion_then_version_then_arrival():
    groups = {
        "late, one left": dict(remaining=1, version=5, arrival=9),
        "early, one left, old version": dict(remaining=1, version=2, arrival=8),
        "two left, oldest": dict(remaining=2, version=0, arrival=0),
        "two left, same version, earlier": dict(remaining=2, version=3, arrival=1),
        "two left, same version, later": dict(remaining=2, version=3, arrival=4),
    }
    order = sorted(groups, key=lambda name: priority_key(**groups[name]))
    assert order == [
        "early, one left, old version",  # closest to trainable, oldest version breaks the tie
        "late, one left",
        "two left, oldest",
        "two left, same version, earlier",  # then first come, first served
        "two left, same version, later",
    ]
    fcfs = sorted(groups, key=lambda name: fcfs_priority(**groups[name]))
    assert fcfs == ["two left, oldest", "two left, same version, earlier", "two left, same version, later",
                    "early, one left, old version", "late, one left"]  # fmt: skip


def test_priority_rejects_a_finished_group():
    with pytest.raises(ValueError, match="remaining=0"):
        priority_key(remaining=0, version=0, arrival=0)


def test_vllm_priority_keeps_the_order():
    keys = [priority_key(remaining=r, version=v, arrival=0) for r in (1, 2, 7) for v in (-1, 0, 3, 1000)]
    packed = [vllm_priority(k) for k in keys]
    assert packed == sorted(packed) and len(set(packed)) == len(packed)
    with pytest.raises(ValueError, match="version"):
        vllm_priority((1, -2, 0))


def test_plan_fills_in_priority_order_and_skips_what_does_not_fit():
    slots = [Slot((3,), 10, False), Slot((1,), 50, False), Slot((2,), 45, False), Slot((4,), 30, False)]
    plan = plan_step(slots, budget_tokens=90, max_rows=8)
    assert plan.run == [1, 0, 3]  # 2 (45 tokens) does not fit after 1; smaller, later ones still run
    assert plan.admit == plan.run and plan.preempt == []
    assert plan_step(slots, budget_tokens=90, max_rows=2).run == [1, 0]


def test_plan_preempts_the_lowest_priority_under_pressure():
    running = [Slot((1,), 40, True), Slot((5,), 40, True), Slot((3,), 20, True)]
    plan = plan_step(running, budget_tokens=70, max_rows=8)  # they grew past the budget
    assert plan.preempt == [1] and plan.run == [0, 2] and plan.admit == []
    outranked = [*running[:2], Slot((0,), 30, False)]  # a waiting one outranks a running one
    plan = plan_step(outranked, budget_tokens=100, max_rows=8)
    assert plan.run == [2, 0] and plan.preempt == [1] and plan.admit == [2]


def test_plan_names_a_sequence_that_can_never_fit():
    with pytest.raises(ValueError, match="needs 90 KV tokens but the budget is 64"):
        plan_step([Slot((0,), 90, False)], budget_tokens=64, max_rows=1)
