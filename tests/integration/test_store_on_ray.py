"""The store under real concurrency: producers and consumers in separate Ray actors.

Every row carries a unique id; consumers report the ids they saw, so "exactly once" is
checked by counting, not assumed.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from dataplane import StoreClient

pytestmark = pytest.mark.integration
HERE = Path(__file__).resolve().parent


@ray.remote(num_cpus=0.1)
class Producer:
    def __init__(self, address: str):
        self.address = address

    async def put_ids(self, partition: str, ids: list[int], chunk: int) -> int:
        client = await StoreClient.connect(self.address)
        for start in range(0, len(ids), chunk):
            part = np.array(ids[start : start + chunk], dtype=np.int64)
            await client.put(partition, {"uid": part, "payload": [np.full(int(i % 7) + 1, i) for i in part]})
        await client.close()
        return len(ids)


@ray.remote(num_cpus=0.1)
class Consumer:
    def __init__(self, address: str, name: str):
        self.address, self.name = address, name
        self.client: StoreClient | None = None

    async def drain(self, partition: str, batch_size: int, delay_s: float = 0.0) -> list[int]:
        """Stream until the partition is sealed and drained; return the ids seen."""
        self.client = self.client or await StoreClient.connect(self.address)
        seen: list[int] = []
        async for batch in self.client.stream(partition, ["uid", "payload"], batch_size, self.name,
                                              allow_partial=True, timeout_s=0.5):  # fmt: skip
            assert all(int(p[0]) == u for u, p in zip(batch["uid"], batch["payload"]))
            seen += batch["uid"].tolist()
            if delay_s:
                time.sleep(delay_s)  # a slow consumer (blocks its own loop on purpose)
        return seen

    async def take_and_hang(self, partition: str, n: int) -> list[int]:
        """Lease n rows and never ack them, as a consumer that dies mid-batch would."""
        self.client = await StoreClient.connect(self.address)
        batch = await self.client.get(partition, ["uid"], n, self.name, lease_s=600)
        return batch["uid"].tolist()


SCHEMA = {"uid": "int64", "payload": "int64[*]"}


def test_every_consumer_gets_every_row_exactly_once_across_instances(store, client_sync, pname):
    client_sync.create_partition(pname, SCHEMA, capacity=256, consumers=["trainer", "logger"])
    ids = list(range(600))
    producers = [Producer.remote(store.address) for _ in range(3)]
    trainers = [Consumer.remote(store.address, "trainer") for _ in range(3)]
    logger = Consumer.remote(store.address, "logger")
    # Every instance is up before rows flow; on 2 cores a late actor would find the work done.
    ray.get([a.__ray_ready__.remote() for a in [*producers, *trainers, logger]])
    draining = [c.drain.remote(pname, 16, 0.005) for c in trainers] + [logger.drain.remote(pname, 32)]
    ray.get([p.put_ids.remote(pname, ids[k::3], 20) for k, p in enumerate(producers)])
    client_sync.seal(pname)
    *per_trainer, logged = ray.get(draining, timeout=120)
    trained = [i for part in per_trainer for i in part]
    assert sorted(trained) == ids  # no row lost, none twice, across three instances
    assert sorted(logged) == ids
    assert sum(1 for part in per_trainer if part) >= 2  # the instances shared the work
    stats = client_sync.store_stats()["partitions"][pname]
    assert stats["rows"] == 0 and stats["freed"] == 600


def test_killing_a_consumer_mid_lease_loses_nothing(store, client_sync, pname):
    client_sync.create_partition(pname, SCHEMA, consumers=["trainer"])
    ray.get(Producer.remote(store.address).put_ids.remote(pname, list(range(100)), 25))
    client_sync.seal(pname)
    doomed = Consumer.remote(store.address, "trainer")
    held = ray.get(doomed.take_and_hang.remote(pname, 30))
    assert len(held) == 30
    ray.kill(doomed)  # its connection drops; the controller hands its leases on at once
    survivor = Consumer.remote(store.address, "trainer")
    start = time.monotonic()
    seen = ray.get(survivor.drain.remote(pname, 10), timeout=60)
    assert sorted(seen) == list(range(100))
    assert time.monotonic() - start < 30  # far sooner than the 600 s lease
    counts = client_sync.store_stats()["partitions"][pname]["consumers"]["trainer"]
    assert counts["redelivered"] == 30 and counts["acked"] == 100


def test_back_pressure_keeps_the_partition_within_capacity(store, client_sync, pname):
    client_sync.create_partition(pname, SCHEMA, capacity=24, consumers=["trainer"])
    samples: list[int] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            part = client_sync.store_stats()["partitions"][pname]
            samples.append(part["rows"] + part["reserved"])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    slow = Consumer.remote(store.address, "trainer")
    draining = slow.drain.remote(pname, 8, 0.05)
    ray.get(Producer.remote(store.address).put_ids.remote(pname, list(range(160)), 8), timeout=120)
    client_sync.seal(pname)
    seen = ray.get(draining, timeout=120)
    stop.set()
    watcher.join()
    assert sorted(seen) == list(range(160))
    assert max(samples) <= 24
    assert client_sync.store_stats()["partitions"][pname]["put_waits"] > 0  # the producer did wait


def test_checkpoint_then_a_new_ray_restores_and_delivers_the_rest_once(tmp_path):
    """Two processes, two Ray instances: nothing lost, nothing handed out twice."""
    script = HERE / "checkpoint_phases.py"
    first = subprocess.run(
        [sys.executable, str(script), "save", str(tmp_path)], capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(
        [sys.executable, str(script), "load", str(tmp_path)], capture_output=True, text=True
    )
    assert second.returncode == 0, second.stderr[-3000:]
    acked = set(map(int, (tmp_path / "acked.txt").read_text().split()))
    leased = set(map(int, (tmp_path / "leased.txt").read_text().split()))
    after = list(map(int, (tmp_path / "after.txt").read_text().split()))
    assert len(acked) == 30 and len(leased) == 10
    assert len(after) == len(set(after))  # none twice
    assert set(after) == set(range(100)) - acked  # none lost; leased-but-unacked came back
    assert leased <= set(after)


@ray.remote(num_cpus=0.1)
def put_through_named_store(name: str, partition: str) -> list[int]:
    """Another process of the cluster finds the store by its name alone."""
    import asyncio

    from dataplane import connect

    async def go():
        client = await connect(name)
        rows = await client.put(partition, {"uid": np.arange(3), "payload": [np.zeros(1, np.int64)] * 3})
        await client.close()
        return rows

    return asyncio.run(go())


def test_any_process_of_the_cluster_reaches_a_store_by_name(ray_session, pname):
    """Names are how Ray processes find a memory store (its actors are named); a Redis store is
    found by its address instead, which the Redis tests cover."""
    import uuid

    from asyncflow.config import DataPlaneConfig
    from asyncflow.errors import DataPlaneError, StorageUnavailable
    from dataplane import start_store, store_address

    store = start_store(DataPlaneConfig(name=f"named-{uuid.uuid4().hex[:6]}"))
    client_sync = store.client()
    try:
        client_sync.create_partition(pname, SCHEMA, consumers=["c"])
        rows = ray.get(put_through_named_store.remote(store.config.name, pname))
        batch = client_sync.get(pname, ["uid"], 3, "c")
        assert batch.rows == rows and batch["uid"].tolist() == [0, 1, 2]
        client_sync.ack(batch)
        assert store_address(store.config.name) == store.address
        with pytest.raises(DataPlaneError, match="already running"):
            start_store(DataPlaneConfig(name=store.config.name))
        with pytest.raises(StorageUnavailable, match="no store named 'nope'"):
            store_address("nope")
    finally:
        client_sync.close()
        store.shutdown()


async def test_a_holder_that_dies_mid_put_leaves_nothing_behind(ray_session, pname):
    """The holder wrote its cells to a storage unit, then died before committing them: the row is
    redelivered with those cells cleared, so the next holder's put succeeds."""
    import uuid

    from asyncflow.config import DataPlaneConfig
    from dataplane import start_store
    from dataplane.columns import to_column, wire
    from dataplane.schema import parse_schema

    handle = start_store(DataPlaneConfig(name=f"orphans-{uuid.uuid4().hex[:6]}", lease_s=30.0))
    try:
        survivor = await StoreClient.connect(handle.address)
        await survivor.create_partition(pname, {"x": "int64", "y": "float32[*]"}, consumers=["filler"])
        await survivor.put(pname, {"x": np.arange(4)})
        doomed = await StoreClient.connect(handle.address)
        batch = await doomed.get(pname, ["x"], 4, "filler", writes=["y"])
        spec = parse_schema({"y": "float32[*]"})["y"]
        column = to_column("y", spec, [np.ones(3, np.float32)] * 4, 4)
        unit = doomed._units[batch.units[0]]
        await unit.write(partition=pname, rows=batch.rows, columns={"y": wire(column, list(range(4)))})
        await doomed.close()  # dies before the commit: the connection closes, the leases are lost
        again = await survivor.get(pname, ["x"], 4, "filler", timeout_s=10)
        assert sorted(again.rows) == sorted(batch.rows)
        await survivor.put(pname, {"y": [np.full(2, 7, np.float32)] * 4}, rows=again)
        await survivor.ack(again)
        stats = (await survivor.store_stats())["partitions"][pname]["consumers"]["filler"]
        assert stats["redelivered"] == 4 and stats["acked"] == 4
        await survivor.close()
    finally:
        handle.shutdown()
