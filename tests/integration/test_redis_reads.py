"""The cell reader (`dataplane.storage.redis_reads`) against a real Redis: reply bytes exact
whatever their size and content, Redis' answers for a missing key and a wrong type, and a
connection the server closed replaced by a fresh one."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from dataplane.storage.redis_reads import CellReads

pytestmark = pytest.mark.integration


@pytest.fixture
async def server():
    r = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    prefix = f"reads-test:{uuid.uuid4().hex[:8]}"
    yield r, prefix
    keys = [k async for k in r.scan_iter(f"{prefix}:*")]
    if keys:
        await r.delete(*keys)
    await r.aclose()


async def test_replies_of_any_size_and_content_arrive_exact_and_writable(server):
    r, prefix = server
    rng = np.random.default_rng(0)
    # sizes around the header buffer, replies made of CRLFs and '$', and one far larger than a socket read
    sizes = [1, 2, 3, 4093, 4094, 4095, 4096, 4097, 10_000, 3_000_000, 7]
    values = [rng.integers(0, 256, n, np.uint8).tobytes() for n in sizes]
    values[2] = b"\r\n$"
    values[6] = (b"$5\r\n\r\n" * 1000)[:4096]
    for i, v in enumerate(values):
        await r.set(f"{prefix}:{i}", v)
    reads = CellReads(r.connection_pool)
    try:
        for _ in range(2):  # the second time on the same connection: nothing left over from the first
            got = await reads.getranges([(f"{prefix}:{i}", 0, len(v)) for i, v in enumerate(values)])
            assert [bytes(g) for g in got] == values
        middle = await reads.getranges([(f"{prefix}:9", 1000, 2_000_000)])
        assert bytes(middle[0]) == values[9][1000:2_000_000]
        array = np.frombuffer(middle[0], np.uint8)
        array[0] ^= 1  # the reply is a fresh buffer of the caller's, not a read-only bytes
    finally:
        reads.close()


async def test_a_missing_key_reads_empty_and_a_wrong_type_raises_on_a_usable_connection(server):
    r, prefix = server
    await r.set(f"{prefix}:s", b"abc")
    await r.hset(f"{prefix}:h", "f", "v")
    reads = CellReads(r.connection_pool)
    try:
        got = await reads.getranges([(f"{prefix}:gone", 0, 10), (f"{prefix}:s", 0, 3)])
        assert [bytes(g) for g in got] == [b"", b"abc"]
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            await reads.getranges([(f"{prefix}:s", 0, 3), (f"{prefix}:h", 0, 3), (f"{prefix}:s", 1, 3)])
        assert [bytes(g) for g in await reads.getranges([(f"{prefix}:s", 1, 3)])] == [b"bc"]
    finally:
        reads.close()


async def test_a_connection_the_server_closed_is_replaced(server):
    r, prefix = server
    await r.set(f"{prefix}:s", b"abc")
    reads = CellReads(r.connection_pool)
    try:
        assert bytes((await reads.getranges([(f"{prefix}:s", 0, 3)]))[0]) == b"abc"
        (conn,) = reads._idle
        host, port = conn.transport.get_extra_info("sockname")[:2]
        assert await r.client_kill(f"{host}:{port}")
        for _ in range(200):  # until the close reaches this event loop
            if conn.lost:
                break
            await asyncio.sleep(0.01)
        assert conn.lost
        assert bytes((await reads.getranges([(f"{prefix}:s", 0, 3)]))[0]) == b"abc"
    finally:
        reads.close()
