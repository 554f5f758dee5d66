"""Things that fall due at a time: one task that sleeps until the earliest and hands it on.

The controller keeps lease ends and uncommitted reservations here; a deadline pushed earlier
than the one being waited for wakes the task. Knows nothing about what falls due.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dataplane.memory.partition import Signal


class Deadlines:
    def __init__(self, due: Callable[[str, str, Any, float], Awaitable[None]]):
        """`due(kind, partition, key, now)` runs for each item whose deadline has passed."""
        self._due = due
        self._heap: list[tuple[float, int, str, str, Any]] = []  # (deadline, seq, kind, partition, key)
        self._seq = itertools.count()
        self._signal = Signal()
        self._task: asyncio.Task | None = None

    def push(self, deadline: float, kind: str, partition: str, key: Any) -> None:
        heapq.heappush(self._heap, (deadline, next(self._seq), kind, partition, key))
        self._signal.fire()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            if not self._heap:
                await self._signal.wait(3600)
                continue
            now = time.monotonic()
            if self._heap[0][0] > now:
                await self._signal.wait(self._heap[0][0] - now)
                continue
            _, _, kind, partition, key = heapq.heappop(self._heap)
            await self._due(kind, partition, key, now)
