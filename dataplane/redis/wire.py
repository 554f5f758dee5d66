"""The two hot commands on connections of their own: a get's script and its cell reads.

A get is one script call and a few long GETRANGEs (mostly one per field; `dataplane.redis.scripts` has the
layout). Through redis-py, a 0.5 MB reply was copied four times on its way in (socket ->
stream buffer -> `read()` bytes -> hiredis' buffer -> the reply's bytes), 0.4 of a 64-row
get's 0.8 ms, and a script call cost 93 µs of client CPU where the bytes on the wire need 27.
Here each has a protocol of its own on connections taken over from redis-py:

    _Replies   an asyncio BufferedProtocol for GETRANGEs: the kernel copies a reply's bytes
               once, into a fresh numpy buffer that the batch's columns are then views of;
               only each reply's header passes through a scratch buffer
    _Commands  one command at a time, its reply parsed by hiredis as it arrives

Connections are opened by redis-py, so TLS, the ACL user and password, the database and the
timeouts are exactly those of every other command; then the transport is taken over. A call
that fails, is cancelled or times out closes its connection (a reply may be half read) and
raises what redis-py would (`ConnectionError`, `ResponseError`), so `call` retries as for any
command. Knows nothing about partitions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np

SCRATCH = 4096  # bytes of reply header (and of short replies) read at a time


class _Taken:
    """What both protocols share: the transport taken over from redis-py, the pending call's
    future, and failing it when the connection goes."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.transport: Any = writer.transport
        self.writer = writer  # kept: a StreamWriter closes its transport when it is collected
        self.waiter: asyncio.Future | None = None
        self.lost = False

    def _send(self, request: bytes) -> asyncio.Future:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def _fail(self, error: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(_connection_error(f"Redis closed the connection ({exc or 'end of stream'})"))

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost fails the call


class _Replies(_Taken, asyncio.BufferedProtocol):
    """One connection's reader of the RESP replies to GETRANGEs: each bulk reply's bytes are
    received into a buffer of their own, its header and the CRLF after it into `scratch`."""

    def __init__(self, writer: asyncio.StreamWriter):
        super().__init__(writer)
        self.scratch = bytearray(SCRATCH)
        self.n = 0  # bytes in scratch
        self.buf: np.ndarray | None = None  # the bulk reply being received, and how much of it is in
        self.filled = 0
        self.crlf = False  # the CRLF that ends a bulk reply is still to come
        self.replies: list[Any] = []
        self.want = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.buf is not None:  # exactly the rest of the reply: nothing after it lands there
            return self.buf.data[self.filled :]
        return memoryview(self.scratch)[self.n :]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self.buf is not None:
                self.filled += nbytes
                if self.filled == len(self.buf):
                    self._done(self.buf)
                    self.crlf = True
            else:
                self.n += nbytes
            self._parse()
        except Exception as e:  # a reply we cannot read: this connection is done for
            self._fail(_connection_error(f"unreadable reply from Redis ({e})"))

    def _parse(self) -> None:
        while self.buf is None:
            head = self.scratch
            if self.crlf:
                if self.n < 2:
                    return
                if head[:2] != b"\r\n":
                    raise ValueError("a bulk reply does not end in CRLF")
                self._drop(2)
                self.crlf = False
            end = head.find(b"\r\n", 0, self.n)
            if end < 0:
                if self.n == len(head):
                    raise ValueError(f"a reply header longer than {len(head)} bytes")
                return
            kind, line = head[0], bytes(head[1:end])
            if kind == ord("$"):
                size = int(line)
                if size < 0:  # a null reply (no CRLF follows), which GETRANGE answers as ""
                    self._drop(end + 2)
                    self._done(np.empty(0, np.uint8))
                    continue
                buf = np.empty(size, np.uint8)
                have = min(size, self.n - end - 2)
                buf[:have] = np.frombuffer(head, np.uint8, have, end + 2)
                self._drop(end + 2 + have)
                self.buf, self.filled = buf, have
                if have == size:
                    self._done(buf)
                    self.crlf = True
            elif kind == ord("-"):
                self._drop(end + 2)
                self._done(_response_error(line.decode(errors="replace")))
            else:
                raise ValueError(f"unexpected reply type {chr(kind)!r}")

    def _drop(self, count: int) -> None:
        self.scratch[: self.n - count] = self.scratch[count : self.n]
        self.n -= count

    def _done(self, reply: Any) -> None:
        self.replies.append(reply)
        self.buf = None
        if len(self.replies) == self.want and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def call(self, request: bytes, want: int) -> list[Any]:
        self.replies, self.want = [], want
        await self._send(request)
        return self.replies


class _Commands(_Taken, asyncio.Protocol):
    """One connection's reader of whole replies, one command at a time, parsed by hiredis."""

    def __init__(self, writer: asyncio.StreamWriter):
        import hiredis

        super().__init__(writer)
        self.parser = hiredis.Reader(replyError=_response_error)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed(data)
            reply = self.parser.gets()
        except Exception as e:
            self._fail(_connection_error(f"unreadable reply from Redis ({e})"))
            return
        if reply is not False and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(reply)

    async def call(self, request: bytes) -> Any:
        return await self._send(request)


class Wire:
    """Script calls and GETRANGEs on connections opened like the pool's, then taken over; at most
    `limit` of each kind at once (`dataplane.redis.max_connections`)."""

    def __init__(self, pool: Any, limit: int):
        self._pool = pool
        self._idle: dict[type, list] = {_Replies: [], _Commands: []}
        self._slots = {kind: asyncio.Semaphore(limit) for kind in self._idle}
        self._closed = False

    async def getranges(self, reads: Sequence[tuple[str, int, int]]) -> list[memoryview]:
        """The bytes [begin, end) of each (key, begin, end), one round trip, end > begin. A missing
        key gives b"" (as GETRANGE does); an error reply raises redis' ResponseError."""
        request = b"".join(_pack(b"GETRANGE", key, begin, end - 1) for key, begin, end in reads)
        replies = await self._use(_Replies, request, len(reads))
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return [r.data for r in replies]

    async def command(self, *args: Any) -> Any:
        """One command's reply; an error reply raises redis' ResponseError (errors nested in an
        array reply are left in it)."""
        reply = await self._use(_Commands, _pack(*args))
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def _use(self, kind: type, *call: Any) -> Any:
        async with self._slots[kind]:
            conn = await self._acquire(kind)
            try:
                reply = await conn.call(*call)
            except BaseException:
                conn.transport.close()  # a reply may be half read on it
                raise
            if self._closed:  # closed while this call was out: its connection goes too
                conn.transport.close()
            else:
                self._idle[kind].append(conn)
            return reply

    async def _acquire(self, kind: type) -> Any:
        idle = self._idle[kind]
        while idle and idle[-1].lost:  # closed while idle (a server restart, say)
            idle.pop()
        if idle:
            return idle.pop()
        conn = self._pool.make_connection()
        await conn.connect()  # TLS, AUTH, SELECT as for every other command
        reader, writer = conn._reader, conn._writer
        if reader is None or writer is None or len(reader._buffer):
            raise _connection_error("a new connection was not left idle after its handshake")
        conn._reader = conn._writer = None  # ours now: redis-py must not read from it or close it
        protocol = kind(writer)
        writer.transport.set_protocol(protocol)
        return protocol

    def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.transport.close()
            idle.clear()


def _pack(*args: Any) -> bytes:
    """A command in RESP, its arguments encoded as redis-py encodes them."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int) and not isinstance(a, bool):
            a = b"%d" % a
        elif isinstance(a, float):
            a = repr(a).encode()
        elif not isinstance(a, bytes | bytearray | memoryview):
            raise TypeError(
                f"a Redis command argument must be bytes, str, int or float, not {type(a).__name__}"
            )
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)


def _connection_error(message: str) -> Exception:
    import redis.exceptions

    return redis.exceptions.ConnectionError(message)


def _response_error(message: str) -> Exception:
    import redis.exceptions

    return redis.exceptions.ResponseError(message)
