"""Equal-size buckets: bitwise round trips, channel balance, fingerprints and shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.parallelism.buckets import (
    Index,
    Shard,
    Slot,
    channel_bytes,
    fingerprint,
    pack,
    unpack,
)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed": torch.randn(10, 4, generator=g),  # 160 bytes
        "norm": torch.randn(5, generator=g).to(torch.bfloat16),  # 10 bytes: the stream leaves 8-byte words
        "steps": torch.arange(7),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "mask": torch.tensor([True, False, True]),
        "big": torch.randn(64, 8, generator=g),  # 2048 bytes: spans many buckets
    }


def _frozen(buckets: list) -> list:
    """Copies of the buckets' pieces, read-only: what Ray's object store hands out."""
    out = []
    for bucket in buckets:
        out.append([p.copy() for p in bucket])
        for p in out[-1]:
            p.setflags(write=False)
    return out


def _index(slots: list[Slot], buckets: list, channels: int = 1) -> Index:
    wire = Index(
        slots, [sum(len(p) for p in b) for b in buckets], [fingerprint(b) for b in buckets], channels
    )
    return Index.from_wire(wire.to_wire())


@pytest.mark.parametrize("bucket_bytes", [1, 7, 100, 256, 10_000])
def test_pack_cuts_equal_buckets_and_round_trips_every_dtype_bitwise(bucket_bytes):
    state = _state()
    slots, buckets = pack(state, bucket_bytes)
    total = sum(t.numel() * t.element_size() for t in state.values())
    sizes = [sum(len(p) for p in b) for b in buckets]
    assert (
        sum(sizes) == total and all(s == bucket_bytes for s in sizes[:-1]) and 0 < sizes[-1] <= bucket_bytes
    )
    out = unpack([(_index(slots, buckets), _frozen(buckets))])
    assert list(out) == list(state)
    for name, t in state.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert out[name].view(-1).view(torch.uint8).tolist() == t.reshape(-1).view(torch.uint8).tolist()


def test_a_tensor_in_one_bucket_is_a_view_and_one_spanning_buckets_a_copy():
    state = {"small": torch.arange(4, dtype=torch.float32), "large": torch.arange(100, dtype=torch.float32)}
    slots, buckets = pack(state, 64)
    out = unpack([(_index(slots, buckets), buckets)])
    assert np.shares_memory(out["small"].numpy(), buckets[0][0])  # no copy
    assert [s.bucket for s in slots if s.name == "large"] == [0, 1, 2, 3, 4, 5, 6]
    assert torch.equal(out["large"], state["large"])
    assert not any(np.shares_memory(out["large"].numpy(), p) for b in buckets for p in b)


def test_pack_copies_nothing_and_rejects_a_nonpositive_bucket():
    state = _state()
    _, buckets = pack(state, 100)
    assert np.shares_memory(buckets[0][0], state["embed"].numpy())
    with pytest.raises(ValueError, match="bucket_bytes"):
        pack(state, 0)


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 7])
def test_round_robin_channels_carry_the_mean_to_within_one_bucket(channels):
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(1, 5000, (200,), generator=g).tolist()
    state = {f"t{i}": torch.zeros(n, dtype=torch.uint8) for i, n in enumerate(sizes)}
    state["lm_head"] = torch.zeros(300_000, dtype=torch.uint8)  # a straggler when cut by tensor
    bucket = 4096
    _, buckets = pack(state, bucket)
    per_channel = channel_bytes([sum(len(p) for p in b) for b in buckets], channels)
    mean = sum(per_channel) / channels
    assert sum(per_channel) == sum(sizes) + 300_000
    assert max(per_channel) <= mean + bucket


def test_the_fingerprint_catches_every_single_changed_byte():
    g = np.random.default_rng(0)
    bucket = [g.integers(0, 256, n, dtype=np.uint8) for n in (13, 64, 3, 21)]  # pieces with odd tails
    expected = fingerprint(bucket)
    assert fingerprint(_frozen([bucket])[0]) == expected
    for piece in bucket:
        for i in range(len(piece)):
            for delta in (1, 128, 255):
                piece[i] ^= delta
                assert fingerprint(bucket) != expected
                piece[i] ^= delta
    assert fingerprint(bucket) == expected
    assert fingerprint([np.zeros(64, np.uint8)]) != fingerprint([bucket[1]])  # a zeroed bucket


@pytest.mark.parametrize("rows", [[3, 4], [1, 5, 1], [0, 7, 0]])
def test_shards_of_several_parts_unpack_to_the_full_tensors(rows):
    g = torch.Generator().manual_seed(2)
    full = {
        "w": torch.randn(7, 5, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "head": torch.randn(7, 3, 2, generator=g),
    }
    whole = {"scale": torch.randn(3, generator=g)}  # published whole by part 0 only
    parts, offset = [], 0
    for rank, n in enumerate(rows):
        mine = {name: Shard(t[offset : offset + n], offset, tuple(t.shape)) for name, t in full.items()}
        if rank == 0:
            mine.update(whole)
        slots, buckets = pack(mine, 24)
        parts.append((_index(slots, buckets), _frozen(buckets)))
        offset += n
    out = unpack(parts)
    for name, t in {**full, **whole}.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t)


def test_unpack_refuses_shards_that_leave_rows_out_or_overlap():
    t = torch.arange(12.0).reshape(4, 3)

    def part(offset: int, n: int) -> tuple:
        slots, buckets = pack({"t": Shard(t[offset : offset + n], offset, (4, 3))}, 16)
        return _index(slots, buckets), buckets

    with pytest.raises(ValueError, match="tile it exactly"):
        unpack([part(0, 1), part(2, 2)])  # row 1 missing
    with pytest.raises(ValueError, match="tile it exactly"):
        unpack([part(0, 3), part(2, 2)])  # row 2 twice
    with pytest.raises(ValueError, match="do not fit"):
        pack({"t": Shard(t[:3], 2, (4, 3))}, 16)
    with pytest.raises(ValueError, match="do not fit"):
        pack({"t": Shard(t[:, :2], 0, (4, 3))}, 16)


def test_unpack_into_writes_each_tensor_once_into_its_destination():
    state = _state()
    slots, buckets = pack(state, 100)
    parts = [(_index(slots, buckets), _frozen(buckets))]
    into = {name: torch.zeros_like(t) for name, t in state.items()}
    into["embed"] = torch.zeros(10, 4, dtype=torch.float64)  # another dtype: converted
    out = unpack(parts, into)
    for name, t in state.items():
        assert out[name] is into[name] and torch.equal(out[name], t.to(out[name].dtype))
    wrong = {"embed": torch.zeros(4, 10), "big": torch.zeros(64, 8)}
    with pytest.raises(ValueError, match="nothing was written"):
        unpack(parts, wrong)
    assert not wrong["big"].any()  # checked before anything is written
