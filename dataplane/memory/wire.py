"""Request/response messages over TCP: the data store's own wire (msgpack + raw buffers).

A message is a list of frames (see `dataplane.codec`): a msgpack header and the raw
buffers of any arrays in it. On the socket a message is

    uint32 frame count | uint64 length per frame | the frames, back to back

Frames are written one by one straight from their memory (no join), and a large message
is received by the kernel directly into a buffer of its own (`asyncio.BufferedProtocol`),
so arrays decode as writable views of it: one copy from socket to array, no more. Many
requests share one connection: each carries an id, and the server runs each request as
its own task, so a long-waiting `get` never holds up an `ack` behind it.

Nothing is read from a connection before it has passed the handshake of `dataplane.memory.auth`
(a challenge both ways on the store's token), and no message may be larger than the
server's limit, so a peer without the token gets nothing, changes nothing and cannot make
the server allocate memory it did not send.

This module knows nothing about partitions or rows; it moves named calls and their
results. Errors raised by a handler travel back by class name and message and are
raised again on the caller's side as the same `dataplane.errors` class.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

import dataplane.errors as errors_module
from dataplane.codec import decode, encode
from dataplane.errors import AccessDenied, AsyncFlowError, CodecError, DataPlaneError, StorageUnavailable
from dataplane.memory import auth
from dataplane.memory.buffers import BufferPool

log = logging.getLogger("asyncflow.dataplane")
_COUNT = struct.Struct("<I")
_MAX_FRAMES = 1 << 16  # a message has one frame per array it carries
_HANDSHAKE_BYTES = 1024  # the largest message before the handshake is done
_SCRATCH = 1 << 16  # small messages are parsed from here; larger bodies get a buffer of their own
_SOCKET_BUFFER = 4 << 20  # let the kernel take a whole put or read at once


_buffers = BufferPool()


class _Messages(asyncio.BufferedProtocol):
    """Frames messages on a stream socket; calls `on_message(value)` for each one received."""

    def __init__(
        self,
        on_message: Callable[[Any], None],
        on_lost: Callable[[Exception | None], None],
        on_open: Callable[[_Messages], None] | None = None,
    ):
        self._on_message, self._on_lost, self._on_open = on_message, on_lost, on_open
        self.max_bytes = _HANDSHAKE_BYTES  # raised once the handshake is done
        self._scratch = bytearray(_SCRATCH)
        self._start = self._end = 0  # unparsed bytes are scratch[start:end]
        self._body: np.ndarray | None = None  # a large body being received in place
        self._filled = 0
        self._lengths: tuple[int, ...] = ()
        self.transport: asyncio.Transport | None = None
        self._paused: asyncio.Future | None = None

    # ---- receiving

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        if self._on_open is not None:
            self._on_open(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._body is not None:
            return self._body[self._filled :].data
        if self._end == len(self._scratch):  # move the unparsed tail to the front (or grow for a big header)
            tail = self._scratch[self._start : self._end]
            if len(tail) == len(self._scratch):
                self._scratch.extend(bytes(len(self._scratch)))
            self._scratch[: len(tail)] = tail
            self._start, self._end = 0, len(tail)
        return memoryview(self._scratch)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._body is not None:
                self._filled += nbytes
                if self._filled == len(self._body):
                    body, self._body = self._body, None
                    self._deliver(body.data)
                    _buffers.after_delivery()
                return
            self._end += nbytes
            self._parse()
        except CodecError as e:  # garbage on the wire: drop this connection, keep serving the rest
            log.warning("closing connection: unreadable message (%s)", e)
            self.abort()

    def abort(self) -> None:
        """Close now, dropping what was received and not yet delivered (its buffer goes with it)."""
        self._body = None
        self._start = self._end = 0
        if self.transport is not None:
            self.transport.close()

    def _parse(self) -> None:
        while True:
            avail = self._end - self._start
            if avail < 4:
                return
            (count,) = _COUNT.unpack_from(self._scratch, self._start)
            head = 4 + 8 * count
            if not 0 < count <= _MAX_FRAMES or head > self.max_bytes:
                raise CodecError(f"message announces {count} frames; expected 1..{_MAX_FRAMES}")
            if avail < head:
                return
            self._lengths = struct.unpack_from(f"<{count}Q", self._scratch, self._start + 4)
            total = sum(self._lengths)
            if total > self.max_bytes:
                raise CodecError(
                    f"message of {total} bytes is over this connection's limit of {self.max_bytes}"
                )
            body_at = self._start + head
            have = min(avail - head, total)
            if have == total and total <= _SCRATCH:  # small and complete: copy it out of the scratch
                self._start = body_at + total
                self._deliver(memoryview(bytearray(self._scratch[body_at : body_at + total])))
                continue
            # Large or partial: the rest goes straight into a buffer of its own.
            body = _buffers.take(total)
            body[:have] = np.frombuffer(self._scratch, np.uint8, have, body_at)
            self._start = self._end = 0
            if have == total:
                self._deliver(body.data)
                _buffers.after_delivery()
                continue
            self._body, self._filled = body, have
            return

    def _deliver(self, body: memoryview) -> None:
        frames, offset = [], 0
        for n in self._lengths:
            frames.append(body[offset : offset + n])
            offset += n
        self._on_message(decode(frames))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._paused is not None and not self._paused.done():
            self._paused.set_exception(ConnectionResetError("connection lost"))
        self._on_lost(exc)

    # ---- sending

    def pause_writing(self) -> None:
        self._paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)
        self._paused = None

    async def send(self, value: Any) -> None:
        """Write one message; waits only when the peer reads slower than we write."""
        self.write(value)
        if self._paused is not None:
            await self._paused

    def write(self, value: Any) -> None:
        """Hand one message to the transport (it buffers what the socket does not take at once)."""
        frames = encode(value)
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        self.transport.write(
            struct.pack(f"<I{len(frames)}Q", len(frames), *(memoryview(f).nbytes for f in frames))
        )
        for frame in frames:  # each frame from its own memory: no joined copy of the message
            self.transport.write(frame)


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


class Server:
    """Serves the public async methods of `target` (those listed in `methods`) to holders of `token`.

    A handler that takes a keyword `peer` receives the id of the connection that called
    it, and `on_disconnect(peer)` (if `target` has it) runs when that connection closes;
    the controller uses this to hand a dead consumer's leases to someone else at once.
    """

    def __init__(self, target: object, methods: tuple[str, ...], token: str, max_message_bytes: int):
        self._handlers = {m: getattr(target, m) for m in methods}
        self._wants_peer = {m for m, h in self._handlers.items() if "peer" in h.__code__.co_varnames}
        self._on_disconnect = getattr(target, "on_disconnect", None)
        self._token, self._max_message_bytes = token, max_message_bytes
        self._server: asyncio.Server | None = None
        self._peers = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._running: dict[tuple[int, Any], asyncio.Task] = {}  # (peer, request id) -> its task

    async def start(self, host: str, port: int = 0) -> str:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host, port)
        sock_host, sock_port = self._server.sockets[0].getsockname()[:2]
        return f"[{sock_host}]:{sock_port}" if ":" in sock_host else f"{sock_host}:{sock_port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in [*self._tasks, *self._running.values()]:
                task.cancel()

    def _protocol(self) -> _Messages:
        peer = next(self._peers)
        challenge = auth.nonce()
        authenticated = False
        proto: _Messages

        def on_open(opened: _Messages) -> None:
            opened.write({"hello": challenge})

        def on_message(request: Any) -> None:
            nonlocal authenticated
            if not authenticated:
                authenticated = self._admit(proto, challenge, request)
                return
            if not isinstance(request, dict):
                proto.abort()
            elif "c" in request:  # the caller gave up on a request: stop it if it is still running
                task = self._running.get((peer, request["c"]))
                if task is not None:
                    task.cancel()
            else:
                key = (peer, request.get("i"))
                task = asyncio.ensure_future(self._call(request, peer, proto))
                self._running[key] = task
                task.add_done_callback(lambda _: self._running.pop(key, None))

        def on_lost(exc: Exception | None) -> None:
            if authenticated and self._on_disconnect is not None:
                task = asyncio.ensure_future(self._on_disconnect(peer))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        proto = _Messages(on_message, on_lost, on_open)
        return proto

    def _admit(self, proto: _Messages, challenge: bytes, message: Any) -> bool:
        """Check a client's answer to the challenge; prove ourselves to it, or refuse and close."""
        answer = message.get("auth") if isinstance(message, dict) else None
        theirs = message.get("nonce") if isinstance(message, dict) else None
        if not auth.verify(self._token, "client", challenge, answer) or not isinstance(theirs, bytes):
            log.warning("refused a connection: it did not prove it holds this store's token")
            with contextlib.suppress(ConnectionError):
                proto.write({"refused": "this client does not hold the store's token"})
            if proto.transport is not None:
                proto.transport.close()  # after the refusal is written
            return False
        proto.max_bytes = self._max_message_bytes
        proto.write(
            {
                "welcome": auth.proof(self._token, "server", theirs),
                "max_message_bytes": self._max_message_bytes,
            }
        )
        return True

    async def _call(self, request: dict, peer: int, proto: _Messages) -> None:
        rid, method = request.get("i"), request.get("m")
        try:
            handler = self._handlers.get(method) if isinstance(method, str) else None
            if handler is None:
                raise DataPlaneError(
                    f"unknown store method {method!r}; this server offers {sorted(self._handlers)}"
                )
            kwargs = request.get("a")
            if not isinstance(kwargs, dict):
                raise DataPlaneError(f"call of {method!r} without its arguments")
            if method in self._wants_peer:
                kwargs["peer"] = peer
            reply = {"i": rid, "r": await handler(**kwargs)}
        except asyncio.CancelledError:  # cancelled by its caller: say so, so that it can forget the call
            reply = {"i": rid, "x": 1}
        except Exception as exc:  # every failure goes back to the caller, typed
            reply = {"i": rid, "e": _error_payload(exc)}
        try:
            await proto.send(reply)
        except ConnectionError:
            pass  # the caller is gone; if it held leases, on_disconnect hands them on


class Connection:
    """One client connection to a `Server`; concurrent calls are multiplexed by id.

    `address` is `host:port`; `token` the store's (see `dataplane.memory.auth`).
    """

    def __init__(self, address: str, token: str, connect_timeout_s: float = 10.0):
        self.address, self._token = address, token
        self._connect_timeout_s = connect_timeout_s
        self._proto: _Messages | None = None
        self.max_message_bytes = 0  # the server's limit on one message, known once connected
        self._pending: dict[int, asyncio.Future] = {}
        # Calls the caller gave up on, until the server's last word on them: (method, arguments).
        self._abandoned: dict[int, tuple[str, dict]] = {}
        # Called with (method, arguments, result) when such a call had completed after all (the
        # server finished it before the cancel arrived), so that its effect can be undone.
        self.on_late_result: Callable[[str, dict, Any], Awaitable[None]] | None = None
        self._late: set[asyncio.Task] = set()
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()  # one connect at a time: concurrent first calls share it

    async def _connect(self) -> _Messages:
        host, _, port = self.address.rpartition(":")
        loop = asyncio.get_running_loop()
        greetings: asyncio.Queue = asyncio.Queue()  # this connection's handshake messages; None: closed
        proto: _Messages | None = None

        def on_message(message: Any) -> None:
            if isinstance(message, dict) and "i" in message:
                self._on_reply(message)
            else:
                greetings.put_nowait(message)

        def on_lost(exc: Exception | None) -> None:
            greetings.put_nowait(None)
            if proto is not None and self._proto is proto:
                self._on_lost(exc)

        async def greeting() -> dict:
            message = await asyncio.wait_for(greetings.get(), self._connect_timeout_s)
            if not isinstance(message, dict):
                raise ConnectionResetError("closed during the handshake")
            return message

        try:
            _, opened = await asyncio.wait_for(
                loop.create_connection(lambda: _Messages(on_message, on_lost), host.strip("[]"), int(port)),
                self._connect_timeout_s,
            )
            proto = opened
            hello = await greeting()
            mine = auth.nonce()
            proto.write({"auth": auth.proof(self._token, "client", hello["hello"]), "nonce": mine})
            verdict = await greeting()
        except (OSError, TimeoutError, KeyError, TypeError) as e:
            if proto is not None:
                proto.abort()
            raise StorageUnavailable(
                f"cannot reach the data store at {self.address} ({type(e).__name__}: {e}); is the store "
                "still running? Check that the Ray job that started it is alive and that this host can "
                "reach that address (a store listens on loopback unless dataplane.listen is 'node')."
            ) from None
        assert proto is not None
        if "refused" in verdict or not auth.verify(self._token, "server", mine, verdict.get("welcome")):
            proto.abort()
            raise AccessDenied(
                f"the data store at {self.address} refused this client, or did not prove it is the store: "
                "the token in the address does not match. Use the address the running store gives "
                "(StoreHandle.address, dataplane.store_address(name)) or dataplane.connect(name)."
            )
        proto.max_bytes = 1 << 62  # the server proved it holds the token: its replies are trusted
        self.max_message_bytes = int(verdict["max_message_bytes"])
        self._proto = proto
        return proto

    def _on_reply(self, reply: dict) -> None:
        abandoned = self._abandoned.pop(reply["i"], None)
        if abandoned is not None:
            if "r" in reply and self.on_late_result is not None:
                task = asyncio.ensure_future(self.on_late_result(*abandoned, reply["r"]))
                self._late.add(task)
                task.add_done_callback(self._late.discard)
            return
        future = self._pending.pop(reply["i"], None)
        if future is None or future.done():
            return
        if "e" in reply:
            future.set_exception(_error_from(reply["e"]))
        else:
            future.set_result(reply["r"])

    def _on_lost(self, exc: Exception | None) -> None:
        self._proto = None
        self._abandoned.clear()  # the server undoes what a closed connection held (leases)
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(
                    StorageUnavailable(
                        f"connection to the data store at {self.address} closed"
                        f"{f' ({exc})' if exc else ''}; the request may not have completed."
                    )
                )

    async def connect(self) -> None:
        """Connect and shake hands now (calls do it on first use)."""
        if self._proto is None:
            async with self._lock:
                if self._proto is None:
                    await self._connect()

    async def call(self, method: str, **kwargs: Any) -> Any:
        proto = self._proto
        if proto is None:
            async with self._lock:
                proto = self._proto or await self._connect()
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            await proto.send({"i": rid, "m": method, "a": kwargs})
        except ConnectionError as e:
            self._pending.pop(rid, None)
            raise StorageUnavailable(
                f"lost the data store at {self.address} while sending {method}: {e}"
            ) from None
        try:
            return await future
        except asyncio.CancelledError:
            # Tell the server, so a get still waiting there leases nothing. If it had finished
            # already, its result (here, or still on its way) goes to on_late_result.
            self._pending.pop(rid, None)
            if future.done() and not future.cancelled() and future.exception() is None:
                if self.on_late_result is not None:
                    await asyncio.shield(self.on_late_result(method, kwargs, future.result()))
            elif self._proto is proto:
                self._abandoned[rid] = (method, kwargs)
                with contextlib.suppress(ConnectionError):
                    await asyncio.shield(proto.send({"c": rid}))
            raise

    async def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None


class Stub:
    """Calls a remote service's methods as if local: `await stub.read(partition=..., rows=...)`."""

    def __init__(self, address: str, token: str):
        self.connection = Connection(address, token)

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)

        async def call(**kwargs: Any) -> Any:
            return await self.connection.call(method, **kwargs)

        return call

    async def close(self) -> None:
        await self.connection.close()
