"""The Redis backend: rows, metadata and consumption state all live in Redis.

No process holds state a crash can lose: every client runs the partition's logic as atomic
Lua scripts (`dataplane.redis.scripts`, with the key layout), so any number
of processes attach to one store with only its URL, on Ray or not. A put is one script
(capacity check, rows, cells, readiness), a get is one script (expire leases, version
window, choose, lease, say where the cells are, which the client then reads with plain
GETRANGEs); group and balanced samplers read the candidates in a first script, choose with
`dataplane.samplers` and lease exactly those rows in a second one. A client that must wait
blocks in XREAD on the partition's one-entry event stream, from the id its last script
saw, so a wake-up is never missed and nothing polls. Script calls and cell reads, a get's hot
path, go over connections of the client's own (`dataplane.redis.wire`); everything else through redis-py.

Durability is Redis' own (AOF); a command that fails because the server went away is
retried with backoff until `retry_deadline_s` (puts carry an id, so a retried put is
stored once). A client that dies holding leases stops its heartbeat; its rows go back
within three heartbeats instead of after `lease_s`. A client that closes gives them back
at once. redis-py is imported only by these modules, so `import dataplane` works without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

import msgpack

from dataplane.batch import Batch, ClientStats
from dataplane.config import DataPlaneConfig, RedisConfig, redact_url
from dataplane.errors import (
    DataPlaneError,
    LeaseError,
    SchemaError,
)
from dataplane.redis import puts
from dataplane.redis import scripts as lua
from dataplane.redis import snapshot as snapshots
from dataplane.redis.cells import array_header, decode_column, read_columns
from dataplane.redis.connection import (
    aioredis,
    call,
    lease_error,
    make_pool,
    schema_text,
    script_error,
    split_address,
    text,
)
from dataplane.redis.wire import Wire
from dataplane.samplers import Candidate, make_sampler, not_ready, select_at_least
from dataplane.schema import FieldSpec, parse_schema
from dataplane.stream import stream


class RedisStoreClient:
    """The store client on Redis (`dataplane.client.StoreClient`): the same methods, arguments,
    Batch and errors as the memory store's."""

    def __init__(self, address: str, config: DataPlaneConfig | None = None):
        self.address = address
        self.url, self.namespace = split_address(address)
        self.config = config or DataPlaneConfig(backend="redis")
        self._rc = self.config.redis
        self._r = aioredis().Redis(connection_pool=make_pool(self.url, self._rc))
        self._wire = Wire(self._r.connection_pool, self._rc.max_connections)  # script calls, cell reads
        self._scripts = {name: self._r.register_script(text) for name, text in lua.SCRIPTS.items()}
        self._schemas: dict[str, dict[str, FieldSpec]] = {}
        self._peer = uuid.uuid4().hex[:16]
        self._fifo: dict[tuple[str, str], asyncio.Lock] = {}
        self._held: set[str] = set()  # partitions this client took leases in: it heartbeats there
        # (partition, consumer) -> row -> id of the lease this client holds the row under
        self._leases: dict[tuple[str, str], dict[int, str]] = {}
        self._heartbeat: asyncio.Task | None = None
        self._alive_ms = int(3000 * self._rc.heartbeat_s)
        self.stats = ClientStats()

    @classmethod
    async def connect(cls, address: str, config: RedisConfig | None = None) -> RedisStoreClient:
        """A client of the Redis store at `address` (URL, optionally `#<prefix>:<name>`).

        The store's settings (lease_s, timeouts, capacity) are read from Redis, where
        `start_store` left them; a store never started there gets the defaults.
        """
        client = cls(address, DataPlaneConfig(backend="redis", redis=config or RedisConfig()))
        saved = await client._call(client._r.get, f"{client.namespace}:config")
        if saved is None:
            return client
        settings = json.loads(saved)
        if config is None:  # the pool sizes and timeouts the store was started with
            await client._r.aclose()
            await client._r.connection_pool.disconnect()
            settings["redis"] = settings.get("redis", {}) | {"url": client.url}
            return cls(address, DataPlaneConfig(**settings))
        client.config = DataPlaneConfig(**(settings | {"redis": config.model_dump()}))
        return client

    def __repr__(self) -> str:
        return f"RedisStoreClient({redact_url(self.url)!r}, namespace={self.namespace!r})"

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for partition in sorted(self._held):  # leases this client still holds go back now
            with contextlib.suppress(DataPlaneError):
                await self._run("ALIVE", partition, self._peer, "0")
        self._held.clear()
        self._leases.clear()
        self._wire.close()
        await self._r.aclose()
        await self._r.connection_pool.disconnect()

    # -------------------------------------------------------------- calling Redis

    def _key(self, partition: str) -> str:
        return f"{self.namespace}:{{{partition}}}"

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """fn(*args), retried with exponential backoff while the server is unreachable."""
        return await call(self.url, self.namespace, self._rc, fn, *args, **kwargs)

    async def _run(self, name: str, partition: str, *args: Any) -> list:
        reply = await self._call(self._eval, self._scripts[name], self._key(partition), *args)
        if reply[0] == b"err":
            raise self._error(partition, reply)
        return reply

    async def _eval(self, script: Any, *args: Any) -> Any:
        """The script's reply to `args`; a server that does not know the script yet (new,
        restarted, or its script cache flushed) is given it first."""
        import redis.exceptions

        try:
            return await self._wire.command("EVALSHA", script.sha, 0, *args)
        except redis.exceptions.ResponseError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
        await self._wire.command("SCRIPT", "LOAD", script.script)
        return await self._wire.command("EVALSHA", script.sha, 0, *args)

    def _error(self, partition: str, reply: list) -> DataPlaneError:
        return script_error(partition, self.namespace, self.url, self._bits(partition), reply)

    async def _block(self, partition: str, stream: str, last_id: bytes, timeout_s: float) -> None:
        """Wait until the partition's `stream` gets an entry after `last_id`, or `timeout_s` passes."""
        ms = int(min(timeout_s, self._rc.socket_timeout_s / 2) * 1000)
        if ms > 0:
            await self._call(self._r.xread, {f"{self._key(partition)}:{stream}": last_id}, count=1, block=ms)

    def _start_heartbeat(self, partition: str) -> None:
        self._held.add(partition)
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.ensure_future(self._beat())

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._rc.heartbeat_s)
            for partition in list(self._held):
                with contextlib.suppress(DataPlaneError):
                    await self._run("ALIVE", partition, self._peer, self._alive_ms)

    # -------------------------------------------------------------- partitions

    async def create_partition(
        self, name: str, schema: Mapping[str, str], *, capacity: int | None = None,
        consumers: Sequence[str] = (), exist_ok: bool = False, stale_policy: str | None = None,
    ) -> dict:  # fmt: skip
        specs = parse_schema(dict(schema))
        stale_policy = stale_policy or self.config.stale_policy
        if stale_policy not in ("drop", "regenerate"):
            raise DataPlaneError(f"stale_policy {stale_policy!r} is not one of 'drop', 'regenerate'")
        capacity = capacity or self.config.capacity_rows
        if capacity < 1:
            raise DataPlaneError(f"partition {name!r}: capacity {capacity} must be >= 1 rows")
        text = json.dumps([[f, str(s)] for f, s in specs.items()])
        await self._run(
            "CREATE", name, text, capacity, stale_policy, int(exist_ok), f"{self.namespace}:partitions", name,
            len(specs), *specs, len(consumers), *consumers,
        )  # fmt: skip
        self._schemas[name] = specs
        return await self.describe(name)

    async def register_consumer(self, partition: str, consumer: str) -> None:
        await self._run("REGISTER", partition, consumer)

    async def describe(self, partition: str) -> dict:
        meta, cons = await self._meta(partition)
        return {
            "name": partition,
            "schema": schema_text(meta["schema"]),
            "capacity": int(meta["capacity"]),
            "consumers": cons,
            "sealed": meta["sealed"] == "1",
            "stale_policy": meta["stale"],
        }

    async def _meta(self, partition: str) -> tuple[dict[str, str], list[str]]:
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hgetall(f"{self._key(partition)}:meta").hgetall(f"{self._key(partition)}:cons")
            meta, cons = await self._call(pipe.execute)
        if not meta:
            raise self._error(partition, [b"err", b"unknown"])
        return text(meta), [c.decode() for c, _ in sorted(cons.items(), key=lambda kv: int(kv[1]))]

    async def seal(self, partition: str) -> None:
        await self._run("SEAL", partition)

    async def drop_partition(self, partition: str) -> None:
        self._schemas.pop(partition, None)
        self._held.discard(partition)  # nothing left there to keep alive
        for key in [k for k in self._leases if k[0] == partition]:
            del self._leases[key]
        await self._run("DROP", partition, f"{self.namespace}:partitions", partition)

    async def _schema(self, partition: str) -> dict[str, FieldSpec]:
        schema = self._schemas.get(partition)
        if schema is None:
            schema = self._schemas[partition] = parse_schema((await self.describe(partition))["schema"])
        return schema

    def _bits(self, partition: str) -> dict[str, int]:
        return {f: i for i, f in enumerate(self._schemas.get(partition, {}))}

    def _mask(self, partition: str, fields: Sequence[str]) -> tuple[int, list[int]]:
        bits = self._bits(partition)
        unknown = [f for f in fields if f not in bits]
        if unknown:
            raise SchemaError(
                f"partition {partition!r} has no field {unknown[0]!r}; its fields are {sorted(bits)}"
            )
        return sum(1 << bits[f] for f in set(fields)), [bits[f] for f in fields]

    # -------------------------------------------------------------- producing

    async def put(
        self, partition: str, data: Mapping[str, Any], rows: Batch | Sequence[int] | None = None, *,
        group_size: int = 1, version: int | None = None, lengths: Sequence[int] | None = None,
        timeout_s: float | None = None,
    ) -> list[int]:  # fmt: skip
        """See `dataplane.client.StoreClient.put` (`dataplane.redis.puts`)."""
        return await puts.put(self, partition, data, rows, group_size, version, lengths, timeout_s)

    # -------------------------------------------------------------- consuming

    async def get(
        self, partition: str, fields: Sequence[str], batch_size: int, consumer: str, *,
        sampler: str = "sequential", dp_size: int = 1, v_min: int | None = None,
        timeout_s: float | None = None, allow_partial: bool = False, lease_s: float | None = None,
        ack: Batch | None = None, writes: Sequence[str] = (), min_rows: int | None = None,
    ) -> Batch:  # fmt: skip
        # `writes` needs nothing here: a put is one atomic script, so a client that dies mid-put
        # leaves no half-written cells for the next holder of the rows.
        if ack is not None and ack.consumer != consumer:
            raise SchemaError(f"ack= takes a batch of consumer {consumer!r}, got one of {ack.consumer!r}")
        # Gets of one consumer from this client lease rows in the order they were asked, as the
        # memory store does: a stream's read-ahead must not take the rows its first request waits
        # for. Reading the cells needs no order, so the next get's lease overlaps this one's read.
        fifo = self._fifo.setdefault((partition, consumer), asyncio.Lock())
        if ack is not None and fifo.locked():  # an ack must not wait behind another get's wait
            await self.ack(ack)
            ack = None
        while True:
            async with fifo:
                got = await self._get(
                    partition, fields, batch_size, consumer, sampler, dp_size, v_min, timeout_s,
                    allow_partial, lease_s, ack, min_rows,
                )  # fmt: skip
            if isinstance(got, Batch):
                return got
            batch = await self._batch(partition, consumer, fields, *got)
            if batch is not None:
                return batch
            ack = None  # sent; a field was regenerated meanwhile and the rows went back: ask again

    async def _get(
        self, partition: str, fields: Sequence[str], batch_size: int, consumer: str, sampler: str,
        dp_size: int, v_min: int | None, timeout_s: float | None, allow_partial: bool,
        lease_s: float | None, ack: Batch | None, min_rows: int | None,
    ) -> Batch | tuple:  # fmt: skip
        """Lease rows: a Batch when there is nothing to read (end, or partial and empty), else what
        `_batch` needs to read the leased rows' cells."""
        schema = await self._schema(partition)
        if batch_size < 1:
            raise DataPlaneError(f"batch_size {batch_size} must be >= 1")
        chooser = make_sampler(sampler, dp_size)
        mask, read_bits = self._mask(partition, fields)  # bits in the order of fields
        timeout_s = self.config.get_timeout_s if timeout_s is None else timeout_s
        started = time.monotonic()
        deadline = started + timeout_s
        acks = self._held_rows(partition, consumer, ack.rows) if ack is not None and ack.rows else b""
        mode = "seq" if chooser.name == "sequential" else "cand"
        least = batch_size if min_rows is None else min(max(min_rows, 1), batch_size)
        waited, partial = False, False
        lease_ms = int(1000 * (lease_s or self.config.lease_s))
        vmin = "" if v_min is None else int(v_min)

        asked = started

        async def attempt(mode: str, rows: Sequence[int] = ()) -> list:
            nonlocal asked
            asked = time.monotonic()
            wait_ms = int(1000 * (asked - started)) if waited else ""
            return await self._lease_script(
                partition, consumer, mask, batch_size, lease_ms, vmin, mode,
                "1" if partial else "a" if allow_partial else "0",
                self._alive_ms, wait_ms, least, acks, len(rows), *rows,
            )  # fmt: skip

        while True:
            try:
                reply = await attempt(mode)
            except LeaseError as e:
                raise lease_error(partition, consumer, "ack", str(e)) from None
            if acks:  # sent: the script acked them before anything else
                self._forget(partition, consumer, ack.rows if ack is not None else [])
                acks = b""
            shards = None
            if reply[0] == b"cand":  # the sampler chooses here, the script leases its choice
                reply, shards = await _choose(reply, chooser, batch_size, least, partial, attempt)
            if reply[0] == b"ok":
                self._start_heartbeat(partition)
                return reply, read_bits, schema, shards, asked, lease_ms / 1000
            if reply[0] == b"end":
                return Batch(partition, consumer, [], self._empty(fields, schema), [], [], [], [], None, True)
            if reply[0] == b"conflict":
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 and allow_partial:
                partial = True
                continue
            if remaining <= 0:
                raise not_ready(partition, consumer, batch_size, fields, timeout_s, *map(int, reply[3:5]))
            waited = True
            last, next_ms = reply[1:3]  # wake when rows may be ready, or the next lease may end
            wake = remaining if int(next_ms) < 0 else min(remaining, int(next_ms) / 1000 + 0.001)
            await self._block(partition, "ev", last, wake)

    async def _lease_script(self, partition: str, consumer: str, *args: Any) -> list:
        """The GET script's reply. If the caller is cancelled meanwhile, the script runs anyway:
        what it leased is handed back."""
        call = asyncio.ensure_future(self._run("GET", partition, consumer, self._peer, *args))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            reply = await call
            if reply[0] == b"ok" and reply[1]:
                await self._give_back(partition, consumer, reply)
            raise

    def _empty(self, fields: Sequence[str], schema: dict[str, FieldSpec]) -> dict[str, Any]:
        return {f: decode_column(schema[f], []) for f in fields}

    async def _give_back(self, partition: str, consumer: str, reply: list) -> None:
        """Release the rows a get's `reply` leased, for a get whose caller is gone."""
        rows = [int(r) for r in reply[1]]
        self._leases.setdefault((partition, consumer), {}).update(
            zip(rows, itertools.repeat(reply[2].decode()))
        )
        await self.release(Batch(partition, consumer, rows, {}, [0] * len(rows), [], [], [], None))

    async def _batch(
        self, partition, consumer, fields, reply, bits, schema, shards, leased_at: float, lease_s: float
    ) -> Batch | None:  # fmt: skip
        """The leased rows of a get's `reply` with their cells; None (rows handed back) if a cell
        went missing meanwhile (its field was regenerated)."""
        rows = [int(r) for r in reply[1]]
        metas = msgpack.unpackb(
            array_header(len(rows)) + reply[3]
        )  # as stored (layout: dataplane.redis.scripts)
        if rows:
            if None in metas:
                raise DataPlaneError(
                    f"partition {partition!r} handed out row {rows[metas.index(None)]} without its metadata: "
                    "the store's keys were changed from outside AsyncFlow; drop the partition and put again"
                )
            held = self._leases.setdefault((partition, consumer), {})
            lease = reply[2].decode()
            held.update(zip(rows, itertools.repeat(lease)))
        cols = list(zip(*metas))  # cols[i]: item i of every row's metadata
        groups, lengths, versions = (list(cols[i]) if rows else [] for i in (0, 2, 3))
        batch = Batch(
            partition, consumer, rows, {}, [0] * len(rows), groups, versions, lengths, shards, False,
            leased_at, lease_s,
        )  # fmt: skip
        try:
            wanted = [(b, schema[f]) for b, f in zip(bits, fields)]
            columns, nbytes = await self._call(
                read_columns, self._wire, self._key(partition), wanted, cols, len(rows)
            )
            self.stats.bytes_got += nbytes
        except asyncio.CancelledError:
            if rows:  # leased, never handed over: give them back now rather than when the lease ends
                await asyncio.shield(self.release(batch))
            raise
        if columns is None:
            await self.release(batch)
            return None
        batch.data = dict(zip(fields, columns))
        self.stats.gets += 1
        self.stats.rows_got += len(rows)
        return batch

    async def ack(self, batch: Batch) -> None:
        if batch.rows:
            await self._lease_call("ACK", batch, "ack")
            self._forget(batch.partition, batch.consumer, batch.rows)

    async def release(self, batch: Batch) -> None:
        if batch.rows:
            await self._lease_call("LEASES", batch, "release", "release", self._alive_ms)
            self._forget(batch.partition, batch.consumer, batch.rows)

    async def renew(self, batch: Batch, lease_s: float | None = None) -> None:
        if batch.rows:
            ms = int(1000 * (lease_s or self.config.lease_s))
            reply = await self._lease_call("LEASES", batch, "renew", ms, self._alive_ms)
            held = self._leases[(batch.partition, batch.consumer)]
            held.update((int(r), reply[1].decode()) for r in batch.rows)

    async def _lease_call(self, script: str, batch: Batch, verb: str, *args: Any) -> list:
        rows = self._held_rows(batch.partition, batch.consumer, batch.rows)
        try:
            return await self._run(script, batch.partition, batch.consumer, self._peer, *args, rows)
        except LeaseError as e:
            raise lease_error(batch.partition, batch.consumer, verb, str(e)) from None

    def _held_rows(self, partition: str, consumer: str, rows: Sequence[int]) -> bytes:
        """lease id, rows, lease id, rows, ... for `rows` as the scripts take them (one msgpack
        argument): each run of rows this client holds under one lease ('-': none, which the script
        refuses), comma-separated in their order, so a whole batch is its lease's id and the very
        string the lease keeps."""
        held = self._leases.get((partition, consumer), {})
        out: list[str] = []
        for lease, run in itertools.groupby(map(int, rows), key=lambda r: held.get(r, "-")):
            out += [lease, ",".join(map(str, run))]
        return msgpack.packb(out)

    def _forget(self, partition: str, consumer: str, rows: Sequence[int]) -> None:
        held = self._leases.get((partition, consumer), {})
        for r in rows:
            held.pop(int(r), None)

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
        return await snapshots.stats(self)

    async def checkpoint(self, path: str) -> dict:
        """Save every partition of this store under directory `path`, in the memory backend's format.

        Each partition is read in one atomic step; the durable path for a running store is Redis'
        own AOF. A checkpoint restores into either backend.
        """
        return await snapshots.checkpoint(self, str(path))

    async def restore(self, path: str) -> dict:
        """Load a checkpoint (of either backend) into this store, which must have no partitions."""
        self._schemas.clear()
        return await snapshots.restore(self, str(path))

    async def partitions(self) -> list[str]:
        members = await self._call(self._r.smembers, f"{self.namespace}:partitions")
        return sorted(m.decode() for m in members)


async def _choose(
    reply: list, chooser: Any, batch_size: int, least: int, partial: bool, attempt: Any
) -> tuple:
    """A get's candidates reply as the reply of leasing what the sampler chose from them (or end,
    an empty partial batch, or wait), and the choice's shards."""
    last, next_ms, nready, npend, drained, ended, flat = reply[1:8]
    cands = [Candidate(*map(int, flat[i : i + 4])) for i in range(0, len(flat), 4)]
    selection = select_at_least(chooser, cands, batch_size, least, bool(drained) or partial)
    if selection is not None and selection.rows:  # a conflict (another instance was quicker): choose again
        return await attempt("rows", selection.rows), selection.shards
    if ended:
        return [b"end"], None
    if partial:
        return [b"ok", [], b"", b""], None
    return [b"wait", last, next_ms, nready, npend], None
