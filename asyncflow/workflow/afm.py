"""Action Flow Matching wired on Ray: a store, a weight store, robot actors and a flow trainer.

The schedule: the trainer publishes version 0; actors act for `flow.afm.duration_s`, putting
transitions; the trainer trains on them as they stream in and publishes after every update;
when the actors stop, the partition is sealed, the trainer drains what is left and stops.
The partition holds at most (staleness + 1) trainer batches (plus one actor put): the
store's back-pressure is the admission control that keeps actors from running further ahead
than the bound, as the RL pipeline's source does with prompts.

Workers are plain classes (workers.afm) made remote here. Ray must be initialised.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import ray

from asyncflow.config import AsyncFlowConfig
from dataplane import StoreClient, start_store
from workers.afm import CONSUMER, SCHEMA, AFMActor, AFMTrainer
from workers.weights import WeightStore

__all__ = ["run_afm", "summarize"]


async def _partition(address: str, name: str, capacity: int) -> None:
    store = await StoreClient.connect(address)
    try:
        await store.create_partition(
            name, SCHEMA, capacity=capacity, consumers=[CONSUMER], stale_policy="drop"
        )
    finally:
        await store.close()


async def _seal(address: str, name: str) -> None:
    store = await StoreClient.connect(address)
    try:
        await store.seal(name)
    finally:
        await store.close()


async def run_afm(config: AsyncFlowConfig, *, store_address: str | None = None) -> dict[str, Any]:
    """One AFM run; returns the episodes of every actor, the trainer's record and timings.
    Uses the store at `store_address` (a new partition in it), or starts one of its own."""
    afm = config.flow.afm
    if afm is None:
        raise ValueError("run_afm needs flow.afm set (see asyncflow.config.AFMConfig)")
    handle = None
    if store_address is None:
        handle = start_store(config.dataplane.model_copy(update={"name": f"afm-{uuid.uuid4().hex[:8]}"}))
        store_address = handle.address
    partition = f"afm-{uuid.uuid4().hex[:8]}"
    rows_per_put = afm.robots * afm.put_every
    await _partition(store_address, partition, (config.staleness + 1) * afm.batch_size + rows_per_put)
    # num_cpus=0: these actors are CPU-bound but few; reserving cores would leave a 2-core
    # machine unable to place them beside the store's actors.
    weights: Any = ray.remote(WeightStore).options(num_cpus=0).remote(keep_versions=2)
    trainer: Any = ray.remote(AFMTrainer).options(num_cpus=0).remote(
        afm, config.flow, store_address, weights, partition, staleness=config.staleness, seed=config.seed
    )  # fmt: skip
    actors: list[Any] = [
        ray.remote(AFMActor)
        .options(num_cpus=0)
        .remote(afm, config.flow, store_address, weights, partition, actor=i, seed=config.seed)  # fmt: skip
        for i in range(afm.num_actors)
    ]
    try:
        await trainer.start.remote()
        started = time.perf_counter()
        training = trainer.run.remote()
        acted = await _gather([a.run.remote(afm.duration_s) for a in actors])
        acted_s = time.perf_counter() - started
        await _seal(store_address, partition)
        trained = await training
    finally:
        for actor in [trainer, weights, *actors]:
            ray.kill(actor)
        if handle is not None:
            handle.shutdown()
    return {
        "episodes": [e for a in acted for e in a["episodes"]],
        "put_versions": [a["put_versions"] for a in acted],
        "trainer": trained,
        "acted_s": acted_s,
        "drained_s": time.perf_counter() - started - acted_s,
    }


async def _gather(refs: list[Any]) -> list[Any]:
    return [await r for r in refs]


def summarize(result: dict[str, Any], bin_s: float) -> dict[str, Any]:
    """Success rate and median steps to the goal of the episodes that ended in each `bin_s`
    window of the run, and the loop's bookkeeping: transitions put, trained, dropped as stale,
    trained more than once (must be 0), the largest lag trained at (at most the bound)."""
    episodes, trainer = result["episodes"], result["trainer"]
    windows: list[dict[str, Any]] = []
    start = 0.0
    while start < result["acted_s"]:
        ended = [e for e in episodes if start <= e["end_s"] < start + bin_s]
        won = sorted(e["steps"] for e in ended if e["success"])
        windows.append({
            "from_s": start, "to_s": start + bin_s, "episodes": len(ended),
            "success": sum(e["success"] for e in ended) / len(ended) if ended else None,
            "median_steps": won[len(won) // 2] if won else None,
        })  # fmt: skip
        start += bin_s
    put = sum(len(p) for p in result["put_versions"])
    trained = trainer["trained"]
    return {
        "windows": windows, "episodes": len(episodes), "versions": trainer["version"],
        "transitions_put": put, "trained": len(trained),
        "dropped_stale": trainer["store"].get("dropped_stale"),
        "trained_twice": len(trained) - len(set(trained)), "max_lag": max(trainer["lags"], default=0),
    }  # fmt: skip
