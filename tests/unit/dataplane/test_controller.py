"""The controller on its own: in-memory storage units called directly, no Ray, no sockets."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from asyncflow.config import DataPlaneConfig
from asyncflow.errors import DataPlaneError, LeaseError, StoreTimeout
from dataplane.columns import to_column, wire
from dataplane.memory.controller import Controller
from dataplane.memory.unit import MemoryStorage
from dataplane.schema import parse_schema


@pytest.fixture
def store():
    units = [MemoryStorage(0), MemoryStorage(1)]
    return Controller(DataPlaneConfig(lease_s=30), units), units


async def put(controller, units, partition, n, version=None, group_size=1, nbytes=8):
    placed = await controller.reserve(partition, n, group_size)
    spec = parse_schema({"x": "int64"})["x"]
    column = to_column("x", spec, np.arange(n), n)
    by_unit: dict[int, list[int]] = {}
    for i, u in enumerate(placed["units"]):
        by_unit.setdefault(u, []).append(i)
    for u, pos in by_unit.items():
        await units[u].write(
            partition=partition, rows=[placed["rows"][i] for i in pos], columns={"x": wire(column, pos)}
        )
    await controller.commit(partition, placed["rows"], ["x"], version=version, nbytes=[nbytes] * n)
    return placed


async def test_placement_balances_bytes_across_units(store):
    controller, units = store
    await controller.create_partition("p", {"x": "int64"}, consumers=["c"])
    placed = [await put(controller, units, "p", 64) for _ in range(6)]
    counts = [sum(1 for p in placed for u in p["units"] if u == k) for k in range(2)]
    assert counts == [192, 192]  # runs of 64 alternate between the two units
    heavy = await put(controller, units, "p", 64, nbytes=10_000)  # one unit becomes much heavier
    light = 1 - heavy["units"][0]
    assert (await put(controller, units, "p", 64))["units"][0] == light
    assert (await put(controller, units, "p", 64))["units"][0] == light


async def test_lease_expiry_redelivers_to_any_instance(store):
    controller, units = store
    await controller.create_partition("p", {"x": "int64"}, consumers=["c"])
    await put(controller, units, "p", 4)
    first = await controller.get("p", "c", ["x"], 4, lease_s=0.1, peer=1)
    again = await controller.get("p", "c", ["x"], 4, timeout_s=2, peer=2)
    assert sorted(again["rows"]) == sorted(first["rows"])
    with pytest.raises(LeaseError):
        await controller.ack("p", "c", first["rows"], peer=1)
    await controller.ack("p", "c", again["rows"], peer=2)
    assert (await controller.stats())["partitions"]["p"]["consumers"]["c"]["redelivered"] == 4


async def test_disconnect_returns_leases_immediately(store):
    controller, units = store
    await controller.create_partition("p", {"x": "int64"}, consumers=["c"])
    await put(controller, units, "p", 3)
    await controller.get("p", "c", ["x"], 3, peer=7)
    await controller.on_disconnect(7)
    got = await controller.get("p", "c", ["x"], 3, timeout_s=0.5, peer=8)
    assert len(got["rows"]) == 3


async def test_uncommitted_reservation_expires_and_frees_capacity(store):
    controller, _ = store
    controller.config = DataPlaneConfig(lease_s=0.1)
    await controller.create_partition("p", {"x": "int64"}, capacity=4, consumers=["c"])
    await controller.reserve("p", 4)  # a producer that died before committing
    placed = await controller.reserve("p", 4, timeout_s=2)  # waits for the expiry, then fits
    assert len(placed["rows"]) == 4


async def test_capacity_counts_rows_until_every_consumer_acked(store):
    controller, units = store
    await controller.create_partition("p", {"x": "int64"}, capacity=2, consumers=["a", "b"])
    await put(controller, units, "p", 2)
    a = await controller.get("p", "a", ["x"], 2)
    await controller.ack("p", "a", a["rows"])
    with pytest.raises(StoreTimeout):  # "b" has not acked yet: still full
        await controller.reserve("p", 1, timeout_s=0.1)
    b = await controller.get("p", "b", ["x"], 2)
    await controller.ack("p", "b", b["rows"])
    assert len((await controller.reserve("p", 2, timeout_s=0.1))["rows"]) == 2
    await asyncio.sleep(0.01)  # freed rows are deleted from their units in the background
    assert units[0]._bytes + units[1]._bytes == 0  # freed rows left the units too


async def test_a_waiting_get_wakes_on_commit_not_on_a_timer(store):
    controller, units = store
    await controller.create_partition("p", {"x": "int64"}, consumers=["c"])
    waiter = asyncio.create_task(controller.get("p", "c", ["x"], 2, timeout_s=30))
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await put(controller, units, "p", 2)
    got = await waiter
    # woken by the commit, long before the 30 s timeout
    assert len(got["rows"]) == 2 and loop.time() - start < 0.5


async def test_sealed_partition_ends_streams_after_the_last_rows(store):
    controller, units = store
    await controller.create_partition("p", {"x": "int64"}, consumers=["c"])
    await put(controller, units, "p", 3)
    await controller.seal("p")
    last = await controller.get("p", "c", ["x"], 8, timeout_s=5, peer=1)
    assert len(last["rows"]) == 3 and not last["end"]
    end = await controller.get("p", "c", ["x"], 8, timeout_s=5, peer=1)
    assert end["rows"] == [] and end["end"]


async def test_checkpoint_restore_onto_fewer_units(store, tmp_path):
    controller, units = store
    await controller.create_partition("p", {"x": "int64"}, consumers=["c"])
    for _ in range(3):
        await put(controller, units, "p", 64)
    got = await controller.get("p", "c", ["x"], 64)
    await controller.ack("p", "c", got["rows"])
    leased = await controller.get("p", "c", ["x"], 64)
    snap = await controller.checkpoint()  # bytes for the client to write: no path crosses the wire
    one = MemoryStorage(0)
    restored = Controller(DataPlaneConfig(), [one])
    reply = await restored.restore(controller=snap["controller"])
    assert reply["rows"] == 128
    assert sum([await one.load(data=blob, keep=reply["keep"][0]) for blob in snap["units"]]) == 128
    again = await restored.get("p", "c", ["x"], 128, timeout_s=1)
    assert set(leased["rows"]) <= set(again["rows"]) and not set(got["rows"]) & set(again["rows"])
    data = await one.read(partition="p", rows=again["rows"], fields=["x"])
    assert data["x"][0] == "d" and len(data["x"][1]) == 128
    with pytest.raises(DataPlaneError, match="freshly started"):
        await restored.restore(controller=snap["controller"])
