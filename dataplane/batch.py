"""A batch: the rows one consumer leased in one get, with their data by field; and what a
client counts.

Plain data: a batch knows its partition, consumer, rows and where they came from; acking,
releasing or filling it goes through a client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from dataplane.errors import SchemaError


@dataclass
class Batch:
    """Rows handed to one consumer, with their data by field (leased until acked)."""

    partition: str
    consumer: str
    rows: list[int]
    data: dict[str, Any]  # dense fields: array (B, ...); ragged / str / any fields: list of B values
    units: list[int] = field(repr=False)
    groups: list[int] = field(repr=False)
    versions: list[int] = field(repr=False)
    lengths: list[int] = field(repr=False)
    shards: list[list[int]] | None = field(default=None, repr=False)
    end: bool = False  # the partition is sealed and this consumer has had every row
    leased_at: float = field(default=0.0, repr=False)  # time.monotonic() when the lease was asked for
    lease_s: float = field(default=float("inf"), repr=False)  # how long the lease lasts from then

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, name: str) -> Any:
        return self.data[name]

    def shard(self, rank: int) -> Batch:
        """The rows of one data-parallel rank (balanced sampler), as a Batch of their own."""
        if self.shards is None:
            raise SchemaError("this batch has no shards: get it with sampler='balanced' and dp_size > 1")
        pos = {r: i for i, r in enumerate(self.rows)}
        return self.select([pos[r] for r in self.shards[rank]])

    def select(self, positions: Sequence[int]) -> Batch:
        def pick(values):
            return values[list(positions)] if hasattr(values, "shape") else [values[i] for i in positions]

        return replace(
            self,
            rows=pick(self.rows),
            data={k: pick(v) for k, v in self.data.items()},
            units=pick(self.units),
            groups=pick(self.groups),
            versions=pick(self.versions),
            lengths=pick(self.lengths),
            shards=None,
        )

    def __add__(self, other: Batch) -> Batch:
        """Two batches of one consumer and partition as one (e.g. a waited-for group plus the
        groups that became ready with it); acking or filling the sum covers both."""
        if (other.partition, other.consumer) != (self.partition, self.consumer):
            raise SchemaError(
                f"cannot join a batch of {other.consumer!r} on {other.partition!r} to one of "
                f"{self.consumer!r} on {self.partition!r}"
            )

        def join(a, b):
            if hasattr(a, "shape") and hasattr(b, "shape") and type(a) is type(b):
                return np.concatenate([a, b]) if isinstance(a, np.ndarray) else torch_cat(a, b)
            return list(a) + list(b)

        return replace(
            self,
            rows=self.rows + other.rows,
            data={k: join(v, other.data[k]) for k, v in self.data.items()},
            units=self.units + other.units,
            groups=self.groups + other.groups,
            versions=self.versions + other.versions,
            lengths=self.lengths + other.lengths,
            shards=None,
            end=other.end,
            leased_at=min(self.leased_at, other.leased_at),
        )


def torch_cat(a: Any, b: Any) -> Any:
    import torch  # only bfloat16 fields come back as tensors; torch is loaded already then

    return torch.cat([a, b])


@dataclass
class ClientStats:
    """What one client moved: calls, rows and bytes."""

    puts: int = 0
    gets: int = 0
    rows_put: int = 0
    rows_got: int = 0
    bytes_put: int = 0
    bytes_got: int = 0
