"""The weight store: the last few published policy versions, each as flat byte buckets.

The trainer publishes version v+1 and goes on training; a rollout worker pulls the newest
version when it reaches a safe point. Neither waits for the other except where the
staleness bound says so (`wait_version`). A version travels as a few flat buffers and a
small index (services.parallelism.buckets), never tensor by tensor.

A run whose trainer trains only part of the model publishes its first version whole and
every later one partial (only the tensors training changes). The store keeps the newest
whole publication beside the recent versions, so a puller that holds nothing yet (a new
or restarted rollout worker) gets it under the partial newest one.

`WeightStore` is the plain class the workflow makes remote. `WeightClient` is what
workers hold: it packs and unpacks buffers and talks to a store, local or remote, through
the same four awaitable calls.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from asyncflow.errors import WorkerError
from services.parallelism.buckets import Slot, flatten, unflatten


class WeightStore:
    def __init__(self, keep_versions: int = 2):
        self.keep_versions = keep_versions
        self._versions: OrderedDict[int, tuple[list, list[Any], bool]] = OrderedDict()
        self._whole: tuple[list, list[Any]] | None = None  # the newest whole publication
        self._changed = asyncio.Condition()

    async def publish(self, version: int, index: list, buckets: list[Any], whole: bool = True) -> None:
        """Keep `version` (index: Slot.to_wire() rows; buckets: arrays or object refs to them); a
        partial one (`whole=False`) holds only some tensors, the others as the last whole one."""
        latest = self.latest()
        if version <= latest:
            raise WorkerError(
                f"publish of version {version}: the store already holds {latest}; versions only grow"
            )
        if not whole and self._whole is None:
            raise WorkerError(
                f"partial publish of version {version} before any whole one: a new engine could not start "
                "from it; publish the first version whole"
            )
        async with self._changed:
            self._versions[version] = (index, buckets, whole)
            if whole:
                self._whole = (index, buckets)
            while len(self._versions) > self.keep_versions:
                self._versions.popitem(last=False)
            self._changed.notify_all()

    def latest(self) -> int:
        """The newest published version, -1 before the first."""
        return next(reversed(self._versions)) if self._versions else -1

    async def wait_version(self, min_version: int, timeout_s: float | None = None) -> int:
        """Return the newest version once it is >= min_version (raises TimeoutError after timeout_s)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self.latest() >= min_version), timeout_s)
        return self.latest()

    async def get(
        self, min_version: int = 0, timeout_s: float | None = None, whole: bool = False
    ) -> tuple[int, list[tuple[list, list[Any]]]]:
        """The newest version (waiting until it is >= min_version) as (index, buckets) parts: its
        own, after the last whole publication's when it is partial and `whole` is asked for."""
        version = await self.wait_version(min_version, timeout_s)
        index, buckets, is_whole = self._versions[version]
        if whole and not is_whole and self._whole is not None:
            return version, [self._whole, (index, buckets)]
        return version, [(index, buckets)]


class WeightClient:
    """A worker's view of a weight store: publish a state dict, pull the newest one.

    `store` is a WeightStore or a Ray actor handle of one (`remote=True`); with a remote
    store, buckets go through Ray's object store once and every puller maps them.
    """

    def __init__(self, store: Any, *, remote: bool, bucket_mb: float = 64.0):
        self.store, self.remote, self.bucket_bytes = store, remote, int(bucket_mb * 2**20)

    async def _call(self, method: str, *args: Any) -> Any:
        if self.remote:
            return await getattr(self.store, method).remote(*args)
        result = getattr(self.store, method)(*args)
        return await result if asyncio.iscoroutine(result) else result

    async def publish(self, version: int, tensors: Mapping[str, torch.Tensor], whole: bool = True) -> float:
        """Publish `tensors` as `version` (`whole`: every tensor of the model, else only some);
        returns the seconds it took."""
        start = time.perf_counter()
        slots, buckets = flatten(tensors, self.bucket_bytes)
        payload: list[Any] = list(buckets)
        if self.remote:
            import ray

            payload = [ray.put(b) for b in buckets]  # a list of refs is passed as refs, not resolved
        await self._call("publish", version, [s.to_wire() for s in slots], payload, whole)
        return time.perf_counter() - start

    async def latest(self) -> int:
        return await self._call("latest")

    async def wait_version(self, min_version: int, timeout_s: float | None = None) -> int:
        return await self._call("wait_version", min_version, timeout_s)

    async def pull(
        self, min_version: int = 0, timeout_s: float | None = None, whole: bool = False
    ) -> tuple[int, dict[str, torch.Tensor]]:
        """The newest version >= min_version as tensors (views of the received buffers): what it
        published, or every tensor of the model (`whole`, for an engine that holds none yet)."""
        version, parts = await self._call("get", min_version, timeout_s, whole)
        tensors: dict[str, torch.Tensor] = {}
        for index, buckets in parts:  # the whole publication first, the newest over it
            if self.remote:
                buckets = await asyncio.gather(*buckets)
            tensors.update(unflatten([Slot.from_wire(s) for s in index], list(buckets)))
        return version, tensors
