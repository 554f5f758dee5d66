"""`asyncflow demo`: stream samples through the data store with real Ray actors.

A small picture of the pipeline the RL loop builds on: producer actors put prompts as
groups of rows, scorer actors (a consumer that is also a producer) fill in a field of
each row, and trainer actors get whole groups once every field is ready, exactly once,
with no barrier between the stages. The driver shows progress and the store's counters.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from asyncflow.config import DataPlaneConfig
from dataplane import StoreClient, start_store

SCHEMA = {"prompt_ids": "int64[*]", "response_ids": "int64[*]", "reward": "float32"}


class Producer:
    """Puts `groups` groups of `group_size` rows: a prompt and a made-up response per row."""

    def __init__(self, address: str, seed: int):
        self._address, self._rng = address, np.random.default_rng(seed)

    async def run(self, partition: str, groups: int, group_size: int) -> int:
        client = await StoreClient.connect(self._address)
        for _ in range(groups):
            prompt = self._rng.integers(0, 1000, size=int(self._rng.integers(4, 32)))
            responses = [
                self._rng.integers(0, 1000, size=int(self._rng.integers(1, 64))) for _ in range(group_size)
            ]
            await client.put(
                partition, {"prompt_ids": [prompt] * group_size, "response_ids": responses},
                group_size=group_size, version=0,
            )  # fmt: skip
        await client.close()
        return groups * group_size


class Scorer:
    """Reads responses and writes a reward for each row (a consumer that also produces)."""

    def __init__(self, address: str):
        self._address = address

    async def run(self, partition: str, batch_size: int) -> int:
        client = await StoreClient.connect(self._address)
        scored = 0
        batches = client.stream(
            partition, ["response_ids"], batch_size, "scorer", allow_partial=True, timeout_s=0.5
        )
        async for batch in batches:
            rewards = np.array([float(r.mean() > 500) for r in batch["response_ids"]], np.float32)
            await client.put(partition, {"reward": rewards}, rows=batch)
            scored += len(batch)
        await client.close()
        return scored


class Trainer:
    """Takes whole groups with every field ready; returns the rows it saw."""

    def __init__(self, address: str):
        self._address = address

    async def run(self, partition: str, batch_size: int) -> list[int]:
        client = await StoreClient.connect(self._address)
        seen: list[int] = []
        batches = client.stream(
            partition, list(SCHEMA), batch_size, "trainer", sampler="group", allow_partial=True, timeout_s=0.5
        )
        async for batch in batches:
            seen += batch.rows
        await client.close()
        return seen


def run_demo(samples: int = 4096, group_size: int = 8, producers: int = 2, scorers: int = 2,
             trainers: int = 2, console: Console | None = None) -> dict:  # fmt: skip
    """Run the demo pipeline end to end; returns what each stage handled and the store's stats."""
    console = console or Console()
    if samples % (group_size * producers):
        raise ValueError(
            f"samples={samples} must be a multiple of group_size*producers={group_size * producers}"
        )
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    store = start_store(DataPlaneConfig(name=f"demo-{time.monotonic_ns()}"))
    client = store.client()
    try:
        client.create_partition("demo", SCHEMA, capacity=1024, consumers=["scorer", "trainer"])
        actor: Any = ray.remote(num_cpus=0.1)  # actor handles: their methods are Ray's, untyped
        made = [actor(Producer).remote(store.address, i) for i in range(producers)]
        scoring = [actor(Scorer).remote(store.address) for _ in range(scorers)]
        training = [actor(Trainer).remote(store.address) for _ in range(trainers)]
        groups = samples // group_size // producers
        put_refs = [p.run.remote("demo", groups, group_size) for p in made]
        score_refs = [s.run.remote("demo", 16) for s in scoring]
        train_refs = [t.run.remote("demo", 2 * group_size) for t in training]
        start = time.perf_counter()
        _follow(client, samples, put_refs, train_refs, console)
        seen = [r for rows in ray.get(train_refs) for r in rows]
        scored = sum(ray.get(score_refs))
        elapsed = time.perf_counter() - start
        stats = client.store_stats()
    finally:
        client.close()
        store.shutdown()
        if started_ray:
            ray.shutdown()
    result = {"samples": samples, "scored": scored, "trained": len(seen), "distinct": len(set(seen)),
              "seconds": elapsed, "stats": stats["partitions"]["demo"]}  # fmt: skip
    _report(result, console)
    return result


def _follow(client, samples: int, put_refs, train_refs, console: Console) -> None:
    """Show progress until the trainers are done; seal the partition once every put returned."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    sealed = False
    with Progress(*columns, console=console, transient=False) as progress:
        bars = {name: progress.add_task(name, total=samples) for name in ("put", "scored", "trained")}
        while True:
            if not sealed and not ray.wait(put_refs, num_returns=len(put_refs), timeout=0)[1]:
                client.seal("demo")  # no more rows will come: streams end once they are drained
                sealed = True
            done = not ray.wait(train_refs, num_returns=len(train_refs), timeout=0.2)[1]
            part = client.store_stats()["partitions"]["demo"]
            progress.update(bars["put"], completed=part["created"])
            progress.update(bars["scored"], completed=part["consumers"]["scorer"]["acked"])
            progress.update(bars["trained"], completed=part["consumers"]["trainer"]["acked"])
            if done:
                return


def _report(result: dict, console: Console) -> None:
    table = Table(title=f"{result['samples']} samples in {result['seconds']:.1f} s")
    for col in ("consumer", "delivered", "acked", "redelivered", "waits", "wait s"):
        table.add_column(col)
    for name, c in result["stats"]["consumers"].items():
        table.add_row(name, *(str(c[k]) for k in ("delivered", "acked", "redelivered", "waits", "wait_s")))
    console.print(table)
    ok = result["trained"] == result["distinct"] == result["samples"]
    console.print(f"every sample trained exactly once: {'yes' if ok else 'NO'}")
