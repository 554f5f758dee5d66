"""The wire: typed errors, multiplexed calls, large zero-copy messages, cancellation, bad peers."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from asyncflow.errors import LeaseError, StorageUnavailable
from dataplane.wire import Server, Stub


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
    server = Server(service, Service.RPC_METHODS)
    address = await server.start("127.0.0.1")
    stub = Stub(address)
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
    other = Stub(address)
    try:
        assert await stub.whoami() != await other.whoami()
    finally:
        await other.close()


async def test_garbage_drops_only_that_connection(served):
    _, stub, address = served
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"\xff\xff\xff\xff garbage")
    await writer.drain()
    assert await reader.read() == b""  # the server hung up on it
    writer.close()
    assert await stub.echo(value="still serving") == "still serving"


async def test_unreachable_address_names_it_and_the_fix():
    with pytest.raises(StorageUnavailable, match=r"127\.0\.0\.1:1 .*is the store still running"):
        await Stub("127.0.0.1:1").echo(value=1)
