"""The controller's records: which rows a sampler sees, a snapshot and back, the wake-up signal."""

from __future__ import annotations

import asyncio

from dataplane.memory.partition import Consumer, Partition, Row, Signal, candidates, from_snapshot, snapshot
from dataplane.samplers import make_sampler
from dataplane.schema import parse_schema


def partition() -> Partition:
    schema = parse_schema({"x": "int64", "y": "float32"})
    part = Partition("p", schema, 16, {"x": 0, "y": 1}, "drop")
    for r in range(6):
        part.rows[r] = Row(r, r % 2, r // 2, 2, length=r, version=r // 2, ready=0b11 if r < 4 else 0b01)
    part.next_row, part.next_group, part.created = 6, 3, 6
    a, b = Consumer("a", 0), Consumer("b", 1)
    part.consumers = {"a": a, "b": b}
    for c in (a, b):
        c.pending = dict.fromkeys(range(6))
        c.ready = dict.fromkeys(range(4))
    return part


def test_a_sequential_sampler_sees_only_the_oldest_ready_rows():
    part = partition()
    c = part.consumers["a"]
    assert [r.row for r in candidates(part, c, make_sampler("sequential", 1), 2)] == [0, 1]
    assert [r.row for r in candidates(part, c, make_sampler("group", 1), 2)] == [0, 1, 2, 3]


def test_a_snapshot_restores_rows_consumption_and_counters():
    part = partition()
    part.rows[0].acked = 0b01  # a is done with row 0, b is not
    part.sealed = True
    again = from_snapshot(snapshot(part), num_units=1)
    assert sorted(again.rows) == list(range(6)) and all(r.unit == 0 for r in again.rows.values())
    assert (again.next_row, again.next_group, again.created, again.sealed) == (6, 3, 6, True)
    assert list(again.consumers["a"].pending) == [1, 2, 3, 4, 5]  # leased or pending before: pending now
    assert list(again.consumers["b"].pending) == [0, 1, 2, 3, 4, 5]
    assert again.rows[5].ready == 0b01 and again.rows[4].version == 2


def test_a_snapshot_leaves_out_reserved_rows_nobody_wrote():
    part = partition()
    part.rows[6] = Row(6, 0, 3, 2)  # reserved, never committed
    assert 6 not in from_snapshot(snapshot(part), num_units=2).rows


async def test_a_signal_wakes_every_current_waiter_and_only_them():
    signal = Signal()
    woken = []

    async def waiter(i: int) -> None:
        await signal.wait(2.0)
        woken.append(i)

    first = [asyncio.ensure_future(waiter(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    signal.fire()
    await asyncio.gather(*first)
    late = asyncio.ensure_future(waiter(9))
    await asyncio.sleep(0.05)
    assert sorted(woken) == [0, 1, 2] and not late.done()  # a later waiter waits for the next fire
    signal.fire()
    await late
    assert woken[-1] == 9
