"""The memory store's client: put rows, get ready rows, ack them, stream them.

It implements `dataplane.client.StoreClient`. A client needs only the controller's address:
it asks the controller where rows are and talks to the storage units directly, so the data
never passes through the controller. It checks rows against the partition schema before
anything leaves the process, so a bad put changes nothing in the store.

This module knows nothing about Ray; `dataplane.store` finds addresses by store name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dataplane.batch import Batch, ClientStats
from dataplane.codec import unpack
from dataplane.columns import assemble, check_put, wire
from dataplane.errors import DataPlaneError, SchemaError, StorageUnavailable
from dataplane.memory import auth
from dataplane.memory.wire import Stub
from dataplane.schema import FieldSpec, parse_schema
from dataplane.stream import stream


class MemoryStoreClient:
    """Async client of a memory store (its controller and storage-unit actors). Use from any
    asyncio code: a Ray actor, the driver, a server."""

    def __init__(self, address: str):
        self.address = address
        self._endpoint, self._token = auth.parse(address)
        self._controller = Stub(self._endpoint, self._token)
        self._controller.connection.on_late_result = self._late_result
        self._units: list[Stub] = []
        self._schemas: dict[str, dict[str, FieldSpec]] = {}
        self._reserved: dict[str, dict] = {}  # partition -> rows reserved for this client's next put
        self.stats = ClientStats()

    @classmethod
    async def connect(cls, address: str) -> MemoryStoreClient:
        """A client of the memory store at `address` (asyncflow://TOKEN@HOST:PORT)."""
        client = cls(address)
        client._units = [Stub(a, client._token) for a in await client._controller.units()]
        return client

    async def _late_result(self, method: str, kwargs: dict, result: Any) -> None:
        """A get cancelled after the controller had leased its rows: hand them back at once."""
        if method == "get" and result["rows"]:
            with contextlib.suppress(DataPlaneError):
                await self._controller.release(
                    partition=kwargs["partition"], consumer=kwargs["consumer"], rows=result["rows"]
                )

    async def close(self) -> None:
        for partition, spare in self._reserved.items():  # give back capacity held for a next put
            with contextlib.suppress(DataPlaneError):
                await self._controller.abort(partition=partition, rows=spare["rows"])
        self._reserved.clear()
        await asyncio.gather(self._controller.close(), *(u.close() for u in self._units))

    # -------------------------------------------------------------- partitions

    async def create_partition(
        self, name: str, schema: Mapping[str, str], *, capacity: int | None = None,
        consumers: Sequence[str] = (), exist_ok: bool = False, stale_policy: str | None = None,
    ) -> dict:  # fmt: skip
        """Declare a partition: `schema` maps field -> spec ('int64[*]', 'float32', 'str', ...).

        `consumers` are registered now, so rows are kept until each of them has acked them;
        `stale_policy` ("drop" | "regenerate") overrides dataplane.stale_policy.
        """
        parse_schema(dict(schema))  # refuse a bad schema here, with the same message as the store
        info = await self._controller.create_partition(
            name=name, schema=dict(schema), capacity=capacity, consumers=list(consumers),
            exist_ok=exist_ok, stale_policy=stale_policy,
        )  # fmt: skip
        self._schemas[name] = parse_schema(info["schema"])
        return info

    async def register_consumer(self, partition: str, consumer: str) -> None:
        await self._controller.register_consumer(partition=partition, consumer=consumer)

    async def describe(self, partition: str) -> dict:
        return await self._controller.describe(name=partition)

    async def seal(self, partition: str) -> None:
        """Announce that no new rows will come, so consumers drain the rest and their streams end."""
        await self._controller.seal(partition=partition)

    async def drop_partition(self, partition: str) -> None:
        self._schemas.pop(partition, None)
        await self._controller.drop_partition(partition=partition)

    async def _schema(self, partition: str) -> dict[str, FieldSpec]:
        schema = self._schemas.get(partition)
        if schema is None:
            schema = self._schemas[partition] = parse_schema((await self.describe(partition))["schema"])
        return schema

    # -------------------------------------------------------------- producing

    async def put(
        self, partition: str, data: Mapping[str, Any], rows: Batch | Sequence[int] | None = None, *,
        group_size: int = 1, version: int | None = None, lengths: Sequence[int] | None = None,
        timeout_s: float | None = None,
    ) -> list[int]:  # fmt: skip
        """Write fields. Without `rows`: new rows (grouped by `group_size`), waiting while the
        partition is full. With `rows` (indices or a Batch): fill more fields of existing rows.

        `version` is the policy version that produced these values; `lengths` (tokens per row)
        feeds the balanced sampler and defaults to the longest ragged field written.
        Returns the row indices. Nothing is stored if any value is refused.
        """
        schema = await self._schema(partition)
        n, columns = check_put(
            partition,
            schema,
            data,
            None if rows is None else list(rows.rows if isinstance(rows, Batch) else rows),
        )
        new = rows is None
        index: list[int]
        if rows is None:
            placed = await self._reservation(partition, n, group_size, timeout_s)
            index, units = placed["rows"], placed["units"]
        elif isinstance(rows, Batch):
            index, units = list(rows.rows), list(rows.units)
        else:
            index = [int(r) for r in rows]
            units = await self._controller.locate(partition=partition, rows=index)
        await self._write(partition, index, units, columns, new)
        if lengths is None:
            lengths = [max((c.lengths[i] for c in columns.values()), default=0) for i in range(n)]
        nbytes = [sum(c.nbytes[i] for c in columns.values()) for i in range(n)]
        try:
            spare = await self._controller.commit(
                partition=partition, rows=index, fields=list(columns), version=version,
                lengths=list(lengths), nbytes=nbytes, reserve_next=[n, group_size] if new else None,
            )  # fmt: skip
        except StorageUnavailable:
            raise  # the commit may have landed: its cells are the store's now
        except DataPlaneError:  # refused (the rows were freed meanwhile, ...): take the cells back
            await asyncio.shield(self._undo(partition, index, units, list(columns), new))
            raise
        if spare is not None:
            spare.update(n=n, group_size=group_size, at=time.monotonic())
            older = self._reserved.pop(partition, None)  # concurrent puts: keep one spare, return the other
            self._reserved[partition] = spare
            if older is not None:
                await self._controller.abort(partition=partition, rows=older["rows"])
        self.stats.puts += 1
        self.stats.rows_put += n
        self.stats.bytes_put += sum(nbytes)
        return index

    async def _reservation(self, partition: str, n: int, group_size: int, timeout_s: float | None) -> dict:
        """Rows for a put of n new rows: the spare the last commit returned if it fits, else reserve."""
        spare = self._reserved.pop(partition, None)
        if spare is not None:
            fresh = time.monotonic() - spare["at"] < spare["expires_in_s"] / 2
            if fresh and spare["n"] == n and spare["group_size"] == group_size:
                return spare
            await self._controller.abort(partition=partition, rows=spare["rows"])
        return await self._controller.reserve(
            partition=partition, n=n, group_size=group_size, timeout_s=timeout_s
        )

    async def _write(self, partition: str, rows: list[int], units: list[int], columns, new: bool) -> None:
        by_unit = _positions_by_unit(units)
        for u, pos in by_unit.items():  # refused here, before anything is sent, rather than by the unit
            connection = self._units[u].connection
            await connection.connect()
            size = sum(c.nbytes[i] for c in columns.values() for i in pos)
            if size > connection.max_message_bytes * 0.99:
                if new:
                    await self._controller.abort(partition=partition, rows=rows)
                raise SchemaError(
                    f"put of {len(rows)} rows to {partition!r} sends {size / 2**20:.0f} MiB to one storage "
                    f"unit, over the store's limit of {connection.max_message_bytes >> 20} MiB per message "
                    "(dataplane.max_message_mb); put fewer rows at a time, or raise the limit"
                )
        calls = [
            self._units[u].write(
                partition=partition,
                rows=[rows[i] for i in pos],
                columns={f: wire(c, pos) for f, c in columns.items()},
            )
            for u, pos in by_unit.items()
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if not failed:
            return
        # All or nothing: take back what did land, then report the first failure.
        landed = [u for u, r in zip(by_unit, results) if not isinstance(r, BaseException)]
        await self._undo(partition, rows, units, list(columns), new, only=landed)
        raise failed[0]

    async def _undo(
        self, partition: str, rows: list[int], units: list[int], fields: list[str], new: bool,
        only: Sequence[int] | None = None,
    ) -> None:  # fmt: skip
        """Delete the cells of a put that will not be committed; give back its reservation."""
        by_unit = _positions_by_unit(units)
        await asyncio.gather(
            *(
                self._units[u].delete(partition=partition, rows=[rows[i] for i in pos], fields=fields)
                for u, pos in by_unit.items()
                if only is None or u in only
            )
        )
        if new:
            with contextlib.suppress(DataPlaneError):
                await self._controller.abort(partition=partition, rows=rows)

    # -------------------------------------------------------------- consuming

    async def get(
        self, partition: str, fields: Sequence[str], batch_size: int, consumer: str, *,
        sampler: str = "sequential", dp_size: int = 1, v_min: int | None = None,
        timeout_s: float | None = None, allow_partial: bool = False, lease_s: float | None = None,
        ack: Batch | None = None, writes: Sequence[str] = (), min_rows: int | None = None,
    ) -> Batch:  # fmt: skip
        """Lease up to `batch_size` rows with `fields` ready that `consumer` has not had.

        Waits until the sampler can serve a full batch, or `min_rows` rows if given (then it takes
        up to batch_size of what is ready); raises StoreTimeout after `timeout_s`, or returns what
        there is if `allow_partial`. With `v_min`, rows of an
        older policy version are dropped or regenerated instead (dataplane.stale_policy).
        `ack` acks a previous batch of the same consumer in the same round trip. `writes` names
        the fields this consumer fills in these rows: if it dies mid-put, the store clears what it
        half wrote before another instance gets the rows.
        """
        if ack is not None and ack.consumer != consumer:
            raise SchemaError(f"ack= takes a batch of consumer {consumer!r}, got one of {ack.consumer!r}")
        asked = time.monotonic()
        meta = await self._controller.get(
            partition=partition, consumer=consumer, fields=list(fields), batch_size=batch_size,
            sampler=sampler, dp_size=dp_size, v_min=v_min, timeout_s=timeout_s,
            allow_partial=allow_partial, lease_s=lease_s, ack=list(ack.rows) if ack else None,
            writes=list(writes) or None, min_rows=min_rows,
        )  # fmt: skip
        schema = await self._schema(partition)
        try:
            data = await self._read(partition, meta["rows"], meta["units"], list(fields), schema)
        except asyncio.CancelledError:  # leased, never handed over: give them back now
            await asyncio.shield(
                self._late_result("get", {"partition": partition, "consumer": consumer}, meta)
            )
            raise
        self.stats.gets += 1
        self.stats.rows_got += len(meta["rows"])
        return Batch(
            partition, consumer, meta["rows"], data, meta["units"], meta["groups"], meta["versions"],
            meta["lengths"], meta["shards"], meta["end"], asked, meta["lease_s"],
        )  # fmt: skip

    async def _read(self, partition, rows, units, fields, schema) -> dict[str, Any]:
        if not rows:
            return {f: assemble([], schema[f], 0) for f in fields}
        by_unit = _positions_by_unit(units)
        replies = await asyncio.gather(
            *(
                self._units[u].read(partition=partition, rows=[rows[i] for i in pos], fields=fields)
                for u, pos in by_unit.items()
            )
        )
        data = {}
        for f in fields:
            parts = [(pos, reply[f]) for pos, reply in zip(by_unit.values(), replies)]
            self.stats.bytes_got += sum(int(getattr(w[1], "nbytes", 0)) for _, w in parts)
            data[f] = assemble(parts, schema[f], len(rows))
        return data

    async def ack(self, batch: Batch) -> None:
        """Complete the batch: this consumer is done with its rows."""
        if batch.rows:
            await self._controller.ack(
                partition=batch.partition, consumer=batch.consumer, rows=list(batch.rows)
            )

    async def release(self, batch: Batch) -> None:
        """Hand the batch back unprocessed; another instance of the consumer gets it."""
        if batch.rows:
            await self._controller.release(
                partition=batch.partition, consumer=batch.consumer, rows=list(batch.rows)
            )

    async def renew(self, batch: Batch, lease_s: float | None = None) -> None:
        """Extend the lease of a batch that takes long to process."""
        await self._controller.renew(
            partition=batch.partition, consumer=batch.consumer, rows=list(batch.rows), lease_s=lease_s
        )

    def stream(
        self, partition: str, fields: Sequence[str], batch_size: int, consumer: str, *,
        auto_ack: bool = True, prefetch: int = 2, **get_kwargs: Any,
    ) -> AsyncGenerator[Batch, None]:  # fmt: skip
        """Yield batches until the partition is sealed and drained (`dataplane.stream.stream`)."""
        return stream(
            self, partition, fields, batch_size, consumer, auto_ack=auto_ack, prefetch=prefetch, **get_kwargs
        )

    # -------------------------------------------------------------- whole store

    async def store_stats(self) -> dict:
        return await self._controller.stats()

    async def checkpoint(self, path: str) -> dict:
        """Save the whole store (rows, readiness, consumption) under directory `path`, written by
        this process (the store never opens a file on a client's behalf)."""
        snap = await self._controller.checkpoint()
        files = {"controller.msgpack": snap["controller"]}
        files |= {f"unit-{i}.bin": blob for i, blob in enumerate(snap["units"])}
        write_files(Path(path), files)
        meta = unpack(snap["controller"])["partitions"]
        return {"partitions": len(meta), "rows": sum(len(p["rows"]) for p in meta)}

    async def restore(self, path: str) -> dict:
        """Load a checkpoint into this freshly started store (before anyone uses it); leased rows
        become pending again. A store with fewer units takes the rows of the others too."""
        self._schemas.clear()
        reply = await self._controller.restore(controller=Path(path, "controller.msgpack").read_bytes())
        keep, loaded = reply["keep"], 0
        dumps = sorted(Path(path).glob("unit-*.bin"), key=lambda p: int(p.stem.split("-")[1]))
        limit = self._controller.connection.max_message_bytes // 2
        for i, dump in enumerate(dumps):
            unit = i % len(self._units)
            for chunk in records(Path(dump).read_bytes(), limit):
                loaded += await self._units[unit].load(data=chunk, keep=keep[unit])
        return {"partitions": reply["partitions"], "rows": loaded}


def write_files(directory: Path, files: Mapping[str, Any]) -> None:
    """Write each file whole or not at all (a temp file, fsynced, renamed over the name)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        tmp = directory / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(memoryview(data).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)


def records(dump: bytes, limit: int) -> Iterator[memoryview]:
    """A unit dump (8-byte length, record, ...) in runs of whole records of about `limit` bytes."""
    view, start, offset = memoryview(dump), 0, 0
    while offset < len(view):
        size = int.from_bytes(view[offset : offset + 8], "little")
        if offset > start and offset + 8 + size - start > limit:
            yield view[start:offset]
            start = offset
        offset += 8 + size
    if offset > start:
        yield view[start:offset]


def _positions_by_unit(units: Sequence[int]) -> dict[int, list[int]]:
    by_unit: dict[int, list[int]] = {}
    for i, u in enumerate(units):
        by_unit.setdefault(u, []).append(i)
    return by_unit
