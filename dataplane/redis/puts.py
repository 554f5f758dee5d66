"""The Redis backend's puts: a put's cells of each field as one value, then one atomic script.

Functions over a `RedisStoreClient` (as `snapshot` is): the client's `put` calls `put`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgpack

from dataplane.batch import Batch
from dataplane.columns import check_put
from dataplane.errors import DataPlaneError, StoreTimeout
from dataplane.redis.cells import encode_run

if TYPE_CHECKING:
    from dataplane.redis.client import RedisStoreClient

MAX_VALUE_BYTES = 512 * 2**20  # Redis' largest string value (proto-max-bulk-len's default)


async def put(
    self: RedisStoreClient, partition: str, data: Mapping[str, Any], rows: Batch | Sequence[int] | None,
    group_size: int, version: int | None, lengths: Sequence[int] | None, timeout_s: float | None,
) -> list[int]:  # fmt: skip
    """Check the put, encode each field's cells as one value, and run PUT_NEW (new rows, waiting
    while the partition is full) or PUT_FILL (more fields of existing rows)."""
    schema = await self._schema(partition)
    index = None if rows is None else [int(r) for r in (rows.rows if isinstance(rows, Batch) else rows)]
    n, columns = check_put(partition, schema, data, index)
    if lengths is None:
        lengths = [max((c.lengths[i] for c in columns.values()), default=0) for i in range(n)]
    nbytes = [sum(c.nbytes[i] for c in columns.values()) for i in range(n)]
    _, bits = self._mask(partition, list(columns))
    runs = [(b, *encode_run(schema[f], c, n)) for b, (f, c) in zip(bits, columns.items())]
    for f, (_, blob, _) in zip(columns, runs):
        if len(blob) > MAX_VALUE_BYTES:
            raise DataPlaneError(
                f"put of {n} rows to {partition!r}: field {f!r} holds {len(blob) / 2**20:.0f} MiB, "
                f"over the {MAX_VALUE_BYTES // 2**20} MiB that Redis stores in one value (a put's "
                "cells of a field are one value); put fewer rows at a time"
            )
    cells = [(b, blob) for b, blob, _ in runs]
    sizes = msgpack.packb([[int(x) for x in lengths], nbytes])  # the rows' lengths and byte counts
    tail = [len(bits), *bits, msgpack.packb([lengths for *_, lengths in runs]), sizes]
    ver = "" if version is None else int(version)
    if index is not None and not index:
        return []
    if index is not None:
        reply = await self._call(transaction, self, partition, cells, "PUT_FILL", "-", n, ver, *tail, *index)
        if reply[0] == b"err":
            raise self._error(partition, reply)
    else:
        index = await put_new(self, partition, n, group_size, ver, cells, tail, timeout_s)
    self.stats.puts += 1
    self.stats.rows_put += n
    self.stats.bytes_put += sum(nbytes)
    return index


async def transaction(
    self: RedisStoreClient, partition: str, cells: list[tuple[int, Any]], script: str, *args: Any
) -> list:
    """One transaction: each field's cells, back to back, into a fresh chunk's key (expiring),
    then the put's script, which accepts the chunk (rows refer to spans of it, its keys
    persist) or deletes it. A fresh chunk per attempt: a retry after a lost reply must not
    touch the chunk the first one stored."""
    key, chunk = self._key(partition), uuid.uuid4().hex[:12]
    async with self._r.pipeline(transaction=True) as pipe:
        for b, blob in cells:
            pipe.set(f"{key}:x:{chunk}:{b}", blob, px=600_000)
        pipe.evalsha(self._scripts[script].sha, 0, key, *args[:1], chunk, *args[1:])
        results = await pipe.execute(raise_on_error=False)
    reply = results[-1]
    if isinstance(reply, Exception):
        import redis.exceptions

        if cells:  # the script did not run: nothing will accept or delete this chunk
            await self._r.delete(*(f"{key}:x:{chunk}:{b}" for b, _ in cells))
        if not isinstance(reply, redis.exceptions.NoScriptError):
            raise reply
        await self._r.script_load(self._scripts[script].script)  # new to this server (or restarted)
        return await transaction(self, partition, cells, script, *args)
    return reply


async def put_new(
    self: RedisStoreClient, partition: str, n: int, group_size: int, version: Any, cells: list, args: list,
    timeout_s: float | None,
) -> list[int]:  # fmt: skip
    if n < 1 or group_size < 1 or n % group_size:
        raise DataPlaneError(
            f"put of {n} rows with group_size {group_size}: the row count must be a positive "
            "multiple of group_size (rows of a group are put together)"
        )
    put_id, first = uuid.uuid4().hex, 1
    timeout_s = timeout_s or self.config.put_timeout_s
    deadline = time.monotonic() + timeout_s
    while True:
        reply = await self._call(
            transaction, self, partition, cells, "PUT_NEW", put_id, n, group_size, version, first, *args
        )
        if reply[0] == b"ok":
            return list(range(int(reply[1]), int(reply[1]) + n))
        if reply[0] == b"err" and reply[1] == b"neverfits":
            raise DataPlaneError(
                f"put of {n} rows can never fit partition {partition!r} (capacity {int(reply[2])}); "
                "put in smaller chunks or create the partition with a larger capacity"
            )
        if reply[0] == b"err":
            raise self._error(partition, reply)
        first = 0
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StoreTimeout(
                f"put of {n} rows to {partition!r}: the partition stayed full ({int(reply[1])}/"
                f"{int(reply[2])} rows) for {timeout_s:.1f} s; consumers are not acking rows. Check that "
                "every registered consumer runs, or raise the capacity or put_timeout_s"
            )
        await self._block(partition, "space", reply[3], remaining)
