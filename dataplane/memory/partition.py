"""The controller's records: a partition, its rows and its consumers, and how they are saved.

Plain data and the pure operations on it: leasing rows, checking and giving back leases,
marking a consumer done, freeing a row, which rows a sampler sees, a snapshot for a
checkpoint and back. No I/O, no waiting beyond `Signal`, no knowledge of storage units.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

from dataplane.errors import LeaseError, SchemaError
from dataplane.schema import FieldSpec, parse_schema


class Signal:
    """Wakes every current waiter at once; waiters that arrive later wait for the next fire."""

    __slots__ = ("_future",)

    def __init__(self) -> None:
        self._future: asyncio.Future | None = None

    def fire(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        self._future = None

    async def wait(self, timeout_s: float) -> None:
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        # asyncio.wait, not wait_for: it neither cancels the shared future on timeout nor, as
        # wait_for can on 3.11, turns a cancellation that races the timeout into a TimeoutError.
        await asyncio.wait([self._future], timeout=max(timeout_s, 0.0))


@dataclass(slots=True)
class Row:
    row: int
    unit: int
    group: int
    group_size: int
    length: int = 0
    version: int = -1  # -1: no versioned field written yet
    ready: int = 0  # bit i set: field i is written
    versioned: int = 0  # fields written with a version (cleared on regenerate)
    acked: int = 0  # bit j set: consumer j is done with this row
    nbytes: int = 0


@dataclass(slots=True)
class Lease:
    peer: int
    deadline: float


@dataclass
class Consumer:
    name: str
    bit: int
    pending: dict[int, None] = field(default_factory=dict)  # not handed out, not done (ordered)
    ready: dict[int, None] = field(default_factory=dict)  # pending rows whose `mask` fields are ready
    mask: int | None = None  # fields the consumer last asked for
    writes: int = 0  # fields the consumer fills in the rows it leases (cleared when a lease is lost)
    leases: dict[int, Lease] = field(default_factory=dict)
    signal: Signal = field(default_factory=Signal)
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("delivered", "acked", "redelivered", "dropped_stale", "regenerated", "waits"), 0
        )
    )
    wait_s: float = 0.0


@dataclass
class Partition:
    name: str
    schema: dict[str, FieldSpec]
    capacity: int
    bits: dict[str, int]
    stale_policy: str = "drop"
    consumers: dict[str, Consumer] = field(default_factory=dict)
    rows: dict[int, Row] = field(default_factory=dict)
    next_row: int = 0
    created: int = 0  # rows committed so far (reservations not yet written do not count)
    next_group: int = 0
    sealed: bool = False
    freed: int = 0
    capacity_signal: Signal = field(default_factory=Signal)
    put_waits: int = 0

    def mask(self, fields: list[str]) -> int:
        mask = 0
        for name in fields:
            bit = self.bits.get(name)
            if bit is None:
                raise SchemaError(
                    f"partition {self.name!r} has no field {name!r}; its fields are {sorted(self.bits)}"
                )
            mask |= 1 << bit
        return mask

    def schema_text(self) -> dict[str, str]:
        return {name: str(spec) for name, spec in self.schema.items()}

    def fields(self, mask: int) -> list[str]:
        return [name for name, bit in self.bits.items() if mask >> bit & 1]

    def lease(self, c: Consumer, rows: list[int], lease: Lease) -> dict:
        """Hand `rows` to one instance of `c` under `lease`; returns what the client needs of them."""
        for r in rows:
            del c.pending[r]
            c.ready.pop(r, None)
            c.leases[r] = lease
        c.counts["delivered"] += len(rows)
        meta = [self.rows[r] for r in rows]
        return {
            "rows": rows,
            "units": [m.unit for m in meta],
            "groups": [m.group for m in meta],
            "versions": [m.version for m in meta],
            "lengths": [m.length for m in meta],
        }

    def check_leases(self, c: Consumer, rows: list[int], peer: int, verb: str) -> None:
        """LeaseError unless connection `peer` holds the lease of every row."""
        for r in rows:
            lease = c.leases.get(r)
            if lease is None or lease.peer != peer:
                raise LeaseError(
                    f"cannot {verb} row {r} of {self.name!r} for consumer {c.name!r}: this client does not "
                    "hold its lease (it expired and the row was redelivered, it was already acked, or it "
                    f"was never handed to this client). Nothing was {verb}ed; process rows within "
                    "lease_s or renew() the lease"
                )

    def give_back(self, c: Consumer, rows: list[int]) -> None:
        """Rows `c` held go back to pending (ready again if their fields are), for another instance."""
        for r in rows:
            c.leases.pop(r, None)
            c.pending[r] = None
            row = self.rows[r]
            if c.mask is not None and row.ready & c.mask == c.mask:
                c.ready[r] = None
        if rows:
            c.signal.fire()

    def done(self, c: Consumer, row: Row) -> bool:
        """`c` is done with `row`; True once every consumer is (the row can be freed)."""
        row.acked |= 1 << c.bit
        return all(row.acked >> other.bit & 1 for other in self.consumers.values())

    def free(self, row: Row) -> None:
        del self.rows[row.row]
        for c in self.consumers.values():
            c.pending.pop(row.row, None)
            c.ready.pop(row.row, None)
        self.freed += 1 if row.ready else 0  # a reservation given back was never a row anyone saw
        self.capacity_signal.fire()

    def stats(self) -> dict:
        """Rows, capacity, readiness per field and each consumer's counts (`store_stats()`)."""
        reserved = sum(1 for r in self.rows.values() if not r.ready)
        return {
            "rows": len(self.rows) - reserved,
            "reserved": reserved,
            "capacity": self.capacity,
            "created": self.created,
            "freed": self.freed,
            "put_waits": self.put_waits,
            "ready": {
                f: sum(1 for r in self.rows.values() if r.ready >> b & 1) for f, b in self.bits.items()
            },
            "consumers": {
                c.name: {
                    "pending": len(c.pending),
                    "ready": len(c.ready),
                    "leased": len(c.leases),
                    "wait_s": round(c.wait_s, 4),
                    **c.counts,
                }  # fmt: skip
                for c in self.consumers.values()
            },
        }


def candidates(part: Partition, c: Consumer, chooser: Any, batch_size: int) -> list[Row]:
    """The ready rows a sampler chooses from, oldest first (Row has the Candidate attributes).

    The sequential sampler only ever looks at the first batch_size, so only those are built.
    """
    rows = itertools.islice(c.ready, batch_size) if chooser.name == "sequential" else c.ready
    return [part.rows[r] for r in rows]


def snapshot(part: Partition) -> dict:
    return {
        "name": part.name,
        "schema": part.schema_text(),
        "capacity": part.capacity,
        "stale_policy": part.stale_policy,
        "next_row": part.next_row,
        "created": part.created,
        "next_group": part.next_group,
        "sealed": part.sealed,
        "consumers": list(part.consumers),
        # Only committed rows: a reserved row whose put never finished was never the caller's.
        "rows": [
            [
                r.row,
                r.unit,
                r.group,
                r.group_size,
                r.length,
                r.version,
                r.ready,
                r.versioned,
                r.acked,
                r.nbytes,
            ]
            for r in part.rows.values()
            if r.ready
        ],
    }


def from_snapshot(saved: dict, num_units: int) -> Partition:
    schema = parse_schema(saved["schema"])
    bits = {f: i for i, f in enumerate(schema)}
    part = Partition(saved["name"], schema, saved["capacity"], bits, saved["stale_policy"])
    part.next_row, part.next_group, part.sealed = saved["next_row"], saved["next_group"], saved["sealed"]
    part.created = saved["created"]
    for values in saved["rows"]:
        row = Row(*values)
        row.unit = row.unit % num_units  # a store with fewer units folds the old units onto the new
        part.rows[row.row] = row
    for bit, name in enumerate(saved["consumers"]):
        c = Consumer(name, bit)
        c.pending = {r: None for r, row in part.rows.items() if not row.acked >> bit & 1}
        part.consumers[name] = c
    return part
