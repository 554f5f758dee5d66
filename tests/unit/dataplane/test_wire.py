"""The wire: typed errors, multiplexed calls, large zero-copy messages, cancellation, bad peers,
the token handshake and the message limit."""

from __future__ import annotations

import asyncio
import struct

import numpy as np
import pytest

from asyncflow.errors import AccessDenied, LeaseError, StorageUnavailable
from dataplane.memory import auth
from dataplane.memory.wire import Server, Stub

TOKEN = auth.new_token()
LIMIT = 64 << 20


class Service:
    RPC_METHODS = ("echo", "wait", "fail", "whoami")

    def __init__(self):
        self.cancelled = 0
        self.event = asyncio.Event()

    async def echo(self, value):
        return value

    async def wait(self):
        try:
            await self.event.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return "woke"

    async def fail(self):
        raise LeaseError("not yours")

    async def whoami(self, peer: int = 0):
        return peer


@pytest.fixture
async def served():
    service = Service()
    server = Server(service, Service.RPC_METHODS, TOKEN, LIMIT)
    address = await server.start("127.0.0.1")
    stub = Stub(address, TOKEN)
    yield service, stub, address
    await stub.close()
    await server.close()


async def test_errors_come_back_as_the_same_class(served):
    _, stub, _ = served
    with pytest.raises(LeaseError, match="not yours"):
        await stub.fail()


async def test_a_waiting_call_does_not_block_others_on_the_connection(served):
    service, stub, _ = served
    waiting = asyncio.create_task(stub.wait())
    assert await stub.echo(value=5) == 5
    service.event.set()
    assert await waiting == "woke"


async def test_large_arrays_arrive_whole_writable_and_zero_copy_from_the_message(served):
    _, stub, _ = served
    block = np.arange(4 << 20, dtype=np.int64).reshape(1024, -1)  # 32 MiB
    got = await stub.echo(value={"block": block, "ragged": [np.ones(3), np.zeros(0)]})
    np.testing.assert_array_equal(got["block"], block)
    assert got["block"].flags.writeable
    assert [a.tolist() for a in got["ragged"]] == [[1.0, 1.0, 1.0], []]


async def test_back_to_back_large_messages_reuse_prefaulted_buffers(served):
    _, stub, _ = served
    blocks = [np.full((64, 1024), k, dtype=np.int64) for k in range(6)]  # 512 KiB each
    got = [await stub.echo(value=b) for b in blocks]
    for k, g in enumerate(got):  # each reply has its own memory: no buffer was handed out twice
        assert (g == k).all()
    assert not any(np.shares_memory(a, b) for i, a in enumerate(got) for b in got[i + 1 :])


async def test_cancelling_a_call_cancels_it_on_the_server(served):
    service, stub, _ = served
    task = asyncio.create_task(stub.wait())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(50):
        if service.cancelled:
            break
        await asyncio.sleep(0.01)
    assert service.cancelled == 1


async def test_each_connection_is_its_own_peer(served):
    _, stub, address = served
    other = Stub(address, TOKEN)
    try:
        assert await stub.whoami() != await other.whoami()
    finally:
        await other.close()


async def test_garbage_drops_only_that_connection(served):
    _, stub, address = served
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    await reader.read(256)  # the server's challenge
    writer.write(b"\xff\xff\xff\xff garbage")
    await writer.drain()
    assert await reader.read() == b""  # the server hung up on it
    writer.close()
    assert await stub.echo(value="still serving") == "still serving"


async def test_unreachable_address_names_it_and_the_fix():
    with pytest.raises(StorageUnavailable, match=r"127\.0\.0\.1:1 .*is the store still running"):
        await Stub("127.0.0.1:1", TOKEN).echo(value=1)


async def test_a_client_without_the_token_gets_nothing_and_changes_nothing(served):
    service, stub, address = served
    intruder = Stub(address, auth.new_token())
    with pytest.raises(AccessDenied, match="token"):
        await intruder.echo(value=1)
    with pytest.raises(AccessDenied):
        await intruder.whoami()
    await intruder.close()
    assert await stub.echo(value="still serving") == "still serving"


async def test_a_raw_request_before_the_handshake_is_never_served(served):
    service, stub, address = served
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    hello = await reader.read(256)
    assert b"hello" in hello
    from dataplane.codec import encode

    frames = encode({"i": 1, "m": "wait", "a": {}})  # skip the answer, ask for a call
    writer.write(struct.pack(f"<I{len(frames)}Q", len(frames), *(len(f) for f in frames)))
    for f in frames:
        writer.write(bytes(f))
    await writer.drain()
    assert b"refused" in await reader.read()  # refused, then closed
    writer.close()
    await asyncio.sleep(0.05)
    assert service.cancelled == 0 and not service.event.is_set()


async def test_a_client_refuses_a_listener_that_is_not_its_store(served):
    _, _, address = served
    impostor = Server(Service(), Service.RPC_METHODS, auth.new_token(), LIMIT)
    try:
        where = await impostor.start("127.0.0.1")
        with pytest.raises(AccessDenied, match="did not prove"):
            await Stub(where, TOKEN).echo(value="secret rows")
    finally:
        await impostor.close()


@pytest.mark.parametrize("announced", [1 << 30, 16 << 30, 1 << 62])
async def test_an_announced_huge_message_is_refused_before_memory_is_taken(served, announced):
    """Before the handshake only a tiny message is accepted, after it no more than the limit; either
    way the server hangs up without allocating what the peer announced."""
    _, stub, address = served
    host, port = address.rsplit(":", 1)
    for authenticated in (False, True):
        reader, writer = await asyncio.open_connection(host, int(port))
        if authenticated:  # a holder of the token, misbehaving
            writer.close()
            peer = Stub(address, TOKEN)
            await peer.echo(value=0)
            proto = peer.connection._proto
            proto.transport.write(struct.pack("<IQ", 1, announced) + b"x" * 70_000)
            with pytest.raises(StorageUnavailable):
                await peer.echo(value=1)  # the server closed the connection
            continue
        await reader.read(256)
        writer.write(struct.pack("<IQ", 1, announced) + b"x" * 70_000)
        assert await hung_up(reader, writer)
    assert await stub.echo(value="still serving") == "still serving"


async def test_a_header_announcing_many_frames_is_refused_at_once(served):
    _, stub, address = served
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    await reader.read(256)
    writer.write(struct.pack("<I", 1 << 20) + bytes(8 << 10))
    assert await hung_up(reader, writer)
    assert await stub.echo(value="still serving") == "still serving"


async def hung_up(reader, writer) -> bool:
    """True once the server has closed the connection (cleanly, or by reset: it stopped reading)."""
    try:
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        rest = b""
    writer.close()
    return rest == b""
