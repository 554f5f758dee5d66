"""Dynamic sampling's part in the pipeline (trainer.dynamic_sampling; workers.screening is the
trainer's part, workers.source the admission's).

The trainer notes every group it drops in the store's DROPPED partition, which lives beside the
samples partition: made with it, in every checkpoint with it (the store checkpoints whole),
dropped with it. In async mode the source reads the notes itself and admits a prompt for each.
In sync mode no source loop runs, so while a step reads its groups `refill` does the same by
hand: each dropped group is replaced by a newly admitted prompt, generated and scored like the
round's, until the step holds its batch.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray


async def reset_dropped(client: Any, enabled: bool) -> None:
    """A fresh run: drop what an earlier attempt left of DROPPED; make it anew when enabled."""
    await drop_dropped(client)
    await ensure_dropped(client, enabled)


async def ensure_dropped(client: Any, enabled: bool) -> None:
    """DROPPED exists when dynamic sampling is on (a run resumed with it turned on has none yet)."""
    from workers.samples import ADMISSION, DROPPED, DROPPED_SCHEMA

    if enabled and DROPPED not in (await client.store_stats())["partitions"]:
        await client.create_partition(DROPPED, DROPPED_SCHEMA, consumers=[ADMISSION])


async def drop_dropped(client: Any) -> None:
    from workers.samples import DROPPED

    if DROPPED in (await client.store_stats())["partitions"]:
        await client.drop_partition(DROPPED)


def refills(pipe: Any, step: asyncio.Future) -> list[asyncio.Future]:
    """What runs beside a trainer step: in sync mode with dynamic sampling, its refill."""
    c = pipe.config
    if c.mode != "sync" or not c.trainer.dynamic_sampling:
        return []
    return [asyncio.ensure_future(refill(pipe, step, pipe.round_version))]


async def refill(pipe: Any, step: asyncio.Future, version: int) -> None:
    """Sync mode: until the trainer's `step` is done, every group it drops is replaced by a new
    prompt (admitted at `version`), generated and scored. Each note of a dropped group leaves
    one group to read in its place, so when the step holds its batch no note is left unread and
    every admitted group was read: nothing is left over for the next round."""
    while True:
        ref = pipe.source.take_freed.remote()
        freed = asyncio.ensure_future(pipe._ask(ref))
        await asyncio.wait([freed, step], return_when=asyncio.FIRST_COMPLETED)
        if not freed.done():  # the step has its batch
            ray.cancel(ref)  # the source's read of DROPPED is cancelled: it hands back nothing read
            freed.cancel()
            await asyncio.gather(freed, return_exceptions=True)
            return
        await pipe.generate(freed.result(), version)
