"""The store client: what every backend implements, how an address picks one, and a blocking facade.

`StoreClient` is a protocol: `dataplane.memory.client.MemoryStoreClient` (the store's own
actors) and `dataplane.redis.client.RedisStoreClient` (rows in Redis) implement it, with the
same arguments, Batch and errors; the contract suite (tests/contract) is its specification.
`StoreClient.connect(address)` picks the backend from the address, so code written against
the protocol runs on either. `stream()` is written once (`dataplane.stream`) over get, ack,
release and renew.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from typing import Any, Protocol

from dataplane.batch import Batch, ClientStats


class StoreClient(Protocol):
    """Async client of one store. Use from any asyncio code: a Ray actor, the driver, a server."""

    address: str
    stats: ClientStats

    @staticmethod
    async def connect(address: str) -> StoreClient:
        """A client of the store at `address`: `asyncflow://TOKEN@HOST:PORT` (a memory store, as
        `start_store` returns it) or `redis[s]://...#<prefix>:<name>` (a Redis store)."""
        if address.startswith(("redis://", "rediss://")):
            from dataplane.redis.client import RedisStoreClient

            return await RedisStoreClient.connect(address)
        from dataplane.memory.client import MemoryStoreClient

        return await MemoryStoreClient.connect(address)

    async def close(self) -> None: ...

    async def create_partition(
        self, name: str, schema: Mapping[str, str], *, capacity: int | None = None,
        consumers: Sequence[str] = (), exist_ok: bool = False, stale_policy: str | None = None,
    ) -> dict:  # fmt: skip
        """Declare a partition: `schema` maps field -> spec ('int64[*]', 'float32', 'str', ...).

        `consumers` are registered now, so rows are kept until each of them has acked them;
        `stale_policy` ("drop" | "regenerate") overrides dataplane.stale_policy.
        """
        ...

    async def register_consumer(self, partition: str, consumer: str) -> None: ...

    async def describe(self, partition: str) -> dict: ...

    async def seal(self, partition: str) -> None:
        """Announce that no new rows will come, so consumers drain the rest and their streams end."""
        ...

    async def drop_partition(self, partition: str) -> None: ...

    async def put(
        self, partition: str, data: Mapping[str, Any], rows: Batch | Sequence[int] | None = None, *,
        group_size: int = 1, version: int | None = None, lengths: Sequence[int] | None = None,
        timeout_s: float | None = None,
    ) -> list[int]:  # fmt: skip
        """Write fields. Without `rows`: new rows (grouped by `group_size`), waiting while the
        partition is full. With `rows` (indices or a Batch): fill more fields of existing rows.
        `version` is the policy version that produced these values. Returns the row indices.
        Nothing is stored if any value is refused."""
        ...

    async def get(
        self, partition: str, fields: Sequence[str], batch_size: int, consumer: str, *,
        sampler: str = "sequential", dp_size: int = 1, v_min: int | None = None,
        timeout_s: float | None = None, allow_partial: bool = False, lease_s: float | None = None,
        ack: Batch | None = None, writes: Sequence[str] = (), min_rows: int | None = None,
    ) -> Batch:  # fmt: skip
        """Lease up to `batch_size` rows with `fields` ready that `consumer` has not had; waits
        for a full batch, or for `min_rows` rows if given (StoreTimeout after `timeout_s`).
        `ack` acks a previous batch of the same consumer in the same round trip."""
        ...

    async def ack(self, batch: Batch) -> None:
        """Complete the batch: this consumer is done with its rows."""
        ...

    async def release(self, batch: Batch) -> None:
        """Hand the batch back unprocessed; another instance of the consumer gets it."""
        ...

    async def renew(self, batch: Batch, lease_s: float | None = None) -> None:
        """Extend the lease of a batch that takes long to process."""
        ...

    def stream(
        self, partition: str, fields: Sequence[str], batch_size: int, consumer: str, *,
        auto_ack: bool = True, prefetch: int = 2, **get_kwargs: Any,
    ) -> AsyncGenerator[Batch, None]:  # fmt: skip
        """Yield batches until the partition is sealed and drained (`dataplane.stream.stream`)."""
        ...

    async def store_stats(self) -> dict: ...

    async def checkpoint(self, path: str) -> dict:
        """Save the whole store (rows, readiness, consumption) under directory `path`."""
        ...

    async def restore(self, path: str) -> dict:
        """Load a checkpoint into this freshly started store; leased rows become pending again."""
        ...


class SyncStoreClient:
    """Blocking facade over StoreClient, for the driver and synchronous code.

    It runs the async client on a private event loop in a daemon thread; every method is
    the async method of the same name, awaited.
    """

    def __init__(self, address: str):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="store-client", daemon=True)
        self._thread.start()
        self._client: StoreClient = self._run(StoreClient.connect(address))
        self.address = address

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def stats(self) -> ClientStats:
        return self._client.stats

    def create_partition(self, name, schema, **kw) -> dict:
        return self._run(self._client.create_partition(name, schema, **kw))

    def register_consumer(self, partition, consumer) -> None:
        return self._run(self._client.register_consumer(partition, consumer))

    def describe(self, partition) -> dict:
        return self._run(self._client.describe(partition))

    def seal(self, partition) -> None:
        return self._run(self._client.seal(partition))

    def drop_partition(self, partition) -> None:
        return self._run(self._client.drop_partition(partition))

    def put(self, partition, data, rows=None, **kw) -> list[int]:
        return self._run(self._client.put(partition, data, rows, **kw))

    def get(self, partition, fields, batch_size, consumer, **kw) -> Batch:
        return self._run(self._client.get(partition, fields, batch_size, consumer, **kw))

    def ack(self, batch: Batch) -> None:
        return self._run(self._client.ack(batch))

    def release(self, batch: Batch) -> None:
        return self._run(self._client.release(batch))

    def renew(self, batch: Batch, lease_s=None) -> None:
        return self._run(self._client.renew(batch, lease_s))

    def stream(self, partition, fields, batch_size, consumer, **kw) -> Iterator[Batch]:
        agen = self._client.stream(partition, fields, batch_size, consumer, **kw)
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(agen.aclose())

    def store_stats(self) -> dict:
        return self._run(self._client.store_stats())

    def checkpoint(self, path) -> dict:
        return self._run(self._client.checkpoint(path))

    def restore(self, path) -> dict:
        return self._run(self._client.restore(path))

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
