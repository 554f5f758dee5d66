"""The controller: metadata of every row, and who has consumed what.

It tracks, per partition, each row's placement (which storage unit holds it), group,
policy version, length and per-field readiness (a bitmask), and per consumer which rows
are pending, leased (with a deadline) or done. It never sees the data itself.

Everything runs on one asyncio loop and no method blocks it: a `get` that finds too few
ready rows awaits a signal that a `commit`, a release or an expiry fires, so consumers
are woken the moment rows become ready (push, not polling). A lease ends by `ack`, by
expiry (the consumer died or hung), or when the connection that took it closes; the
rows then go back to pending for another instance of that consumer.

This class knows nothing about Ray or sockets: `dataplane.store` hosts it behind the
wire, and the unit tests drive it directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from dataplane.codec import pack, unpack
from dataplane.config import DataPlaneConfig
from dataplane.errors import DataPlaneError, SchemaError, StoreTimeout, UnknownPartition
from dataplane.memory.deadlines import Deadlines
from dataplane.memory.partition import (
    Consumer,
    Lease,
    Partition,
    Row,
    Signal,
    candidates,
    from_snapshot,
    snapshot,
)
from dataplane.memory.units import Units
from dataplane.memory.window import regenerate
from dataplane.samplers import Selection, make_sampler, not_ready, select_at_least, too_big
from dataplane.schema import parse_schema

_EMPTY = Selection([], None)


class Controller:
    RPC_METHODS = (
        "create_partition", "describe", "register_consumer", "reserve", "abort", "commit", "locate",
        "get", "ack", "release", "renew", "seal", "drop_partition", "stats", "checkpoint", "restore",
        "units",
    )  # fmt: skip

    def __init__(self, config: DataPlaneConfig, units: list[Any], unit_addresses: list[str] | None = None):
        """`units`: objects with the storage-unit methods (wire connections or local instances)."""
        self.config = config
        self._units = Units(units, unit_addresses or [])
        self._partitions: dict[str, Partition] = {}
        self._deadlines = Deadlines(self._due)  # lease ends, reservations not yet committed
        self._open = asyncio.Event()
        self._open.set()

    # ------------------------------------------------------------------ partitions

    async def create_partition(
        self, name: str, schema: dict[str, str], capacity: int | None = None,
        consumers: Sequence[str] = (), exist_ok: bool = False, stale_policy: str | None = None,
    ) -> dict:  # fmt: skip
        """Declare a partition. `stale_policy` ("drop" | "regenerate") overrides the store default."""
        specs = parse_schema(schema)
        stale_policy = stale_policy or self.config.stale_policy
        if stale_policy not in ("drop", "regenerate"):
            raise DataPlaneError(f"stale_policy {stale_policy!r} is not one of 'drop', 'regenerate'")
        if name in self._partitions:
            existing = self._partitions[name].schema_text()
            if not exist_ok or existing != {k: str(v) for k, v in specs.items()}:
                raise DataPlaneError(
                    f"partition {name!r} already exists with schema {existing}; pick another name, or "
                    "pass exist_ok=True with the same schema to attach to it"
                )
        else:
            capacity = capacity or self.config.capacity_rows
            if capacity < 1:
                raise DataPlaneError(f"partition {name!r}: capacity {capacity} must be >= 1 rows")
            bits = {f: i for i, f in enumerate(specs)}
            self._partitions[name] = Partition(name, specs, capacity, bits, stale_policy)
        for consumer in consumers:
            await self.register_consumer(name, consumer)
        return await self.describe(name)

    async def describe(self, name: str) -> dict:
        part = self._partition(name)
        return {
            "name": part.name,
            "schema": part.schema_text(),
            "capacity": part.capacity,
            "consumers": list(part.consumers),
            "sealed": part.sealed,
            "stale_policy": part.stale_policy,
        }

    async def register_consumer(self, partition: str, consumer: str) -> None:
        part = self._partition(partition)
        if consumer in part.consumers:
            return
        state = Consumer(consumer, len(part.consumers))
        state.pending = {r: None for r, row in part.rows.items() if row.ready}  # late, yet sees every row
        part.consumers[consumer] = state

    async def seal(self, partition: str) -> None:
        """No new rows will come: waiting consumers get the partial batches that remain."""
        part = self._partition(partition)
        part.sealed = True
        for c in part.consumers.values():
            c.signal.fire()

    async def drop_partition(self, partition: str) -> None:
        part = self._partitions.pop(partition, None)
        if part is None:
            return
        for c in part.consumers.values():
            c.signal.fire()
        part.capacity_signal.fire()
        await self._units.each("drop_partition", partition=partition)

    async def units(self) -> list[str]:
        return self._units.addresses

    def _partition(self, name: str) -> Partition:
        part = self._partitions.get(name)
        if part is None:
            raise UnknownPartition(
                f"no partition {name!r} in store {self.config.name!r}; existing: {sorted(self._partitions)}. "
                "Create it with create_partition(name, schema) first."
            )
        return part

    # ------------------------------------------------------------------ producing

    async def reserve(
        self, partition: str, n: int, group_size: int = 1, timeout_s: float | None = None
    ) -> dict:
        """Allocate `n` new rows (waiting while the partition is full) and place them on units."""
        await self._open.wait()
        part = self._partition(partition)
        if n < 1 or group_size < 1 or n % group_size:
            raise DataPlaneError(
                f"put of {n} rows with group_size {group_size}: the row count must be a positive "
                "multiple of group_size (rows of a group are put together)"
            )
        if n > part.capacity:
            raise DataPlaneError(
                f"put of {n} rows can never fit partition {partition!r} (capacity {part.capacity}); "
                "put in smaller chunks or create the partition with a larger capacity"
            )
        if len(part.rows) + n > part.capacity:
            part.put_waits += 1
            await self._wait(
                lambda: len(part.rows) + n <= part.capacity,
                part.capacity_signal,
                timeout_s or self.config.put_timeout_s,
                f"put of {n} rows to {partition!r}: the partition stayed full ({len(part.rows)}/"
                f"{part.capacity} rows) for {{timeout_s:.1f}} s; consumers are not acking rows. Check that "
                "every registered consumer runs, or raise the capacity or put_timeout_s",
            )
        first = part.next_row
        part.next_row += n
        units = self._units.place(n)
        for i in range(n):
            group = part.next_group + i // group_size
            part.rows[first + i] = Row(first + i, units[i], group, group_size)
        part.next_group += n // group_size
        # A producer that dies between reserving and committing must not hold capacity forever.
        self._deadlines.push(time.monotonic() + self.config.lease_s, "reserve", partition, (first, n))
        return {"rows": list(range(first, first + n)), "units": units, "expires_in_s": self.config.lease_s}

    async def abort(self, partition: str, rows: list[int]) -> None:
        """Forget reserved rows whose write failed (their fields were never committed)."""
        part = self._partition(partition)
        for r in rows:
            row = part.rows.get(r)
            if row is not None and row.ready == 0:
                self._free(part, row)

    async def locate(self, partition: str, rows: list[int]) -> list[int]:
        part = self._partition(partition)
        return [self._row(part, r).unit for r in rows]

    def _row(self, part: Partition, r: int) -> Row:
        row = part.rows.get(r)
        if row is None:
            raise DataPlaneError(
                f"partition {part.name!r} has no live row {r}: it was never put, or every consumer "
                "has acked it and it was freed"
            )
        return row

    async def commit(
        self, partition: str, rows: list[int], fields: list[str], version: int | None = None,
        lengths: list[int] | None = None, nbytes: list[int] | None = None,
        reserve_next: list[int] | None = None,
    ) -> dict | None:  # fmt: skip
        """Mark `fields` of `rows` written (the bytes are already on their units) and wake consumers.

        `reserve_next` = [n, group_size]: also reserve rows for the producer's next put, if they
        fit right now, and return that reservation (saves the producer a round trip per put).
        """
        await self._open.wait()
        part = self._partition(partition)
        mask = part.mask(fields)
        targets = [self._row(part, r) for r in rows]
        for row in targets:
            if row.ready & mask:
                raise SchemaError(
                    f"partition {partition!r}, row {row.row}: fields {part.fields(row.ready & mask)} "
                    "were already written; a field is written once per row"
                )
        for row in targets:
            if not row.ready:  # first fields of a reserved row: from now on consumers wait for it
                part.created += 1
                for c in part.consumers.values():
                    c.pending[row.row] = None
        for i, row in enumerate(targets):
            row.ready |= mask
            if version is not None:
                row.version = version if row.version < 0 else min(row.version, version)
            if row.version >= 0:  # fields written since generation depend on it: regenerated with it
                row.versioned |= mask
            if lengths is not None:
                row.length += lengths[i]
            if nbytes is not None:
                row.nbytes += nbytes[i]
                self._units.bytes[row.unit] += nbytes[i]
        for c in part.consumers.values():
            if c.mask is None or not (mask & c.mask):
                continue
            woke = False
            for row in targets:
                if row.row in c.pending and row.ready & c.mask == c.mask and row.row not in c.ready:
                    c.ready[row.row] = None
                    woke = True
            if woke:
                c.signal.fire()
        if reserve_next is not None:
            n, group_size = reserve_next
            if len(part.rows) + n <= part.capacity:
                return await self.reserve(partition, n, group_size)
        return None

    # ------------------------------------------------------------------ consuming

    async def get(
        self, partition: str, consumer: str, fields: list[str], batch_size: int,
        sampler: str = "sequential", dp_size: int = 1, v_min: int | None = None,
        timeout_s: float | None = None, allow_partial: bool = False, lease_s: float | None = None,
        ack: list[int] | None = None, writes: list[str] | None = None, min_rows: int | None = None,
        peer: int = 0,
    ) -> dict:  # fmt: skip
        """Lease up to `batch_size` rows whose `fields` are ready, waiting (pushed, not polled) for them.

        `min_rows`: serve as soon as that many can be (up to batch_size of what is ready then)
        instead of waiting for a full batch.
        `ack`: rows of this consumer's previous batch to ack first (saves a round trip per batch).
        `writes`: fields this consumer fills in the rows it leases; if a lease is lost (the holder
        died or let it expire), cells of those fields that were written but never committed are
        deleted before the row is redelivered, so the next holder can write them.
        """
        if ack:
            await self.ack(partition, consumer, ack, peer)
        await self._open.wait()
        part = self._partition(partition)
        c = self._reader(part, consumer, fields, writes)
        if batch_size < 1:
            raise DataPlaneError(f"batch_size {batch_size} must be >= 1")
        least = batch_size if min_rows is None else min(max(min_rows, 1), batch_size)
        if least > part.capacity and not allow_partial:
            raise DataPlaneError(too_big(partition, least, part.capacity))
        chooser = make_sampler(sampler, dp_size)
        timeout_s = self.config.get_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        started, waited, end = time.monotonic(), False, False
        while True:
            await self._open.wait()  # a checkpoint is being taken: change nothing until it is done
            if v_min is not None:
                await self._retire_stale(part, c, v_min)
            drained = part.sealed and len(c.ready) == len(c.pending)  # nothing more can become ready
            selection = select_at_least(
                chooser, candidates(part, c, chooser, batch_size), batch_size, least, drained
            )
            if selection is not None and selection.rows:
                break
            # End of stream: nothing left can be served, and no other instance holds rows that
            # could come back (the caller's own leases are in its hands).
            if drained and all(lease.peer == peer for lease in c.leases.values()):
                selection, end = _EMPTY, True
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if allow_partial:
                    selection = chooser.select(candidates(part, c, chooser, batch_size), batch_size, True)
                    selection = selection or _EMPTY
                    break
                raise not_ready(
                    partition, consumer, batch_size, fields, timeout_s, len(c.ready), len(c.pending)
                )
            if not waited:
                c.counts["waits"] += 1
                waited = True
            await c.signal.wait(remaining)
            if part is not self._partitions.get(partition):
                raise UnknownPartition(f"partition {partition!r} was dropped while {consumer!r} waited")
        if waited:
            c.wait_s += time.monotonic() - started
        return self._lease(part, c, selection.rows, selection.shards, peer, lease_s) | {"end": end}

    def _reader(
        self, part: Partition, consumer: str, fields: list[str], writes: list[str] | None
    ) -> Consumer:
        """The registered consumer, its ready set kept for `fields` and the fields it writes noted."""
        c = part.consumers.get(consumer)
        if c is None:
            raise DataPlaneError(
                f"consumer {consumer!r} is not registered on partition {part.name!r} (registered: "
                f"{sorted(part.consumers)}); pass it in create_partition(consumers=...) or call "
                "register_consumer first, so rows are kept until it has read them"
            )
        if writes:
            c.writes |= part.mask(writes)
        mask = part.mask(fields)
        if c.mask != mask:  # the consumer asks for other fields than last time: rebuild its ready set
            c.mask = mask
            c.ready = {r: None for r in c.pending if part.rows[r].ready & mask == mask}
        return c

    def _lease(self, part, c: Consumer, rows: list[int], shards, peer: int, lease_s: float | None) -> dict:
        lease_s = lease_s or self.config.lease_s
        deadline = time.monotonic() + lease_s
        meta = part.lease(c, rows, Lease(peer, deadline))
        if rows:
            self._deadlines.push(deadline, "lease", part.name, c.name)
        return meta | {"shards": shards, "lease_s": lease_s}

    async def _retire_stale(self, part: Partition, c: Consumer, v_min: int) -> None:
        stale = [r for r in c.ready if 0 <= part.rows[r].version < v_min]
        if not stale:
            return
        if part.stale_policy == "drop":
            for r in stale:
                del c.pending[r]
                del c.ready[r]
                c.counts["dropped_stale"] += 1
                self._done(part, c, part.rows[r])
            return
        await regenerate(part, c, [part.rows[r] for r in stale], self._units)

    async def ack(self, partition: str, consumer: str, rows: list[int], peer: int = 0) -> int:
        """Complete rows this client holds. Acking a row the consumer already completed is a no-op,
        so an ack may be sent again when it is unknown whether the first one arrived."""
        await self._open.wait()
        part = self._partition(partition)
        c = self._consumer(part, consumer)
        bit = 1 << c.bit
        rows = [r for r in rows if r in part.rows and not part.rows[r].acked & bit]  # freed rows were acked
        part.check_leases(c, rows, peer, "ack")
        for r in rows:
            del c.leases[r]
            c.counts["acked"] += 1
            self._done(part, c, part.rows[r])
        if part.sealed:  # its last leases may have been what kept a waiting get from ending
            c.signal.fire()
        return len(rows)

    async def release(self, partition: str, consumer: str, rows: list[int], peer: int = 0) -> int:
        """Give leased rows back unprocessed; another instance gets them."""
        part = self._partition(partition)
        c = self._consumer(part, consumer)
        part.check_leases(c, rows, peer, "release")
        part.give_back(c, rows)
        return len(rows)

    async def renew(self, partition: str, consumer: str, rows: list[int], lease_s: float | None = None,
                    peer: int = 0) -> None:  # fmt: skip
        part = self._partition(partition)
        c = self._consumer(part, consumer)
        part.check_leases(c, rows, peer, "renew")
        deadline = time.monotonic() + (lease_s or self.config.lease_s)
        for r in rows:
            c.leases[r].deadline = deadline
        if rows:
            self._deadlines.push(deadline, "lease", partition, consumer)

    def _consumer(self, part: Partition, consumer: str) -> Consumer:
        c = part.consumers.get(consumer)
        if c is None:
            raise DataPlaneError(f"consumer {consumer!r} is not registered on partition {part.name!r}")
        return c

    def _done(self, part: Partition, c: Consumer, row: Row) -> None:
        if part.done(c, row):  # every consumer is done with it
            self._free(part, row)

    def _free(self, part: Partition, row: Row) -> None:
        part.free(row)
        self._units.free(part.name, row)

    async def on_disconnect(self, peer: int) -> None:
        """The connection that held leases closed (its process died): redeliver them now."""
        for part in self._partitions.values():
            for c in part.consumers.values():
                lost = [r for r, lease in c.leases.items() if lease.peer == peer]
                if lost:
                    await self._redeliver(part, c, lost)

    # ------------------------------------------------------------------ leases expire

    async def _due(self, kind: str, partition: str, key: Any, now: float) -> None:
        """A deadline passed: return expired leases to pending, or free a reservation never committed."""
        part = self._partitions.get(partition)
        if part is None:
            return
        if kind == "reserve":
            first, n = key
            await self.abort(partition, list(range(first, first + n)))
            return
        c = part.consumers.get(key)
        expired = [r for r, lease in c.leases.items() if lease.deadline <= now] if c else []
        if c is not None and expired:
            await self._redeliver(part, c, expired)

    async def _redeliver(self, part: Partition, c: Consumer, rows: list[int]) -> None:
        """Hand rows whose lease was lost to the next instance. A holder that died inside a put may
        have left cells on a unit that were never committed: delete them first."""
        c.counts["redelivered"] += len(rows)
        for r in rows:
            c.leases.pop(r, None)
        orphans: dict[tuple[int, int], list[int]] = {}
        for r in rows:
            row = part.rows.get(r)
            if row is not None and c.writes & ~row.ready:
                orphans.setdefault((row.unit, c.writes & ~row.ready), []).append(r)
        await self._units.delete_fields(part, orphans)
        part.give_back(c, [r for r in rows if r in part.rows])

    # ------------------------------------------------------------------ waiting, stats, checkpoint

    async def _wait(self, ready, signal: Signal, timeout_s: float, message: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StoreTimeout(message.format(timeout_s=timeout_s))
            await signal.wait(remaining)

    async def stats(self) -> dict:
        unit_stats = await self._units.each("stats")
        partitions = {part.name: part.stats() for part in self._partitions.values()}
        return {"partitions": partitions, "units": unit_stats}

    async def checkpoint(self) -> dict:
        """One consistent snapshot: the metadata (packed) and every unit's rows (see MemoryStorage.dump).

        No file is touched here: the bytes go back to the client that asked, which writes them.
        """
        self._open.clear()  # producers and consumers wait while the snapshot is taken
        try:
            await asyncio.sleep(0)  # let requests already past the gate finish their synchronous part
            meta = [snapshot(p) for p in self._partitions.values()]
            units = await self._units.each("dump")
        finally:
            self._open.set()
        return {"controller": pack({"version": 1, "partitions": meta}), "units": list(units)}

    async def restore(self, controller: bytes) -> dict:
        """Take a checkpoint's metadata into this (empty) store. Leased rows come back as pending.

        Returns which fields of which rows each unit keeps (`keep`, by unit), for the client to
        load the units' rows with. Restore before anyone uses the store.
        """
        if self._partitions:
            raise DataPlaneError(
                f"restore into store {self.config.name!r} that already has partitions "
                f"{sorted(self._partitions)}; restore into a freshly started store"
            )
        state = unpack(controller)
        n = len(self._units)
        keep: list[dict[str, dict[int, list[str]]]] = [{} for _ in range(n)]
        for saved in state["partitions"]:
            part = from_snapshot(saved, n)
            self._partitions[part.name] = part
            for row in part.rows.values():
                keep[row.unit].setdefault(part.name, {})[row.row] = part.fields(row.ready)
                self._units.add(row)
        rows = sum(len(p.rows) for p in self._partitions.values())
        return {"partitions": len(self._partitions), "rows": rows, "keep": keep}
