"""Trainer ranks: the trainer's Ray actors as one torch.distributed group.

A rank is one TrainerWorker in one actor. `Ranks` is what a worker needs of the group:
join it, wrap the model for data parallelism (FSDP2's `fully_shard` per transformer block,
or DDP), swap small values between ranks (its rows of the batch, metrics, timings), and say
which rows of a sharded tensor it owns. One rank (`Ranks()`) is a group of one: nothing is
wrapped and nothing is sent, so a one-rank trainer runs exactly as a plain one.

Values cross ranks as msgpack frames (dataplane.codec), never pickled: a rank's rows are
the same numpy fields the store handed it.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import socket
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack
import numpy as np
import torch
import torch.distributed as dist

from dataplane import codec


class Ranks:
    def __init__(self, rank: int = 0, size: int = 1, parallel: str = "fsdp"):
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} of {size} ranks: a rank is 0 .. size - 1")
        self.rank, self.size, self.parallel = rank, size, parallel

    @property
    def many(self) -> bool:
        return self.size > 1

    # ------------------------------------------------------------------ the group

    @staticmethod
    def address() -> str:
        """host:port where rank 0 listens for the others (a free port on this node)."""
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return f"{host}:{s.getsockname()[1]}"

    def join(self, address: str, timeout_s: float = 600.0) -> None:
        """Join the group at `address` (every rank calls it; returns once all have)."""
        if self.many and not dist.is_initialized():
            dist.init_process_group(
                "gloo", init_method=f"tcp://{address}", rank=self.rank, world_size=self.size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )  # fmt: skip

    @contextlib.contextmanager
    def single_process_io(self) -> Iterator[None]:
        """torch.distributed.checkpoint in one process: what it warns about is what one rank means."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ exchanging values

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (anything the store's codec carries), in rank order."""
        if not self.many:
            return [value]
        blob = msgpack.packb([bytes(f) for f in codec.encode(value)])
        size = torch.tensor([len(blob)], dtype=torch.int64)
        sizes = [torch.zeros_like(size) for _ in range(self.size)]
        dist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        mine = torch.zeros(longest, dtype=torch.uint8)
        mine[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        blobs = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.size)]
        dist.all_gather(blobs, mine)
        return [
            codec.decode(msgpack.unpackb(b[: int(n.item())].numpy().tobytes())) for b, n in zip(blobs, sizes)
        ]

    def merge(self, data: dict[str, Any]) -> dict[str, Any]:
        """The batch of every rank, field by field in rank order: each rank read its own share
        from the store, and every rank trains on (its part of) the whole."""
        parts = self.gather(data)
        if len(parts) == 1:
            return data
        merged: dict[str, Any] = {}
        for field in data:
            values = [p[field] for p in parts]
            if all(isinstance(v, np.ndarray) and v.dtype != object for v in values):
                merged[field] = np.concatenate(values)
            else:
                merged[field] = [x for v in values for x in v]
        return merged

    def reduce_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Micro-batch figures of every rank: already weighted by their share of the whole batch,
        so they add up (maxima: the largest)."""
        out: dict[str, float] = {}
        for part in self.gather(stats):
            for k, v in part.items():
                out[k] = max(out.get(k, v), v) if k.endswith("_max") else out.get(k, 0.0) + v
        return out

    # ------------------------------------------------------------------ the model

    def broadcast(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers to every rank (they warm-started alike; now they are equal)."""
        if self.many:
            for t in module.state_dict().values():
                dist.broadcast(t.data, 0)

    def wrap(self, root: torch.nn.Module, policy: torch.nn.Module) -> torch.nn.Module:
        """`root` (whose forward runs `policy`) for data parallelism: FSDP2 shards each transformer
        block of `policy` and then the root (the rest: embeddings, LM head, norms), in place; DDP
        wraps it whole."""
        if not self.many:
            return root
        self.broadcast(root)
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(root, forward_sync_buffers=False)  # buffers: constants (rotary)
        from torch.distributed.fsdp import fully_shard

        for block in blocks(policy):
            fully_shard(block)
        fully_shard(root)
        return root

    @contextlib.contextmanager
    def accumulating(self, net: torch.nn.Module, last: bool) -> Iterator[None]:
        """A micro-batch's backward: gradients sync across ranks on the step's last one only."""
        if not self.many:
            yield
        elif self.parallel == "ddp":
            with contextlib.nullcontext() if last else net.no_sync():  # type: ignore[operator]
                yield
        else:
            net.set_requires_gradient_sync(last)  # type: ignore[operator]
            yield

    def owned(self, t: Any) -> Any:
        """This rank's part of a sharded tensor (DTensor, sharded on dim 0) as a weight-store Shard."""
        from services.parallelism.buckets import Shard

        local = t.to_local()
        chunk = math.ceil(t.shape[0] / self.size)  # torch.chunk's split, as FSDP2 shards
        return Shard(local.detach(), min(self.rank * chunk, t.shape[0]), tuple(t.shape))

    def assign(self, sizes: Sequence[int]) -> list[int]:
        """An owner rank per tensor that no rank shards: the largest first, to the least loaded."""
        load, owner = [0] * self.size, [0] * len(sizes)
        for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
            owner[i] = min(range(self.size), key=lambda r: (load[r], r))
            load[owner[i]] += sizes[i]
        return owner


def blocks(policy: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one: transformers' `_no_split_modules` classes (decoder
    layers), found inside LoRA wrappers too; none for a model without them (one unit: the root)."""
    names: set[str] = set()
    for module in policy.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in policy.modules() if type(m).__name__ in names]


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def aliases(module: torch.nn.Module) -> set[str]:
    """Names in `module`'s state dict that repeat an earlier tensor (a tied LM head and embedding)."""
    seen: set[int] = set()
    out: set[str] = set()
    for name, t in module.state_dict(keep_vars=True).items():  # a tied weight: one Parameter, two names
        if id(t) in seen:
            out.add(name)
        seen.add(id(t))
    return out
