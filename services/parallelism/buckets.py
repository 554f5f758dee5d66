"""Bucketed weight transfer: a state dict as a few flat byte buffers plus a small index.

Moving weights tensor by tensor costs one round trip per tensor (hundreds per sync in
the peers' weight-sync paths); moving a handful of flat buffers costs a handful, and a
buffer is a plain numpy array that Ray's object store or a socket carries without a copy.
This module knows nothing about Ray, models or versions: bytes in, tensors out.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives: bucket, byte offset, dtype and shape."""

    name: str
    bucket: int
    offset: int
    nbytes: int
    dtype: str  # torch dtype name without the "torch." prefix
    shape: tuple[int, ...]

    def to_wire(self) -> list:
        return [self.name, self.bucket, self.offset, self.nbytes, self.dtype, list(self.shape)]

    @classmethod
    def from_wire(cls, item: list) -> Slot:
        name, bucket, offset, nbytes, dtype, shape = item
        return cls(name, bucket, offset, nbytes, dtype, tuple(shape))


def flatten(tensors: Mapping[str, torch.Tensor], bucket_bytes: int) -> tuple[list[Slot], list[np.ndarray]]:
    """Pack tensors (in order) into uint8 buffers of at most `bucket_bytes` each.

    A tensor larger than a bucket gets a bucket of its own; tensors are never split, so
    one tensor is always one contiguous view on the receiving side.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    plan: list[list[tuple[str, torch.Tensor]]] = [[]]
    used = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        if plan[-1] and used + size > bucket_bytes:
            plan.append([])
            used = 0
        plan[-1].append((name, t))
        used += size
    slots: list[Slot] = []
    buckets: list[np.ndarray] = []
    for b, members in enumerate(plan):
        total = sum(t.numel() * t.element_size() for _, t in members)
        buf = torch.empty(total, dtype=torch.uint8)
        offset = 0
        for name, t in members:
            flat = t.detach().contiguous().reshape(-1).view(torch.uint8)  # bytes of any dtype, bf16 too
            buf[offset : offset + flat.numel()].copy_(flat)
            slots.append(
                Slot(name, b, offset, flat.numel(), str(t.dtype).removeprefix("torch."), tuple(t.shape))
            )
            offset += flat.numel()
        buckets.append(buf.numpy())
    return slots, buckets


def unflatten(slots: list[Slot], buckets: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Views of the buckets as tensors, without a copy.

    Buffers from Ray's object store are read-only; torch warns that it cannot protect them.
    The views are only ever read (copied into parameters), so the warning is silenced here.
    """
    out = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for s in slots:
            raw = torch.frombuffer(buckets[s.bucket], dtype=torch.uint8, count=s.nbytes, offset=s.offset)
            out[s.name] = raw.view(getattr(torch, s.dtype)).view(s.shape)
    return out


@dataclass(frozen=True)
class Shard:  # TEMPORARY (replaced by the sync branch)
    local: torch.Tensor
    offset: int
    shape: tuple
