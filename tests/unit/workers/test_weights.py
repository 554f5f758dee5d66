"""The weight store and its client: versions, sharded parts, channels and verification; the
local store without Ray, then the remote one."""

from __future__ import annotations

import asyncio

import pytest
import torch

from asyncflow.errors import WeightMismatch, WorkerError
from services.models import EOS_ID, PAD_ID, build_model
from services.parallelism.buckets import Shard
from services.serving.torch_engine import TorchEngine
from workers.rollout import RolloutWorker
from workers.weights import WeightClient, WeightStore


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed": torch.randn(10, 4, generator=g),
        "norm": torch.randn(5, generator=g).to(torch.bfloat16),
        "steps": torch.arange(7),
        "big": torch.randn(64, 8, generator=g),  # larger than a bucket: spans several
    }


def _equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return list(got) == list(want) and all(
        got[k].dtype == t.dtype and torch.equal(got[k], t) for k, t in want.items()
    )


def _shards(state: dict[str, torch.Tensor], rows: list[int]) -> list[dict]:
    """Each part's dim-0 rows [offset, offset + n) of every tensor with at least sum(rows) rows;
    the other tensors go whole with part 0 (as a trainer publishes what it does not shard)."""
    parts: list[dict] = [{} for _ in rows]
    for name, t in state.items():
        if t.dim() == 0 or t.shape[0] != sum(rows):
            parts[0][name] = t
            continue
        offset = 0
        for part, n in zip(parts, rows):
            part[name] = Shard(t[offset : offset + n], offset, tuple(t.shape))
            offset += n
    return parts


async def test_weight_store_keeps_recent_versions_and_wakes_waiters():
    store = WeightStore(keep_versions=2)
    client = WeightClient(store, remote=False, bucket_mb=0.001)
    assert await client.latest() == -1
    waiter = asyncio.ensure_future(client.wait_version(1, timeout_s=5))
    await client.publish(0, _state())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in _state().items()}
    await client.publish(1, changed)
    assert await waiter == 1
    version, tensors = await client.pull(0)
    assert version == 1 and _equal(tensors, changed)
    await client.publish(2, _state())
    assert sorted(store._versions) == [1, 2]  # version 0 was freed
    with pytest.raises(WorkerError, match="versions only grow"):
        await client.publish(2, _state())
    with pytest.raises(TimeoutError):
        await client.wait_version(9, timeout_s=0.05)


@pytest.mark.parametrize("channels", [1, 2, 3])
async def test_a_round_trip_over_channels_is_bitwise_and_balanced(channels):
    store = WeightStore()
    client = WeightClient(store, remote=False, bucket_mb=100 / 2**20, channels=channels)
    state = _state()
    await client.publish(0, state)
    ((index, buckets),) = store._versions[0][0]
    assert index["channels"] == channels and len(buckets) == 23  # 2274 bytes in 100-byte buckets
    assert set(index["sizes"][:-1]) == {100}
    _, tensors = await client.pull(0)
    assert _equal(tensors, state)


@pytest.mark.parametrize("rows", [[6, 4], [2, 5, 3]])
async def test_a_sharded_publish_shows_once_every_part_is_in_and_pulls_the_full_tensors(rows):
    full = {"w": torch.randn(10, 6), "b": torch.randn(10).to(torch.bfloat16), **_state()}
    store = WeightStore()
    ranks = len(rows)
    clients = [WeightClient(store, remote=False, bucket_mb=64 / 2**20, channels=r + 1) for r in range(ranks)]
    for version in (0, 1):
        state = {k: t + version if t.is_floating_point() else t for k, t in full.items()}
        parts = _shards(state, rows)
        for rank in range(ranks - 1, -1, -1):  # the parts arrive in any order
            assert await clients[0].latest() == version - 1  # not before its last part
            await clients[rank].publish(version, parts[rank], part=(rank, ranks))
        assert await clients[0].latest() == version
        pulled, tensors = await WeightClient(store, remote=False).pull(version)
        assert pulled == version and _equal({k: tensors[k] for k in state}, state)
        assert sorted(tensors) == sorted(state)


async def test_a_sharded_partial_publication_pulls_whole_over_the_last_whole_one():
    store = WeightStore()
    client = WeightClient(store, remote=False, bucket_mb=0.001)
    state = _state()
    for rank, part in enumerate(_shards(state, [40, 24])):
        await client.publish(0, part, part=(rank, 2))
    trained = {"big": state["big"] * 2}
    for rank, part in enumerate(_shards(trained, [40, 24])):
        await client.publish(1, part, whole=False, part=(rank, 2))
    version, tensors = await client.pull(0)
    assert version == 1 and _equal(tensors, trained)
    version, tensors = await client.pull(0, whole=True)
    assert version == 1 and _equal(tensors, {**state, **trained})


async def test_parts_that_could_never_show_or_would_show_wrong_are_refused():
    client = WeightClient(WeightStore(), remote=False)
    state = _state()
    await client.publish(0, state, part=(0, 2))
    with pytest.raises(WorkerError, match="already arrived"):
        await client.publish(0, state, part=(0, 2))
    with pytest.raises(WorkerError, match="every part of a version must say the same"):
        await client.publish(0, state, part=(1, 3))
    with pytest.raises(WorkerError, match="0 <= rank < ranks"):
        await client.publish(0, state, part=(2, 2))
    await client.publish(1, state, part=(0, 2))
    await client.publish(1, state, part=(1, 2))  # version 1 shows; version 0 never will
    with pytest.raises(WorkerError, match="versions only grow"):
        await client.publish(0, state, part=(1, 2))
    with pytest.raises(WorkerError, match="before any whole one"):
        await WeightClient(WeightStore(), remote=False).publish(0, state, whole=False, part=(0, 2))


def _corrupt(store: WeightStore, version: int, bucket: int) -> None:
    """Flip one byte of a stored bucket (the local store keeps copies of the pieces)."""
    ((_, buckets),) = store._versions[version][0]
    piece = buckets[bucket][0]
    piece[len(piece) // 2] ^= 0x10


async def test_a_corrupted_bucket_raises_naming_version_bucket_and_channel():
    store = WeightStore()
    client = WeightClient(store, remote=False, bucket_mb=100 / 2**20, channels=3)
    await client.publish(0, _state())
    _corrupt(store, 0, 7)
    with pytest.raises(WeightMismatch, match=r"version 0 part 0 of 1: bucket 7 \(channel 1\).*fingerprint"):
        await client.pull(0)


async def test_a_rollout_worker_refuses_a_corrupted_version_keeps_its_weights_and_loads_the_next():
    store = WeightStore()
    weights = WeightClient(store, remote=False, bucket_mb=0.01, channels=2)
    engine = TorchEngine(build_model(40, seed=9), eos_token_id=EOS_ID, pad_token_id=PAD_ID, version=-1)
    worker = RolloutWorker(engine, None, weights, n=1, groups_per_call=1, params=None, kind=None)
    models = [build_model(40, seed=s) for s in range(3)]
    await weights.publish(0, models[0].state_dict())
    assert await worker.sync_weights(0) == 0
    await weights.publish(1, models[1].state_dict())
    _corrupt(store, 1, 3)
    assert await worker.sync_weights(1) == 0  # refused: the engine keeps version 0
    assert await worker.sync_weights(1) == 0  # and does not pull the refused version again
    assert worker.stats["rejected_versions"] == 1 and worker.stats["weight_syncs"] == 1
    for name, t in engine._targets.items():
        assert torch.equal(t, models[0].state_dict()[name])
    await weights.publish(2, models[2].state_dict())
    assert await worker.sync_weights(2) == 2
    assert worker.stats["rejected_versions"] == 1 and worker.stats["weight_syncs"] == 2
    for name, t in engine._targets.items():
        assert torch.equal(t, models[2].state_dict()[name])


async def test_the_remote_store_carries_sharded_parts_over_channels(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0)
    class Puller:
        """A worker in its own process: pulls, then reports each tensor as bytes."""

        def __init__(self, store):
            self.client = WeightClient(store, remote=True, channels=2)

        async def pull(self, version: int) -> dict:
            _, tensors = await self.client.pull(version)
            return {k: (str(t.dtype), t.shape, t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                    for k, t in tensors.items()}  # fmt: skip

    store = ray.remote(WeightStore).options(num_cpus=0).remote(2)
    g = torch.Generator().manual_seed(3)
    state = {"lm_head": torch.randn(96, 40, generator=g), "norm": torch.randn(96, generator=g).bfloat16()}
    parts = _shards(state, [50, 46])
    for rank in (1, 0):
        client = WeightClient(store, remote=True, bucket_mb=1000 / 2**20, channels=3)
        await client.publish(0, parts[rank], part=(rank, 2))
    got = await Puller.remote(store).pull.remote(0)
    for name, t in state.items():
        assert got[name] == (str(t.dtype), t.shape, t.view(-1).view(torch.uint8).numpy().tobytes())


async def test_a_publish_not_waited_for_has_copied_the_bytes_and_settle_raises_a_refusal(ray_session):
    """A trainer step publishes without waiting for the weight store's answer: the tensors may change
    at once (its next optimizer step), the store still gets the published bytes, and what the store
    refused comes out of `settle` (or the next publish)."""
    ray = ray_session
    store = ray.remote(WeightStore).options(num_cpus=0).remote(2)
    client = WeightClient(store, remote=True)  # one channel, a small state: sent in the caller's thread
    state = _state()
    published = {k: t.clone() for k, t in state.items()}
    await client.publish(0, state, wait=False)
    for t in state.values():  # as the next optimizer step would, in place
        t.add_(1)
    await client.settle()
    assert await client.latest() == 0
    _, got = await WeightClient(store, remote=True).pull(0)
    assert _equal(got, published)

    await client.publish(0, state, wait=False)  # a version the store holds already: refused
    with pytest.raises(WorkerError, match="already holds version 0"):
        await client.settle()
    await client.settle()  # reported once
    await client.publish(0, state, wait=False)  # refused again
    with pytest.raises(WorkerError, match="already holds version 0"):
        await client.publish(1, state)  # the next publish raises the refusal of the one before it...
    await client.publish(1, state)  # ...and is not sent: sent again, it lands
    assert await client.latest() == 1


async def test_pull_into_live_tensors_writes_nothing_when_a_bucket_is_corrupted():
    store = WeightStore()
    client = WeightClient(store, remote=False, bucket_mb=100 / 2**20, channels=2)
    state = _state()
    await client.publish(0, state)
    live = {name: torch.zeros_like(t) for name, t in state.items()}
    _, tensors = await client.pull(0, into=live)
    assert all(tensors[name] is live[name] for name in state) and _equal(live, state)
    await client.publish(1, {name: torch.ones_like(t) for name, t in state.items()})
    _corrupt(store, 1, 22)  # the last bucket: every other one is checked fine first
    with pytest.raises(WeightMismatch, match="bucket 22"):
        await client.pull(1, into=live)
    assert _equal(live, state)


async def test_parts_that_do_not_tile_a_tensor_fail_the_pull_with_a_worker_error():
    client = WeightClient(WeightStore(), remote=False)
    t = torch.arange(12.0).reshape(4, 3)
    for rank in range(2):  # both ranks send rows 0 and 1; rows 2 and 3 never arrive
        await client.publish(0, {"t": Shard(t[:2], 0, (4, 3))}, part=(rank, 2))
    with pytest.raises(WorkerError, match="pull of version 0: tensor 't'.*tile it exactly"):
        await client.pull(0)
