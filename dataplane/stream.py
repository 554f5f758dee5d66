"""Streaming a partition: the read-ahead loop every client shares, whatever its backend.

`stream(client, ...)` needs only the client's `get`, `ack`, `release` and `renew`; it is the
way of reading the README shows and the workers use. Batches are yielded in the order they
arrive, a finished batch's ack rides on the request that replaces it, and read-ahead
leases are kept alive, so several instances of a consumer get each row once and the tail
of a stream never waits for a lease to expire.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any

from dataplane.batch import Batch
from dataplane.errors import LeaseError, StorageUnavailable


async def stream(
    client: Any, partition: str, fields: Sequence[str], batch_size: int, consumer: str, *,
    auto_ack: bool = True, prefetch: int = 2, **get_kwargs: Any,
) -> AsyncGenerator[Batch, None]:  # fmt: skip
    """Yield batches until the partition is sealed and drained.

    Up to `prefetch` further batches are asked for while the caller works on this one, and
    are yielded in the order they arrive; their leases are renewed while they wait and when
    handed over, so the caller has a whole `lease_s` for each batch. With `auto_ack`, a
    batch is acked when the caller asks for the next one (carried by the request that
    replaces it), so a consumer that dies mid-batch never acks it and the batch is
    redelivered. Leaving the loop early (break, exception) hands back what was read ahead
    and leaves the batch in hand leased and unacked: ack it if it was processed, else it is
    redelivered when its lease ends or this client closes.
    """
    ahead = _ReadAhead(
        client, lambda ack: client.get(partition, fields, batch_size, consumer, ack=ack, **get_kwargs)
    )
    done: Batch | None = None  # processed, its ack not yet sent
    try:
        while True:
            while not ahead.ended and len(ahead) <= max(prefetch, 0):
                ahead.ask(done)  # the first carries the ack of the batch the caller just finished
                done = None
            if done is not None:  # the store said end: no request left to carry it
                await client.ack(done)
                done = None
            batch = await ahead.next()
            if batch is None:
                if ahead.ended and not len(ahead):
                    return
                continue  # a request came back empty (allow_partial): ask again
            yield batch
            if auto_ack:
                done = batch
    finally:
        await ahead.close()
        if done is not None:
            await client.ack(done)


class _ReadAhead:
    """A stream's requests in flight and the batches they brought, not yet handed to the caller.

    Batches are kept in the order they arrive (not the order they were asked for: the store
    serves whichever request finds rows first). A task beside the stream renews each waiting
    batch's lease when half of it is gone, so batches behind a slow caller are never
    redelivered to another instance meanwhile; a batch lost anyway (renewal refused) is
    dropped, never handed over.
    """

    def __init__(self, client: Any, get: Callable[[Batch | None], Awaitable[Batch]]):
        self._client, self._get = client, get
        self._asked: dict[asyncio.Future, Batch | None] = {}  # requests in flight -> the ack each carries
        self._batches: collections.deque[Batch] = collections.deque()
        self._unsure: list[Batch] = []  # acks carried by requests that failed: maybe never arrived
        self._failed: BaseException | None = None
        self._changed = asyncio.Event()  # a request finished
        self._added: asyncio.Future | None = None  # done when a batch arrives (the keeper looks at it)
        self._keeper: asyncio.Task | None = None
        self.ended = False  # the store said end: ask for nothing more, take what is already coming
        self._empty = False  # a request came back without rows since next() last looked

    def __len__(self) -> int:
        return len(self._asked) + len(self._batches)

    def ask(self, ack: Batch | None) -> None:
        future = asyncio.ensure_future(self._get(ack))
        self._asked[future] = ack
        future.add_done_callback(self._arrived)

    def _arrived(self, future: asyncio.Future) -> None:
        ack = self._asked.pop(future)
        if future.cancelled() or future.exception() is not None:
            if ack is not None:
                self._unsure.append(ack)
            if not future.cancelled():
                self._failed = self._failed or future.exception()
        else:
            batch = future.result()
            self.ended |= batch.end
            self._empty |= not batch.rows
            if batch.rows:
                self._batches.append(batch)
                if self._added is not None and not self._added.done():
                    self._added.set_result(None)
                if self._keeper is None:
                    self._keeper = asyncio.ensure_future(self._keep())
        self._changed.set()

    async def next(self) -> Batch | None:
        """The oldest batch that arrived, its lease renewed unless fresh; None when a request came
        back empty (ask again) or nothing more will come (`ended` and nothing in flight)."""
        while True:
            if self._failed is not None:
                raise self._failed
            if self._batches:
                batch = self._batches.popleft()
                if time.monotonic() - batch.leased_at <= batch.lease_s / 10 or await self._renew(batch):
                    return batch
                continue  # its lease ran out before it could be renewed: another instance has it
            if not self._asked or self._empty:
                self._empty = False
                return None
            self._changed.clear()
            await self._changed.wait()

    async def _renew(self, batch: Batch) -> bool:
        at = time.monotonic()
        try:
            await self._client.renew(batch, batch.lease_s)
        except LeaseError:
            return False
        batch.leased_at = at
        return True

    async def _keep(self) -> None:
        while True:
            added = self._added = asyncio.get_running_loop().create_future()
            now = time.monotonic()
            for batch in [b for b in self._batches if now >= b.leased_at + b.lease_s / 2]:
                if not await self._renew(batch) and batch in self._batches:
                    self._batches.remove(batch)
            wake = min((b.leased_at + b.lease_s / 2 for b in self._batches), default=now + 3600)
            # Until the next renewal is due, or a batch arrives (it may be due sooner). asyncio.wait,
            # not wait_for: on 3.11 wait_for can swallow a cancel that races its timeout.
            await asyncio.wait([added], timeout=max(wake - time.monotonic(), 0.0))

    async def close(self) -> None:
        """Cancel the requests in flight (a get cancelled after it leased hands its rows back), send
        again the acks they carried, and hand every waiting batch back to the other instances."""
        for future in list(self._asked):
            future.cancel()
        await asyncio.gather(*self._asked, return_exceptions=True)
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        # If the store is gone there is nothing to hand back: its leases end with it.
        with contextlib.suppress(StorageUnavailable):
            for ack in self._unsure:
                await self._client.ack(ack)
            while self._batches:
                await self._client.release(self._batches.popleft())
