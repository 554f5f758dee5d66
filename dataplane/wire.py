"""Request/response messages over TCP: the data store's own wire (msgpack + raw buffers).

A message is a list of frames (see `dataplane.codec`): a msgpack header and the raw
buffers of any arrays in it. On the socket a message is

    uint32 frame count | uint64 length per frame | the frames, back to back

so arrays are written straight from their memory (`writelines`, no join) and read back
as views into one receive buffer. Many requests share one connection: each carries an
id, and the server runs every request as its own task, so a long-waiting `get` never
holds up an `ack` behind it.

This module knows nothing about partitions or rows; it moves named calls and their
results. Errors raised by a handler travel back by class name and message and are
raised again on the caller's side as the same `asyncflow.errors` class.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import asyncflow.errors as errors_module
from asyncflow.errors import AsyncFlowError, CodecError, DataPlaneError, StorageUnavailable
from dataplane.codec import decode, encode

log = logging.getLogger("asyncflow.dataplane")
_COUNT = struct.Struct("<I")
_MAX_FRAMES = 1 << 20
_STREAM_LIMIT = 1 << 26  # asyncio's read buffer high-water mark; messages stream past it in chunks


async def send_message(writer: asyncio.StreamWriter, value: Any) -> None:
    frames = encode(value)
    lengths = struct.pack(f"<I{len(frames)}Q", len(frames), *(memoryview(f).nbytes for f in frames))
    writer.writelines([lengths, *frames])
    await writer.drain()


async def read_message(reader: asyncio.StreamReader) -> Any:
    (count,) = _COUNT.unpack(await reader.readexactly(_COUNT.size))
    if not 0 < count <= _MAX_FRAMES:
        raise CodecError(
            f"wire message announces {count} frames; expected 1..{_MAX_FRAMES}. Peer is not a store."
        )
    lengths = struct.unpack(f"<{count}Q", await reader.readexactly(8 * count))
    # bytearray: arrays decoded from the message are writable views, not read-only ones
    body = memoryview(bytearray(await reader.readexactly(sum(lengths))))
    frames, offset = [], 0
    for n in lengths:
        frames.append(body[offset : offset + n])
        offset += n
    return decode(frames)


def _error_payload(exc: BaseException) -> list[str]:
    name = type(exc).__name__ if isinstance(exc, AsyncFlowError) else "DataPlaneError"
    text = str(exc) if isinstance(exc, AsyncFlowError) else f"{type(exc).__name__}: {exc}"
    return [name, text]


def _error_from(payload: list[str]) -> AsyncFlowError:
    name, text = payload
    cls = getattr(errors_module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, AsyncFlowError)):
        cls = DataPlaneError
    return cls(text)


Handler = Callable[..., Awaitable[Any]]


class Server:
    """Serves the public async methods of `target` (those listed in `methods`).

    A handler that takes a keyword `peer` receives the id of the connection that called
    it, and `on_disconnect(peer)` (if `target` has it) runs when that connection closes;
    the controller uses this to hand a dead consumer's leases to someone else at once.
    """

    def __init__(self, target: object, methods: tuple[str, ...]):
        self._handlers: dict[str, Handler] = {m: getattr(target, m) for m in methods}
        self._wants_peer = {m for m, h in self._handlers.items() if "peer" in h.__code__.co_varnames}
        self._on_disconnect = getattr(target, "on_disconnect", None)
        self._server: asyncio.Server | None = None
        self._peers = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()

    async def start(self, host: str, port: int = 0) -> str:
        self._server = await asyncio.start_server(self._serve, host, port, limit=_STREAM_LIMIT)
        sock_host, sock_port = self._server.sockets[0].getsockname()[:2]
        return f"{sock_host}:{sock_port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = next(self._peers)
        lock = asyncio.Lock()
        try:
            while True:
                request = await read_message(reader)
                task = asyncio.create_task(self._call(request, peer, writer, lock))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the peer went away
        except CodecError as e:  # the peer spoke garbage: drop it, keep serving everyone else
            log.warning("dropping connection %d: unreadable message (%s)", peer, e)
        except Exception:
            log.exception("connection %d failed", peer)
            raise
        finally:
            writer.close()
            if self._on_disconnect is not None:
                await self._on_disconnect(peer)

    async def _call(self, request: dict, peer: int, writer: asyncio.StreamWriter, lock: asyncio.Lock) -> None:
        rid, method = request["i"], request["m"]
        try:
            handler = self._handlers.get(method)
            if handler is None:
                raise DataPlaneError(
                    f"unknown store method {method!r}; this server offers {sorted(self._handlers)}"
                )
            kwargs = request["a"]
            if method in self._wants_peer:
                kwargs["peer"] = peer
            reply = {"i": rid, "r": await handler(**kwargs)}
        except Exception as exc:  # every failure goes back to the caller, typed
            reply = {"i": rid, "e": _error_payload(exc)}
        async with lock:  # one message at a time on the socket
            with contextlib.suppress(ConnectionError):
                await send_message(writer, reply)


class Connection:
    """One client connection to a `Server`; concurrent calls are multiplexed by id."""

    def __init__(self, address: str, connect_timeout_s: float = 10.0):
        self.address = address
        self._connect_timeout_s = connect_timeout_s
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()  # one message at a time on the socket; also one connect at a time

    async def _connect(self) -> asyncio.StreamWriter:
        host, _, port = self.address.rpartition(":")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, int(port), limit=_STREAM_LIMIT), self._connect_timeout_s
            )
        except (OSError, TimeoutError) as e:
            raise StorageUnavailable(
                f"cannot reach the data store at {self.address} ({e}); is the store still running? "
                "Check that the Ray job that started it is alive and that this host can reach that address."
            ) from None
        self._writer = writer
        self._reader_task = asyncio.create_task(self._read_loop(reader))
        return writer

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                reply = await read_message(reader)
                future = self._pending.pop(reply["i"], None)
                if future is None or future.done():
                    continue
                if "e" in reply:
                    future.set_exception(_error_from(reply["e"]))
                else:
                    future.set_result(reply["r"])
        except (asyncio.IncompleteReadError, ConnectionError, CodecError) as e:
            self._fail_all(f"connection to the data store at {self.address} closed ({type(e).__name__})")

    def _fail_all(self, why: str) -> None:
        self._writer = None
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(StorageUnavailable(f"{why}; the request may not have completed."))

    async def call(self, method: str, **kwargs: Any) -> Any:
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            async with self._lock:  # concurrent first calls must share one connection, not race to open two
                writer = self._writer or await self._connect()
                await send_message(writer, {"i": rid, "m": method, "a": kwargs})
        except StorageUnavailable:
            self._pending.pop(rid, None)
            raise
        except (ConnectionError, RuntimeError) as e:
            self._pending.pop(rid, None)
            self._writer = None
            raise StorageUnavailable(
                f"lost the data store at {self.address} while sending {method}: {e}"
            ) from None
        return await future

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
            self._reader_task = None


class Stub:
    """Calls a remote service's methods as if local: `await stub.read(partition=..., rows=...)`."""

    def __init__(self, address: str):
        self.connection = Connection(address)

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)

        async def call(**kwargs: Any) -> Any:
            return await self.connection.call(method, **kwargs)

        return call

    async def close(self) -> None:
        await self.connection.close()
