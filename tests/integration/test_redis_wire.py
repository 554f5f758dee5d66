"""The Redis wire (`dataplane.redis.wire`) against a real Redis: cell replies exact
whatever their size and content, Redis' answers for a missing key and a wrong type, command
replies as redis-py gives them, and a connection the server closed replaced by a fresh one."""

from __future__ import annotations

import asyncio
import socket
import uuid

import numpy as np
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from dataplane.redis.wire import Wire, _Commands, _Replies

pytestmark = pytest.mark.integration


@pytest.fixture
async def server(redis_url):
    r = aioredis.Redis.from_url(redis_url)
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
    reads = Wire(r.connection_pool, 4)
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
    reads = Wire(r.connection_pool, 4)
    try:
        got = await reads.getranges([(f"{prefix}:gone", 0, 10), (f"{prefix}:s", 0, 3)])
        assert [bytes(g) for g in got] == [b"", b"abc"]
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            await reads.getranges([(f"{prefix}:s", 0, 3), (f"{prefix}:h", 0, 3), (f"{prefix}:s", 1, 3)])
        assert [bytes(g) for g in await reads.getranges([(f"{prefix}:s", 1, 3)])] == [b"bc"]
    finally:
        reads.close()


async def test_command_replies_are_those_redis_py_gives_and_errors_raise(server):
    r, prefix = server
    script = "return {'ok', 7, ARGV[1], {ARGV[2], -1}, '', redis.call('GET', KEYS[1])}"
    args = ["é\r\n", b"\x00\xff" * 3000]
    wire = Wire(r.connection_pool, 4)
    try:
        await r.set(f"{prefix}:k", b"v")
        expected = await r.eval(script, 1, f"{prefix}:k", *args)
        assert await wire.command("EVAL", script, 1, f"{prefix}:k", *args) == expected
        with pytest.raises(redis.exceptions.ResponseError, match="wrong number of arguments"):
            await wire.command("HSET", f"{prefix}:h")
        assert await wire.command("INCRBY", f"{prefix}:n", 5) == 5  # the same connection, in step
        assert len(wire._idle[_Commands]) == 1
        with pytest.raises(TypeError, match="not list"):
            await wire.command("SET", f"{prefix}:k", [1])
    finally:
        wire.close()


async def test_a_connection_the_server_closed_is_replaced(server):
    r, prefix = server
    await r.set(f"{prefix}:s", b"abc")
    reads = Wire(r.connection_pool, 4)
    try:
        assert bytes((await reads.getranges([(f"{prefix}:s", 0, 3)]))[0]) == b"abc"
        assert await reads.command("GET", f"{prefix}:s") == b"abc"
        conns = [reads._idle[_Replies][0], reads._idle[_Commands][0]]
        for conn in conns:
            host, port = conn.transport.get_extra_info("sockname")[:2]
            assert await r.client_kill(f"{host}:{port}")
        for _ in range(200):  # until the close reaches this event loop
            if all(conn.lost for conn in conns):
                break
            await asyncio.sleep(0.01)
        assert all(conn.lost for conn in conns)
        assert bytes((await reads.getranges([(f"{prefix}:s", 0, 3)]))[0]) == b"abc"
        assert await reads.command("GET", f"{prefix}:s") == b"abc"
        assert not set(conns) & {*reads._idle[_Replies], *reads._idle[_Commands]}
    finally:
        reads.close()


async def stored_random(r, key: str, size: int) -> bytes:
    value = np.random.default_rng(size).integers(0, 256, size, np.uint8).tobytes()
    await r.set(key, value)
    return value


async def test_concurrent_calls_open_at_most_the_limit_of_connections(server):
    r, prefix = server
    value = await stored_random(r, f"{prefix}:big", 2_000_000)
    wire = Wire(r.connection_pool, 2)
    try:
        reads = [wire.getranges([(f"{prefix}:big", i, len(value))]) for i in range(6)]
        commands = [wire.command("STRLEN", f"{prefix}:big") for _ in range(6)]
        got = await asyncio.gather(*reads, *commands)
        assert [bytes(g[0]) for g in got[:6]] == [value[i:] for i in range(6)]
        assert got[6:] == [len(value)] * 6
        assert len(wire._idle[_Replies]) == 2 and len(wire._idle[_Commands]) == 2
    finally:
        wire.close()


@pytest.mark.parametrize("step", [1, 3, 7, 4096])
async def test_replies_split_anywhere_by_the_network_are_read_whole(step):
    """Every kind of reply a GETRANGE read can meet (a value, a null, an error, an empty value, a
    value made of CRLFs), arriving `step` bytes at a time over a real socket."""
    ours, theirs = socket.socketpair()
    _, writer = await asyncio.open_connection(sock=ours)
    replies = _Replies(writer)
    writer.transport.set_protocol(replies)
    stream = b"$3\r\nabc\r\n$-1\r\n-ERR no\r\n$0\r\n\r\n$5\r\n\r\n\r\n\r\r\n"
    try:
        call = asyncio.ensure_future(replies.call(b"(the request)", 5))
        for i in range(0, len(stream), step):
            theirs.sendall(stream[i : i + step])
            await asyncio.sleep(0.002)  # a read of its own for each piece
        got = await asyncio.wait_for(call, 5)
        assert [bytes(g) if isinstance(g, np.ndarray) else type(g) for g in got] == [
            b"abc",
            b"",
            redis.exceptions.ResponseError,
            b"",
            b"\r\n\r\n\r",
        ]
        assert theirs.recv(100) == b"(the request)"
        assert replies.n == 0 and not replies.crlf  # nothing left over for the next call
    finally:
        writer.transport.close()
        theirs.close()


async def test_a_call_out_when_the_wire_closes_completes_and_closes_its_connection(server):
    r, prefix = server
    value = await stored_random(r, f"{prefix}:big", 3_000_000)
    wire = Wire(r.connection_pool, 2)
    read = asyncio.ensure_future(wire.getranges([(f"{prefix}:big", 0, len(value))]))
    await asyncio.sleep(0)  # the read is out
    wire.close()
    assert bytes((await read)[0]) == value
    assert wire._idle[_Replies] == []  # not kept for a later call
