"""The weight store: the last few published policy versions, each as equal-size byte buckets.

The trainer publishes version v+1 and goes on training; a rollout worker pulls the newest
version when it reaches a safe point. Neither waits for the other except where the
staleness bound says so (`wait_version`). A version travels as equal buckets and a small
index (services.parallelism.buckets), never tensor by tensor.

Channels. Bucket b rides channel b % k (`channels`), so every channel carries the same bytes
to within one bucket. On CPU a channel is one transfer stream: a thread of the publisher that
fingerprints its buckets and `ray.put`s them (the one copy, into shared memory), and a thread
of each puller that maps them (`ray.get`, no copy on the same node; Ray's object manager
pulls them across nodes) and checks them. k streams keep k buckets in flight at once; the
GPU analogue is k NCCL communicators or queue pairs, which this CPU build does not have.
A small version (at most INLINE_BYTES) goes through its channels in the caller's thread.

Sharded publication. A trainer whose ranks each hold a part of the model (FSDP shards, as
`Shard`s) publishes from every rank: `publish(v, tensors, part=(rank, ranks))` sends that
rank's buckets over its own channels, with no gather to rank 0. The store shows version v
(latest / wait_version / get) only once all `ranks` parts have arrived; pull puts each
tensor back together from the parts.

Verification. Every bucket carries the publisher's fingerprint of its bytes; pull checks
each one it receives before it returns any tensor, and raises WeightMismatch (version, part,
bucket, channel, both fingerprints) on a difference, so an engine never switches to bytes
that are not the published ones, and never silently keeps the old ones.

A run whose trainer trains only part of the model publishes its first version whole and
every later one partial (only the tensors training changes). The store keeps the newest
whole publication beside the recent versions, so a puller that holds nothing yet (a new
or restarted rollout worker) gets it under the partial newest one.

`WeightStore` is the plain class the workflow makes remote. `WeightClient` is what
workers hold: it packs and unpacks buckets and talks to a store, local or remote, through
the same four awaitable calls.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from asyncflow.errors import WeightMismatch, WorkerError
from services.parallelism.buckets import Bucket, Index, Shard, fingerprint, pack, unpack

# Up to this many bytes a version is fingerprinted and sent (or checked and unpacked) in the
# caller's thread: a hop to a worker thread costs ~0.4 ms, a copy of 4 MiB about as much.
INLINE_BYTES = 4 * 2**20


async def _off_loop(nbytes: int, fn: Any, *args: Any) -> Any:
    """`fn(*args)` on `nbytes` of a version: in a worker thread, or in the caller's for a small one."""
    return fn(*args) if nbytes <= INLINE_BYTES else await asyncio.to_thread(fn, *args)


Part = tuple[dict, list[Any]]  # (Index.to_wire(), its buckets: piece lists, or object refs of them)


@dataclass
class _Pending:
    """A version some of whose parts have arrived."""

    ranks: int
    whole: bool
    parts: dict[int, Part] = field(default_factory=dict)


class WeightStore:
    def __init__(self, keep_versions: int = 2):
        self.keep_versions = keep_versions
        self._versions: OrderedDict[int, tuple[list[Part], bool]] = OrderedDict()
        self._whole: tuple[int, list[Part]] | None = None  # the newest whole publication
        self._pending: dict[int, _Pending] = {}
        self._changed = asyncio.Condition()

    async def publish(
        self,
        version: int,
        index: dict,
        buckets: list[Any],
        whole: bool = True,
        part: tuple[int, int] = (0, 1),
    ) -> None:
        """Keep part `rank` of `ranks` of `version` (index: Index.to_wire(); buckets: piece lists or
        object refs of them); the version shows once all its parts are here. A partial one
        (`whole=False`) holds only some tensors, the others as the last whole one."""
        rank, ranks = part
        pending = self._pending.get(version) or _Pending(ranks, whole)
        self._check(version, rank, ranks, whole, pending)
        pending.parts[rank] = (index, buckets)
        self._pending[version] = pending
        if len(pending.parts) < ranks:
            return
        for v in [v for v in self._pending if v <= version]:  # older ones can no longer show
            del self._pending[v]
        parts = [pending.parts[r] for r in range(ranks)]
        async with self._changed:
            self._versions[version] = (parts, whole)
            if whole:
                self._whole = (version, parts)
            while len(self._versions) > self.keep_versions:
                self._versions.popitem(last=False)
            self._changed.notify_all()

    def _check(self, version: int, rank: int, ranks: int, whole: bool, pending: _Pending) -> None:
        """Refuse a part that could never show, or that would show something wrong."""
        latest = self.latest()
        what = f"version {version}" if ranks == 1 else f"part {rank} of {ranks} of version {version}"
        if version <= latest:
            raise WorkerError(
                f"publish of {what}: the store already holds version {latest}; versions only grow "
                "(a part that arrives after a newer version showed is late: publish every part of a version "
                "before the next)"
            )
        if not 0 <= rank < ranks:
            raise WorkerError(f"publish of {what}: part must be (rank, ranks) with 0 <= rank < ranks")
        if (pending.ranks, pending.whole) != (ranks, whole):
            raise WorkerError(
                f"publish of {what} (whole={whole}): its other parts said {pending.ranks} parts and "
                f"whole={pending.whole}; every part of a version must say the same"
            )
        if rank in pending.parts:
            raise WorkerError(f"publish of {what}: that part has already arrived; publish each part once")
        earlier_whole = self._whole is not None or any(
            p.whole for v, p in self._pending.items() if v < version
        )
        if not whole and not earlier_whole:
            raise WorkerError(
                f"partial publish of version {version} before any whole one: a new engine could not start "
                "from it; publish the first version whole"
            )

    def latest(self) -> int:
        """The newest published version (all its parts here), -1 before the first."""
        return next(reversed(self._versions)) if self._versions else -1

    async def wait_version(self, min_version: int, timeout_s: float | None = None) -> int:
        """Return the newest version once it is >= min_version (raises TimeoutError after timeout_s)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self.latest() >= min_version), timeout_s)
        return self.latest()

    async def get(
        self, min_version: int = 0, timeout_s: float | None = None, whole: bool = False
    ) -> tuple[int, list[tuple[int, list[Part]]]]:
        """The newest version (waiting until it is >= min_version) as (version, parts) publications:
        its own, after the last whole publication's when it is partial and `whole` is asked for."""
        version = await self.wait_version(min_version, timeout_s)
        parts, is_whole = self._versions[version]
        if whole and not is_whole and self._whole is not None:
            return version, [self._whole, (version, parts)]
        return version, [(version, parts)]


class WeightClient:
    """A worker's view of a weight store: publish a state dict (or this rank's part of it), pull
    the newest one, checked bucket by bucket.

    `store` is a WeightStore or a Ray actor handle of one (`remote=True`); with a remote store,
    buckets go through Ray's object store once and every puller maps them.
    """

    def __init__(self, store: Any, *, remote: bool, bucket_mb: float = 64.0, channels: int = 1):
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.store, self.remote, self.channels = store, remote, channels
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self._unsettled: asyncio.Future | None = None  # the store's answer to a publish not waited for

    async def _call(self, method: str, *args: Any) -> Any:
        if self.remote:
            return await getattr(self.store, method).remote(*args)
        result = getattr(self.store, method)(*args)
        return await result if asyncio.iscoroutine(result) else result

    async def publish(
        self,
        version: int,
        tensors: Mapping[str, torch.Tensor | Shard],
        whole: bool = True,
        *,
        part: tuple[int, int] = (0, 1),
        wait: bool = True,
    ) -> float:
        """Publish `tensors` as `version` (`whole`: every tensor of the model, else only some), or
        part `rank` of `ranks` of it (`part`; a value may be a Shard: this rank's rows of a
        tensor). Returns the seconds it took. Once it returns, the bytes are copied: the tensors may
        change. `wait=False` returns without waiting for the store to take the version: `settle`
        (or the next publish) waits for it and raises what the store refused."""
        start = time.perf_counter()
        await self.settle()  # one publication in flight at a time, in order
        slots, buckets = pack(tensors, self.bucket_bytes)
        k, n = self.channels, len(buckets)
        size = sum(len(p) for b in buckets for p in b)
        sent = await asyncio.gather(*(_off_loop(size, self._send, buckets[c::k]) for c in range(k)))
        sums: list[int] = [0] * n
        payload: list[Any] = [None] * n
        for c, (channel_sums, channel_payload) in enumerate(sent):
            sums[c::k], payload[c::k] = channel_sums, channel_payload
        index = Index(slots, [sum(len(p) for p in b) for b in buckets], sums, k)
        announced = asyncio.ensure_future(
            self._call("publish", version, index.to_wire(), payload, whole, part)
        )
        if wait:
            await announced
        else:
            self._unsettled = announced
        return time.perf_counter() - start

    async def settle(self) -> None:
        """Wait until the store has taken the last version published with wait=False; raises what
        it refused."""
        pending, self._unsettled = self._unsettled, None
        if pending is not None:
            await pending

    def _send(self, buckets: list[Bucket]) -> tuple[list[int], list[Any]]:
        """One channel, in a thread of its own: fingerprint each bucket, then hand it over."""
        if self.remote:
            import ray
        sums, payload = [], []
        for bucket in buckets:  # bucket by bucket, so the put reads what the fingerprint left in cache
            sums.append(fingerprint(bucket))
            # remote: one copy, straight from the tensors into shared memory; local: a snapshot
            # (the trainer's tensors change at its next step)
            payload.append(ray.put(bucket) if self.remote else [p.copy() for p in bucket])
        return sums, payload

    async def latest(self) -> int:
        return await self._call("latest")

    async def wait_version(self, min_version: int, timeout_s: float | None = None) -> int:
        return await self._call("wait_version", min_version, timeout_s)

    async def pull(
        self,
        min_version: int = 0,
        timeout_s: float | None = None,
        whole: bool = False,
        *,
        into: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[int, dict[str, torch.Tensor]]:
        """The newest version >= min_version as tensors (views of the received buffers, or one copy
        where a tensor spans buckets or parts): what it published, or every tensor of the model
        (`whole`, for an engine that holds none yet). A tensor named in `into` (e.g. the live
        parameters) is written into it, the one copy of its bytes, and returned as it. Raises
        WeightMismatch, before returning or writing anything, when a received bucket differs from
        the published one."""
        version, publications = await self._call("get", min_version, timeout_s, whole)
        received = [  # every bucket checked before any tensor is made or written
            await asyncio.gather(*(self._receive(v, (rank, len(parts)), *p) for rank, p in enumerate(parts)))
            for v, parts in publications
        ]
        tensors: dict[str, torch.Tensor] = {}
        for (published, _), parts in zip(publications, received):  # the whole one first, the newest over it
            size = sum(sum(index.sizes) for index, _ in parts)
            try:
                tensors.update(await _off_loop(size, unpack, parts, into))
            except ValueError as e:  # the parts do not fit together (or into `into`)
                raise WorkerError(f"pull of version {published}: {e}") from None
        return version, tensors

    async def _receive(
        self, version: int, part: tuple[int, int], wire: dict, payload: list[Any]
    ) -> tuple[Index, list[Bucket]]:
        """One part's buckets, fetched and checked over its channels at once."""
        index = Index.from_wire(wire)
        if len(payload) != len(index.sizes):
            raise WeightMismatch(
                f"version {version} part {part[0]} of {part[1]}: {len(payload)} buckets arrived, the "
                f"publisher sent {len(index.sizes)}; nothing was loaded, the current weights stay"
            )
        k, size = index.channels, sum(index.sizes)
        fetch = self.remote
        if fetch and size <= INLINE_BYTES:  # awaited here: a ray.get would block the worker's loop
            payload, fetch = await asyncio.gather(*payload), False
        got = await asyncio.gather(
            *(_off_loop(size, self._fetch, version, part, index, payload, c, fetch) for c in range(k))
        )
        buckets: list[Any] = [None] * len(payload)
        for c in range(k):
            buckets[c::k] = got[c]
        return index, buckets

    def _fetch(
        self, version: int, part: tuple[int, int], index: Index, payload: Sequence[Any], channel: int,
        fetch: bool,
    ) -> list[Bucket]:  # fmt: skip
        """One channel's buckets, each fingerprint checked: mapped here from their object refs
        (`fetch`: a large version, in a thread of its own), or already here."""
        mine = range(channel, len(payload), index.channels)
        if fetch:  # a ray.get in threads, one per channel: faster than awaiting each ref on the loop
            import ray

            buckets = ray.get([payload[b] for b in mine])
        else:
            buckets = [payload[b] for b in mine]
        for b, bucket in zip(mine, buckets):
            size, got = sum(len(p) for p in bucket), fingerprint(bucket)
            if (size, got) != (index.sizes[b], index.sums[b]):
                raise WeightMismatch(
                    f"version {version} part {part[0]} of {part[1]}: bucket {b} (channel {channel}) arrived "
                    f"with {size} bytes and fingerprint {got:#018x}; the publisher sent {index.sizes[b]} "
                    f"bytes with fingerprint {index.sums[b]:#018x}. Its bytes changed on the way; nothing "
                    "was loaded, the current weights stay (the next version is tried as usual)"
                )
        return buckets
