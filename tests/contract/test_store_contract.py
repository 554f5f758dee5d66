"""The storage contract: what every backend of the data store must do, through the client API.

Written once; the `store` fixture is parametrized by backend (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import pytest
import torch

from asyncflow.errors import DataPlaneError, LeaseError, SchemaError, StoreTimeout, UnknownPartition
from dataplane import StoreClient

GRPO = {
    "prompt_ids": "int64[*]",
    "response_ids": "int64[*]",
    "behavior_logprobs": "float32[*]",
    "reward": "float32",
}


def prompts(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1000, size=int(rng.integers(1, 9))) for _ in range(n)]


async def test_put_then_get_round_trips_every_kind_of_field(client, pname):
    schema = {
        "ids": "int64[*]",
        "fixed": "float32[3]",
        "image": "uint8[2,*]",
        "score": "float64",
        "flag": "bool",
        "text": "str",
        "meta": "any",
        "half": "bfloat16[*]",
    }
    await client.create_partition(pname, schema, consumers=["c"])
    data = {
        "ids": [np.arange(5), np.arange(2)],
        "fixed": np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32),
        "image": [np.ones((2, 3), np.uint8), np.zeros((2, 1), np.uint8)],
        "score": [0.5, -1.25],
        "flag": np.array([True, False]),
        "text": ["héllo", ""],
        "meta": [{"k": [1, 2]}, None],
        "half": [torch.ones(3, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.bfloat16)],
    }
    rows = await client.put(pname, data)
    batch = await client.get(pname, list(schema), batch_size=2, consumer="c")
    assert batch.rows == rows
    assert [a.tolist() for a in batch["ids"]] == [[0, 1, 2, 3, 4], [0, 1]]
    assert batch["fixed"].shape == (2, 3) and batch["fixed"].dtype == np.float32
    np.testing.assert_array_equal(batch["fixed"], data["fixed"])
    assert [a.shape for a in batch["image"]] == [(2, 3), (2, 1)]
    assert batch["score"].tolist() == [0.5, -1.25] and batch["score"].dtype == np.float64
    assert batch["flag"].tolist() == [True, False]
    assert batch["text"] == ["héllo", ""]
    assert batch["meta"] == [{"k": [1, 2]}, None]
    assert batch["half"][0].dtype == torch.bfloat16 and batch["half"][0].tolist() == [1.0, 1.0, 1.0]
    await client.ack(batch)


async def test_fields_filled_by_different_producers_become_ready_together(client, pname):
    await client.create_partition(pname, GRPO, consumers=["trainer"])
    rows = await client.put(pname, {"prompt_ids": prompts(4)}, group_size=2)
    responses = [np.arange(k + 1) for k in range(4)]
    await client.put(
        pname,
        {"response_ids": responses, "behavior_logprobs": [np.zeros(k + 1, np.float32) for k in range(4)]},
        rows=rows,
        version=3,
    )
    with pytest.raises(StoreTimeout):  # reward is not there yet: nothing to hand out
        await client.get(pname, list(GRPO), batch_size=4, consumer="trainer", timeout_s=0.2)
    await client.put(pname, {"reward": np.ones(4, np.float32)}, rows=rows)
    batch = await client.get(pname, list(GRPO), batch_size=4, consumer="trainer", sampler="group")
    assert sorted(batch.rows) == rows
    assert batch.versions == [3, 3, 3, 3]
    assert batch.groups[0] == batch.groups[1] != batch.groups[2] == batch.groups[3]
    assert batch.lengths == [len(p) + len(r) for p, r in zip(batch["prompt_ids"], batch["response_ids"])]
    await client.ack(batch)


async def test_get_wakes_as_soon_as_rows_are_ready(client, pname):
    await client.create_partition(pname, {"x": "int64"}, consumers=["c"])
    waiter = asyncio.create_task(client.get(pname, ["x"], batch_size=2, consumer="c", timeout_s=10))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    start = time.perf_counter()
    await client.put(pname, {"x": np.array([7, 8])})
    batch = await waiter
    assert time.perf_counter() - start < 1.0  # pushed, not found by a polling loop
    assert batch["x"].tolist() == [7, 8]


async def test_each_consumer_sees_every_row_and_instances_share_them(store, client, pname):
    await client.create_partition(pname, {"x": "int64"}, consumers=["trainer", "logger"])
    await client.put(pname, {"x": np.arange(40)})
    other = await StoreClient.connect(store.address)  # a second instance of "trainer"
    try:
        a, b = await asyncio.gather(
            client.get(pname, ["x"], batch_size=20, consumer="trainer"),
            other.get(pname, ["x"], batch_size=20, consumer="trainer"),
        )
        assert sorted(a["x"].tolist() + b["x"].tolist()) == list(range(40))
        log = await client.get(pname, ["x"], batch_size=40, consumer="logger")
        assert sorted(log["x"].tolist()) == list(range(40))
        await asyncio.gather(client.ack(a), other.ack(b), client.ack(log))
    finally:
        await other.close()
    stats = (await client.store_stats())["partitions"][pname]
    assert stats["rows"] == 0 and stats["freed"] == 40  # freed once every consumer acked


async def test_expired_lease_is_redelivered_once_and_late_ack_is_refused(store, client, pname):
    await client.create_partition(pname, {"x": "int64"}, consumers=["c"])
    await client.put(pname, {"x": np.arange(4)})
    first = await client.get(pname, ["x"], batch_size=4, consumer="c", lease_s=0.3)
    other = await StoreClient.connect(store.address)
    try:
        again = await other.get(pname, ["x"], batch_size=4, consumer="c", timeout_s=5)
        assert sorted(again.rows) == sorted(first.rows)
        with pytest.raises(LeaseError, match="does not hold its lease"):
            await client.ack(first)
        # carried by a get, the late ack is refused too, and that get keeps none of the rows it
        # could have taken: the next get has them at once
        await client.put(pname, {"x": np.arange(4, 8)})
        with pytest.raises(LeaseError, match="does not hold its lease"):
            await client.get(pname, ["x"], batch_size=4, consumer="c", ack=first, lease_s=600)
        rest = await other.get(pname, ["x"], batch_size=4, consumer="c", timeout_s=2)
        assert sorted(rest["x"].tolist()) == [4, 5, 6, 7]
        await other.ack(again)
        await other.ack(rest)
        with pytest.raises(StoreTimeout):
            await other.get(pname, ["x"], batch_size=1, consumer="c", timeout_s=0.3)
    finally:
        await other.close()
    counts = (await client.store_stats())["partitions"][pname]["consumers"]["c"]
    assert counts["redelivered"] == 4 and counts["acked"] == 8


async def test_a_waiting_get_acks_at_once_so_a_full_partition_takes_the_next_put(client, pname):
    await client.create_partition(pname, {"x": "int64"}, capacity=4, consumers=["c"])
    await client.put(pname, {"x": np.arange(4)})
    held = await client.get(pname, ["x"], batch_size=4, consumer="c")
    put = asyncio.ensure_future(client.put(pname, {"x": np.arange(4, 8)}, timeout_s=10))
    await asyncio.sleep(0.2)
    assert not put.done()  # full until the held rows are acked
    # nothing is ready, so this get waits; the ack it carries must not wait with it
    nxt = await client.get(pname, ["x"], batch_size=4, consumer="c", ack=held, timeout_s=5)
    assert sorted(nxt["x"].tolist()) == [4, 5, 6, 7]
    await put
    await client.ack(nxt)


async def test_closed_connection_returns_its_leases_at_once(store, client, pname):
    await client.create_partition(pname, {"x": "int64"}, consumers=["c"])
    await client.put(pname, {"x": np.arange(3)})
    doomed = await StoreClient.connect(store.address)
    got = await doomed.get(pname, ["x"], batch_size=3, consumer="c", lease_s=600)
    await doomed.close()  # as if its process died: no ack, long lease
    batch = await client.get(pname, ["x"], batch_size=3, consumer="c", timeout_s=5)
    assert sorted(batch.rows) == sorted(got.rows)
    await client.ack(batch)


async def test_release_hands_rows_back(client, pname):
    await client.create_partition(pname, {"x": "int64"}, consumers=["c"])
    await client.put(pname, {"x": np.arange(2)})
    batch = await client.get(pname, ["x"], batch_size=2, consumer="c")
    await client.release(batch)
    again = await client.get(pname, ["x"], batch_size=2, consumer="c", timeout_s=2)
    assert again.rows == batch.rows
    await client.ack(again)


async def test_version_window_drops_stale_rows_and_counts_them(client, pname):
    await client.create_partition(pname, {"x": "int64"}, consumers=["trainer"], stale_policy="drop")
    for version in range(4):
        await client.put(pname, {"x": np.full(2, version)}, version=version)
    batch = await client.get(pname, ["x"], batch_size=4, consumer="trainer", v_min=2, timeout_s=2)
    assert sorted(batch["x"].tolist()) == [2, 2, 3, 3]
    assert all(v >= 2 for v in batch.versions)
    await client.ack(batch)
    stats = (await client.store_stats())["partitions"][pname]
    assert stats["consumers"]["trainer"]["dropped_stale"] == 4
    assert stats["rows"] == 0  # dropped rows count as done for that consumer


async def test_version_window_regenerates_stale_rows(client, pname):
    schema = {"prompt": "int64", "response": "int64", "reward": "float32"}
    await client.create_partition(pname, schema, consumers=["rollout", "trainer"], stale_policy="regenerate")
    await client.put(pname, {"prompt": np.array([10, 11])})
    todo = await client.get(pname, ["prompt"], batch_size=2, consumer="rollout")
    await client.put(pname, {"response": todo["prompt"] + 100}, rows=todo, version=0)
    await client.put(pname, {"reward": np.zeros(2, np.float32)}, rows=todo)
    await client.ack(todo)
    with pytest.raises(StoreTimeout):  # version 0 is too old for a trainer at v_min=1
        await client.get(pname, list(schema), batch_size=2, consumer="trainer", v_min=1, timeout_s=0.3)
    redo = await client.get(pname, ["prompt"], batch_size=2, consumer="rollout", timeout_s=2)
    assert sorted(redo["prompt"].tolist()) == [10, 11]  # the prompt survives, the rest is made again
    await client.put(pname, {"response": redo["prompt"] + 200}, rows=redo, version=1)
    await client.put(pname, {"reward": np.ones(2, np.float32)}, rows=redo)
    await client.ack(redo)
    batch = await client.get(pname, list(schema), batch_size=2, consumer="trainer", v_min=1, timeout_s=2)
    assert sorted(batch["response"].tolist()) == [210, 211] and batch.versions == [1, 1]
    await client.ack(batch)
    counts = (await client.store_stats())["partitions"][pname]["consumers"]["trainer"]
    assert counts["regenerated"] == 2


async def test_concurrent_puts_from_one_client_hold_no_stray_capacity(client, pname):
    await client.create_partition(pname, {"x": "int64"}, capacity=64, consumers=["c"])
    await asyncio.gather(*(client.put(pname, {"x": np.arange(8)}) for _ in range(4)))
    part = (await client.store_stats())["partitions"][pname]
    assert part["rows"] == 32 and part["reserved"] <= 8  # at most one spare for the next put


async def test_put_waits_while_full_and_resumes_when_rows_are_freed(client, pname):
    await client.create_partition(pname, {"x": "int64"}, capacity=4, consumers=["c"])
    await client.put(pname, {"x": np.arange(4)})
    with pytest.raises(StoreTimeout, match="stayed full"):
        await client.put(pname, {"x": np.arange(2)}, timeout_s=0.3)
    blocked = asyncio.create_task(client.put(pname, {"x": np.array([8, 9])}, timeout_s=10))
    await asyncio.sleep(0.2)
    assert not blocked.done()
    batch = await client.get(pname, ["x"], batch_size=2, consumer="c")
    await client.ack(batch)
    assert len(await blocked) == 2
    stats = (await client.store_stats())["partitions"][pname]
    assert stats["rows"] == 4 and stats["put_waits"] == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"x": np.arange(2, dtype=np.int32)}, "dtype int32 does not match"),
        ({"y": np.arange(2, dtype=np.float32)}, r"shape \(\) does not match"),
        ({"x": np.arange(2), "nope": [1, 2]}, "unknown field"),
        ({"x": np.arange(2), "y": np.ones((3, 2), np.float32)}, "different row counts"),
        ({"x": ["a", "b"]}, "expected an array"),
    ],
)
async def test_bad_rows_are_refused_and_the_store_is_unchanged(client, pname, data, message):
    await client.create_partition(pname, {"x": "int64", "y": "float32[2]"}, consumers=["c"])
    good = await client.put(pname, {"x": np.array([1, 2]), "y": np.ones((2, 2), np.float32)})
    before = (await client.store_stats())["partitions"][pname]
    with pytest.raises(SchemaError, match=message):
        await client.put(pname, data)
    assert (await client.store_stats())["partitions"][pname] == before
    batch = await client.get(pname, ["x", "y"], batch_size=2, consumer="c")
    assert batch.rows == good and batch["x"].tolist() == [1, 2]
    await client.ack(batch)


async def test_a_field_written_twice_is_refused_and_the_first_value_kept(client, pname):
    await client.create_partition(pname, {"x": "int64", "y": "int64"}, consumers=["c"])
    rows = await client.put(pname, {"x": np.array([1, 2])})
    await client.put(pname, {"y": np.array([5, 6])}, rows=rows)
    with pytest.raises(SchemaError, match="already written"):
        await client.put(pname, {"y": np.array([7, 8])}, rows=rows)
    batch = await client.get(pname, ["x", "y"], batch_size=2, consumer="c")
    assert batch["y"].tolist() == [5, 6]
    await client.ack(batch)


async def test_unknown_partition_and_consumer_errors_name_the_fix(client, pname):
    with pytest.raises(UnknownPartition, match="create_partition"):
        await client.put(pname, {"x": [1]})
    await client.create_partition(pname, {"x": "int64"}, consumers=["c"])
    with pytest.raises(DataPlaneError, match="not registered"):
        await client.get(pname, ["x"], batch_size=1, consumer="stranger", timeout_s=0.1)
    with pytest.raises(SchemaError, match="has no field"):
        await client.get(pname, ["nope"], batch_size=1, consumer="c", timeout_s=0.1)


async def test_group_sampler_hands_out_whole_groups(client, pname):
    await client.create_partition(pname, {"x": "int64"}, consumers=["c"])
    await client.put(pname, {"x": np.arange(12)}, group_size=4)
    batch = await client.get(pname, ["x"], batch_size=6, consumer="c", sampler="group", allow_partial=True)
    assert len(batch) == 4 and len(set(batch.groups)) == 1
    await client.ack(batch)


async def test_balanced_sampler_splits_by_length(client, pname):
    await client.create_partition(pname, {"ids": "int64[*]"}, consumers=["c"])
    lengths = [1, 9, 2, 8, 3, 7, 4, 6]
    await client.put(pname, {"ids": [np.zeros(n, np.int64) for n in lengths]})
    batch = await client.get(pname, ["ids"], batch_size=8, consumer="c", sampler="balanced", dp_size=2)
    sums = [sum(len(a) for a in batch.shard(rank)["ids"]) for rank in range(2)]
    assert sums == [20, 20] and [len(batch.shard(r)) for r in range(2)] == [4, 4]
    await client.ack(batch)


async def test_stream_ends_after_seal_and_acks_as_it_goes(client, pname):
    await client.create_partition(pname, {"x": "int64"}, consumers=["c"])
    await client.put(pname, {"x": np.arange(10)})
    await client.seal(pname)
    seen = [int(v) for batch in [b async for b in client.stream(pname, ["x"], 4, "c")] for v in batch["x"]]
    assert sorted(seen) == list(range(10))  # 4 + 4 + the partial 2 at the end
    assert (await client.store_stats())["partitions"][pname]["rows"] == 0


async def test_leaving_a_stream_early_hands_back_what_it_fetched_ahead(store, client, pname):
    await client.create_partition(pname, {"x": "int64"}, consumers=["c"])
    await client.put(pname, {"x": np.arange(20)})
    await client.seal(pname)
    stream = client.stream(pname, ["x"], 4, "c", prefetch=3)
    first = await anext(stream)  # two or three more batches are now in flight for this client
    await stream.aclose()
    await client.ack(first)
    other = await StoreClient.connect(store.address)
    try:
        rest = [
            int(v) for b in [b async for b in other.stream(pname, ["x"], 4, "c", timeout_s=5)] for v in b["x"]
        ]
    finally:
        await other.close()
    assert sorted(rest + first["x"].tolist()) == list(range(20))


async def test_two_streaming_instances_ack_every_row_while_rows_trickle_in(store, client, pname):
    """Short timeouts make empty batches, so read-ahead runs deeper; no ack may be dropped."""
    await client.create_partition(pname, {"x": "int64"}, consumers=["c"])
    readers = [await StoreClient.connect(store.address) for _ in range(2)]

    async def drain(reader):
        seen = []
        async for batch in reader.stream(pname, ["x"], 16, "c", allow_partial=True, timeout_s=0.02):
            seen += batch.rows
            await asyncio.sleep(0.001)
        return seen

    try:
        tasks = [asyncio.ensure_future(drain(r)) for r in readers]
        for i in range(30):
            await client.put(pname, {"x": np.arange(8)}, group_size=8)
            await asyncio.sleep(0.004 * (i % 4))
        await client.seal(pname)
        seen = [r for part in await asyncio.gather(*tasks) for r in part]
        stats = (await client.store_stats())["partitions"][pname]  # before the readers disconnect
    finally:
        for r in readers:
            await r.close()
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 240
    assert stats["rows"] == 0 and stats["consumers"]["c"]["acked"] == 240


async def test_checkpoint_and_restore_keep_rows_and_consumption(ray_session, client, pname, tmp_path):
    from asyncflow.config import DataPlaneConfig
    from dataplane import start_store

    await client.create_partition(pname, {"x": "int64", "y": "int64"}, consumers=["a", "b"])
    rows = await client.put(pname, {"x": np.arange(6)})
    await client.put(pname, {"y": np.arange(3) * 10}, rows=rows[:3])
    done = await client.get(pname, ["x"], batch_size=2, consumer="a")
    await client.ack(done)
    leased = await client.get(pname, ["x"], batch_size=2, consumer="a")  # in flight at checkpoint
    await client.checkpoint(str(tmp_path))

    fresh = start_store(DataPlaneConfig(name=f"restored-{pname}", num_storage_units=1))
    other = await StoreClient.connect(fresh.address)
    try:
        await other.restore(str(tmp_path))  # the whole store: other tests' partitions come along
        assert (await other.store_stats())["partitions"][pname]["rows"] == 6
        a = await other.get(pname, ["x"], batch_size=4, consumer="a", timeout_s=2)
        assert sorted(a.rows) == sorted(set(rows) - set(done.rows))  # leased rows came back, acked did not
        assert set(leased.rows) <= set(a.rows)
        b = await other.get(pname, ["x", "y"], batch_size=3, consumer="b", timeout_s=2)
        assert sorted(b["y"].tolist()) == [0, 10, 20]
        await other.put(pname, {"y": np.array([30, 40, 50])}, rows=rows[3:])  # unfinished fields go on
    finally:
        await other.close()
        fresh.shutdown()


# ---------------------------------------------------------------- exactly once through stream()
# Several instances of one consumer reading with stream() and read-ahead: every row is processed
# once, and the tail of the stream never waits for a lease to expire (the leases here are long,
# so a stream that needs an expiry to end hangs past the test's own deadline instead).


async def _instances(store, n: int) -> list[StoreClient]:
    return [await StoreClient.connect(store.address) for _ in range(n)]


async def _close(clients) -> None:
    for c in clients:
        await c.close()


@pytest.mark.parametrize("prefetch", [1, 2, 4])
async def test_streaming_instances_get_each_trickled_row_once_and_end_without_lease_expiry(
    store, client, pname, prefetch
):
    await client.create_partition(pname, {"x": "int64"}, consumers=["c"])
    readers = await _instances(store, 4)

    async def drain(reader):
        seen = []
        async for batch in reader.stream(pname, ["x"], 8, "c", prefetch=prefetch, lease_s=600):
            seen += batch["x"].tolist()
            await asyncio.sleep(0.002)  # some work per batch
        return seen

    try:
        tasks = [asyncio.ensure_future(drain(r)) for r in readers]
        for i in range(50):
            await client.put(pname, {"x": np.arange(8 * i, 8 * i + 8)})
            await asyncio.sleep(0.003 * (i % 3))
        await client.seal(pname)
        parts = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        await _close(readers)
    seen = [x for part in parts for x in part]
    assert sorted(seen) == list(range(400))  # none lost, none twice


async def test_grpo_shaped_streams_are_exactly_once_per_consumer(store, client, pname):
    """Ragged groups of 8, a reward consumer writing a field back, two trainer instances taking whole
    groups, a reference consumer reading prompts; sealed at the end."""
    schema = {"prompt_ids": "int64[*]", "uid": "int64", "reward": "float32"}
    await client.create_partition(pname, schema, capacity=512, consumers=["reward", "trainer", "reference"])
    workers = await _instances(store, 5)
    rewarded: list[int] = []

    async def reward(reader):  # as the workers read: no read-ahead, at least one group, what is ready
        kw = {"prefetch": 0, "min_rows": 8, "sampler": "group", "writes": ["reward"], "lease_s": 600}
        async for batch in reader.stream(pname, ["uid"], 32, "reward", **kw):
            await reader.put(pname, {"reward": batch["uid"].astype(np.float32)}, rows=batch)
            rewarded.extend(batch["uid"].tolist())

    async def trainer(reader):
        seen = []
        async for batch in reader.stream(pname, list(schema), 32, "trainer", sampler="group", lease_s=600):
            assert len(set(batch.groups)) * 8 == len(batch)  # whole groups only
            assert batch["reward"].tolist() == batch["uid"].astype(np.float32).tolist()
            seen += batch["uid"].tolist()
        return seen

    async def reference(reader):
        return [u for b in [b async for b in reader.stream(pname, ["uid"], 64, "reference", lease_s=600)]
                for u in b["uid"].tolist()]  # fmt: skip

    rng = np.random.default_rng(0)
    try:
        tasks = [asyncio.ensure_future(reward(workers[0])), asyncio.ensure_future(reward(workers[1]))]
        tasks += [asyncio.ensure_future(trainer(w)) for w in workers[2:4]]
        tasks.append(asyncio.ensure_future(reference(workers[4])))
        for start in range(0, 1024, 64):
            uids = np.arange(start, start + 64)
            ids = [rng.integers(0, 100, int(rng.integers(1, 20))) for _ in uids]
            await client.put(pname, {"prompt_ids": ids, "uid": uids}, group_size=8)
        await client.seal(pname)
        _, _, *trained, referenced = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        stats = (await client.store_stats())["partitions"][pname]
    finally:
        await _close(workers)
    everything = list(range(1024))
    assert sorted(rewarded) == everything
    assert sorted(trained[0] + trained[1]) == everything
    assert sorted(referenced) == everything
    assert stats["rows"] == 0
    assert all(c["redelivered"] == 0 for c in stats["consumers"].values())


async def test_one_stream_with_deep_read_ahead_takes_every_row_of_an_open_partition(client, pname):
    await client.create_partition(pname, {"x": "int64"}, consumers=["c"])
    await client.put(pname, {"x": np.arange(40)})
    seen: list[int] = []

    async def take_all():
        # aclosing: what was read ahead goes back when the loop is left, not when the stream is collected
        async with contextlib.aclosing(
            client.stream(pname, ["x"], 8, "c", prefetch=4, timeout_s=30)
        ) as stream:
            async for batch in stream:
                seen.extend(batch["x"].tolist())
                if len(seen) == 40:  # not sealed: the caller knows when it is done
                    break
        await client.ack(batch)  # the batch in hand when leaving early is the caller's to ack

    await asyncio.wait_for(take_all(), 20)
    assert sorted(seen) == list(range(40))
    assert (await client.store_stats())["partitions"][pname]["rows"] == 0


async def test_a_batch_waiting_in_read_ahead_keeps_its_lease(store, client, pname):
    """Leases run out while batches wait behind a slow caller; the stream renews them, so no row
    is handed to another instance while this one still has it."""
    await client.create_partition(pname, {"x": "int64"}, consumers=["c"])
    await client.put(pname, {"x": np.arange(24)})
    await client.seal(pname)
    readers = await _instances(store, 2)

    async def drain(reader, delay_s):
        seen = []
        async for batch in reader.stream(pname, ["x"], 4, "c", prefetch=3, lease_s=1.0):
            seen += batch["x"].tolist()
            await asyncio.sleep(delay_s)
        return seen

    try:
        parts = await asyncio.wait_for(asyncio.gather(drain(readers[0], 0.6), drain(readers[1], 0.05)), 60)
        stats = (await client.store_stats())["partitions"][pname]["consumers"]["c"]
    finally:
        await _close(readers)
    assert sorted(parts[0] + parts[1]) == list(range(24))
    assert stats["redelivered"] == 0


async def test_a_get_larger_than_the_capacity_fails_at_once(client, pname):
    await client.create_partition(pname, {"x": "int64"}, capacity=8, consumers=["c"])
    start = time.perf_counter()
    with pytest.raises(DataPlaneError, match="can never be served.*capacity"):
        await client.get(pname, ["x"], batch_size=9, consumer="c", timeout_s=30)
    assert time.perf_counter() - start < 10  # not after its 30 s timeout
    await client.put(pname, {"x": np.arange(3)})
    batch = await client.get(pname, ["x"], batch_size=9, consumer="c", allow_partial=True, timeout_s=0.2)
    assert batch["x"].tolist() == [0, 1, 2]  # a partial get of any size is fine
    await client.ack(batch)


async def test_python_floats_fill_a_float32_field_with_the_usual_rounding(client, pname):
    await client.create_partition(pname, {"r": "float32", "n": "int64"}, consumers=["c"])
    await client.put(pname, {"r": [0.1, -0.1, 1e-45], "n": [1, 2, 3]})
    batch = await client.get(pname, ["r", "n"], batch_size=3, consumer="c")
    assert batch["r"].tolist() == np.array([0.1, -0.1, 1e-45], np.float32).tolist()
    await client.ack(batch)
    with pytest.raises(SchemaError, match="does not fit dtype float32"):
        await client.put(pname, {"r": [1e300], "n": [4]})  # overflows float32
    with pytest.raises(SchemaError, match="does not fit dtype int64"):
        await client.put(pname, {"r": [0.5], "n": [1.5]})  # an int field still takes exact values only


async def test_a_put_the_store_refuses_leaves_no_cells_behind(client, pname):
    await client.create_partition(pname, {"x": "int64", "y": "int64"}, consumers=["c"])
    await client.put(pname, {"x": np.arange(4)})
    batch = await client.get(pname, ["x"], batch_size=4, consumer="c")
    await client.ack(batch)  # every consumer is done: the rows are freed
    await asyncio.sleep(0.2)  # their cells are deleted in the background

    def cells(stats):
        return sum(u["rows"] for u in stats.get("units", []))

    before = await client.store_stats()
    with pytest.raises(DataPlaneError, match="no live row"):
        await client.put(pname, {"y": np.arange(4)}, rows=batch)  # written back too late
    after = await client.store_stats()
    assert after["partitions"][pname]["rows"] == 0
    assert cells(after) == cells(before)  # no cell of the refused put is kept


async def test_closing_with_requests_in_flight_leaves_no_unretrieved_error(store, pname):
    """No 'Future/Task exception was never retrieved' when a client closes under a stream with
    read-ahead and a waiting get."""
    import gc

    seen: list[dict] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: seen.append(context))
    try:
        client = await StoreClient.connect(store.address)
        await client.create_partition(pname, {"x": "int64"}, consumers=["c"])
        await client.put(pname, {"x": np.arange(10)})
        stream = client.stream(pname, ["x"], 4, "c", prefetch=3, timeout_s=30)
        await anext(stream)
        waiting = asyncio.ensure_future(client.get(pname, ["x"], 4, "c", timeout_s=30))
        await asyncio.sleep(0.05)
        await client.close()
        with contextlib.suppress(DataPlaneError):
            await stream.aclose()
        with contextlib.suppress(DataPlaneError, asyncio.CancelledError):
            waiting.cancel()
            await waiting
        del stream, waiting
        gc.collect()
        await asyncio.sleep(0.1)
    finally:
        loop.set_exception_handler(None)
    assert [c.get("message") for c in seen] == []


async def test_min_rows_serves_what_is_ready_once_enough_is(client, pname):
    await client.create_partition(pname, {"x": "int64"}, consumers=["c", "g"])
    await client.put(pname, {"x": np.arange(3)})
    batch = await client.get(pname, ["x"], batch_size=8, consumer="c", min_rows=2, timeout_s=5)
    assert batch["x"].tolist() == [0, 1, 2]  # not a full 8, and no waiting for one
    await client.ack(batch)
    with pytest.raises(StoreTimeout):
        await client.get(pname, ["x"], batch_size=8, consumer="g", min_rows=4, timeout_s=0.3)
    waiter = asyncio.ensure_future(
        client.get(pname, ["x"], batch_size=8, consumer="g", min_rows=4, timeout_s=5)
    )
    await client.put(pname, {"x": np.arange(3, 5)})
    assert (await waiter)["x"].tolist() == [0, 1, 2, 3, 4]
    await client.ack(await waiter)


async def test_min_rows_with_the_group_sampler_takes_whole_groups(client, pname):
    await client.create_partition(pname, {"x": "int64"}, consumers=["c"])
    await client.put(pname, {"x": np.arange(12)}, group_size=4)
    batch = await client.get(
        pname, ["x"], batch_size=16, consumer="c", sampler="group", min_rows=4, timeout_s=5
    )
    assert sorted(batch["x"].tolist()) == list(range(12)) and len(set(batch.groups)) == 3
    await client.ack(batch)
