"""Weight sync: GB/s of a publish until every rollout worker has switched, over 1, 2 and 4 channels
and several bucket sizes, as a fraction of this machine's memcpy bandwidth; and bytes per channel.

What it measures, and how: a local Ray, a WeightStore actor and `--pullers` puller actors, each
holding its own copy of the model's tensors (allocated and touched before timing, as an engine's
parameters are). The driver (the trainer) publishes a float32 state dict of about `--state-mb` MB
(a few hundred tensors of varied sizes and an "lm_head" of a quarter of the bytes) with
workers.weights.WeightClient, the product's path: equal buckets, a fingerprint per bucket,
`ray.put` over k channel threads. The pullers, already waiting for the version, pull it into
their own tensors (`pull(into=...)`: map and verify every bucket, then copy each piece into place,
the one copy): `switched`. Time runs from the publish call until the last puller has switched;
GB/s is the state's bytes over that time; `publish s` is the publish call, `pull s` the slowest
puller's pull, `wake s` the rest (the store waking the pullers, their calls to it, scheduling).
`memcpy` is a torch copy of the same bytes into a touched buffer, measured in the same run (once
per round, median); `vs memcpy` is GB/s over it. `parts 2` rows publish the same state as two
parts from two publisher actors at once (each its half of every tensor's rows, as FSDP ranks
do). `raw` is the floor of the transport without this module: one `ray.put`
of all the tensors as one object, and each puller maps it and copies every tensor (no buckets, no
fingerprints). `channel max/mean` is the busiest channel's bytes over the mean, and `max-mean` the
busiest channel's excess over the mean in buckets (at most 1: the equal split's bound), per part.

The path moves the bytes 1 + pullers times (into shared memory, then into each puller's tensors)
and reads them 1 + pullers more times (the fingerprints), so even with free reads the pullers'
copies alone, on a memory-bound 2-core machine, hold it near or below 1/2 of memcpy.

Settings take turns, one publication each per round, so the load of a shared machine falls on
all alike; each row is the median of `--repeats` rounds after a warm-up round, and before them
come enough publications to write every page of the object store once (first touches are page
faults, not weight sync). The 1-minute load average before and after is reported. CPU only:
the numbers are "2-core CPU, Ray object store", never GPU figures.

    .venv/bin/python benchmarks/parallel_sync.py --json docs/bench-parallel-sync.json
    .venv/bin/python benchmarks/parallel_sync.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import ray
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.parallelism.buckets import Shard, channel_bytes, pack  # noqa: E402
from workers.weights import WeightClient, WeightStore  # noqa: E402


def make_state(total_mb: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """About `total_mb` MB of float32: an lm_head of a quarter of it, the rest in ~300 tensors of
    varied sizes (a layer's projections, MLP and norms). Every tensor has an even number of rows."""
    g = torch.Generator().manual_seed(seed)
    total = int(total_mb * 2**20) // 4  # float32 elements
    width = 1024
    state = {"lm_head": torch.randn(total // 4 // width // 2 * 2, width, generator=g)}
    rest, layer = total - state["lm_head"].numel(), 0
    while rest > 4 * width:
        for part, share in (("q", 1), ("k", 1), ("v", 1), ("o", 1), ("up", 4), ("down", 4)):
            rows = max(2, min(rest // width, share * width // 8) // 2 * 2)
            state[f"layers.{layer}.{part}"] = torch.randn(rows, width, generator=g)
            rest -= rows * width
        for norm in ("in_norm", "post_norm"):
            state[f"layers.{layer}.{norm}"] = torch.randn(width, generator=g)
            rest -= width
        layer += 1
    return state


def halves(state: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Two ranks' parts: each tensor's first and second half of rows, as FSDP2 shards dim 0."""
    parts: list[dict[str, Any]] = [{}, {}]
    for name, t in state.items():
        mid = t.shape[0] // 2
        parts[0][name] = Shard(t[:mid].clone(), 0, tuple(t.shape))
        parts[1][name] = Shard(t[mid:].clone(), mid, tuple(t.shape))
    return parts


@ray.remote(num_cpus=0)
class Puller:
    """A rollout worker's weight path: pull (map and verify), then copy into its own tensors."""

    def __init__(self, store: Any, shapes: dict[str, tuple[int, ...]]):
        torch.set_num_threads(1)
        self.client = WeightClient(store, remote=True)
        self.params = {name: torch.zeros(shape) for name, shape in shapes.items()}  # touched

    def switch_raw(self, refs: list) -> dict:
        """The floor: map one object holding every tensor, copy each into place; no check."""
        start = time.perf_counter()
        arrays = ray.get(refs[0])
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for target, array in zip(self.params.values(), arrays):
                target.view(-1).copy_(torch.from_numpy(array))
        return {"pull_s": time.perf_counter() - start, "end": time.time()}

    async def switch(self, version: int) -> dict:
        await self.client.wait_version(version)
        start = time.perf_counter()
        got, _ = await self.client.pull(version, into=self.params)  # verified, then one copy each
        assert got == version
        return {"pull_s": time.perf_counter() - start, "end": time.time()}


@ray.remote(num_cpus=0)
class Publisher:
    """A trainer rank holding its part of the state."""

    def __init__(self, store: Any, part: dict[str, Any]):
        self.store, self.part, self.clients = store, part, {}

    async def publish(self, version: int, rank: int, ranks: int, bucket_mb: float, channels: int) -> float:
        key = (bucket_mb, channels)
        if key not in self.clients:
            self.clients[key] = WeightClient(self.store, remote=True, bucket_mb=bucket_mb, channels=channels)
        return await self.clients[key].publish(version, self.part, part=(rank, ranks))


def memcpy_s(src: torch.Tensor, dst: torch.Tensor) -> float:
    """Seconds of one torch copy of `src` into the touched `dst`: this machine's memcpy."""
    start = time.perf_counter()
    dst.copy_(src)
    return time.perf_counter() - start


async def one_sync(pullers, version: int, publish) -> dict:
    """Publish `version` with `publish()` while the pullers wait for it; time until all switched."""
    waits = [p.switch.remote(version) for p in pullers]
    await asyncio.sleep(0.05)  # the pullers are parked in wait_version
    start = time.time()  # wall clock: the pullers stamp their end with the same clock
    publish_s = await publish()
    reports = await asyncio.gather(*waits)
    return {"total_s": max(r["end"] for r in reports) - start, "publish_s": publish_s,
            "pull_s": max(r["pull_s"] for r in reports)}  # fmt: skip


async def raw_sync(pullers, flat: list) -> dict:
    """The floor: one ray.put of every tensor as one object; each puller maps it and copies."""
    start = time.time()
    refs = [ray.put(flat)]
    publish_s = time.time() - start
    reports = await asyncio.gather(*(p.switch_raw.remote(refs) for p in pullers))
    return {"total_s": max(r["end"] for r in reports) - start, "publish_s": publish_s,
            "pull_s": max(r["pull_s"] for r in reports)}  # fmt: skip


async def run_grid(state, settings, repeats: int, n_pullers: int, warmup: int) -> tuple[list[dict], list]:
    """Rounds of one publication per setting (and one raw transfer, one memcpy), so that the load
    of a shared machine falls on every setting alike; the first round is a warm-up."""
    store = ray.remote(WeightStore).options(num_cpus=0).remote(2)
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    pullers = [Puller.remote(store, shapes) for _ in range(n_pullers)]
    parts = halves(state)
    ranks = [Publisher.remote(store, part) for part in parts]
    flat = [t.view(-1).numpy() for t in state.values()]
    nbytes = sum(a.nbytes for a in flat)
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)
    keys = {(k, b) for k, b, _ in settings} | {(1, 64)}  # (the warm-up's)
    clients = {(k, b): WeightClient(store, remote=True, bucket_mb=b, channels=k) for k, b in keys}
    version, runs, copies = 0, {s: [] for s in [*settings, "raw"]}, []

    async def publish(k: int, bucket_mb: float, sharded: bool) -> float:
        if not sharded:
            return await clients[k, bucket_mb].publish(version, state)
        sent = await asyncio.gather(
            *(r.publish.remote(version, i, 2, bucket_mb, k) for i, r in enumerate(ranks))
        )
        return max(sent)

    # Every process first writes each page of the object store once (page faults, not weight sync).
    for shard in [False] * warmup + [True] * (2 * warmup):
        await one_sync(pullers, version, lambda shard=shard: publish(1, 64, shard))
        version += 1
    for _ in range(repeats + 1):
        for setting in settings:
            runs[setting].append(await one_sync(pullers, version, lambda s=setting: publish(*s)))
            version += 1
        runs["raw"].append(await raw_sync(pullers, flat))
        copies.append(memcpy_s(src, dst))
        print(f"round {len(copies)} of {repeats + 1} done", file=sys.stderr)
    rows = []
    for setting, timed in runs.items():
        k, bucket_mb, sharded = setting if setting != "raw" else ("raw", nbytes / 2**20, False)
        if k == "raw":
            buckets, balance, excess = 1, 1.0, 0.0
        else:
            sizes = [[sum(len(p) for p in b) for b in pack(part, clients[k, bucket_mb].bucket_bytes)[1]]
                     for part in (parts if sharded else [state])]  # fmt: skip
            buckets = sum(len(s) for s in sizes)
            per_channel = [channel_bytes(s, k) for s in sizes]
            balance = max(max(c) / (sum(c) / k) for c in per_channel)
            excess = max((max(c) - sum(c) / k) / max(s) for c, s in zip(per_channel, sizes))
        for r in timed:
            r["wake_s"] = r["total_s"] - r["publish_s"] - r["pull_s"]
        med = {key: statistics.median(r[key] for r in timed[1:]) for key in timed[0]}
        rows.append({"channels": k, "bucket_mb": bucket_mb, "sharded": sharded, "buckets": buckets,
                     "gbps": nbytes / med["total_s"] / 1e9, **med,
                     "channel_max_over_mean": balance, "channel_excess_buckets": excess})  # fmt: skip
    return rows, copies[1:]


def measure(
    state_mb: float = 512,
    channels: tuple[int, ...] = (1, 2, 4),
    bucket_mbs: tuple[float, ...] = (4, 16, 64, 256),
    repeats: int = 5,
    pullers: int = 2,
    sharded: tuple[tuple[int, float], ...] = ((1, 64), (2, 16)),
) -> dict:
    """Run the grid on a local Ray (started here if none is up); returns the figures."""
    state = make_state(state_mb)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    settings = [(k, b, False) for b in bucket_mbs for k in channels] + [(k, b, True) for k, b in sharded]
    store_bytes = max(2**30, 4 * nbytes)  # the store keeps 2 versions; 2 more in flight
    started = not ray.is_initialized()
    if started:
        # Touch the object store's pages once at start: without it, the store gives freed pages back
        # and every publication pays a page fault per 4 KiB page (Ray's put falls to ~0.3-1.7 GB/s).
        os.environ.setdefault("RAY_preallocate_plasma_memory", "1")
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 object_store_memory=store_bytes)  # fmt: skip
    load = [os.getloadavg()[0]]  # other jobs on a shared machine: the 1-minute load, before and after
    try:
        rows, copies = asyncio.run(run_grid(state, settings, repeats, pullers, store_bytes // nbytes + 1))
        load.append(os.getloadavg()[0])
    finally:
        if started:
            ray.shutdown()
    memcpy = nbytes / statistics.median(copies) / 1e9
    for r in rows:
        r["ratio"] = r["gbps"] / memcpy
    return {"state_bytes": nbytes, "tensors": len(state), "pullers": pullers, "repeats": repeats,
            "memcpy_gbps": memcpy, "memcpy_s": copies, "load_before_after": load, "rows": rows}  # fmt: skip


def table(figures: dict) -> str:
    lines = [
        f"{figures['state_bytes'] / 2**20:.0f} MiB in {figures['tensors']} float32 tensors, "
        f"{figures['pullers']} pullers, median of {figures['repeats']}; "
        f"memcpy {figures['memcpy_gbps']:.2f} GB/s (2-core CPU, Ray object store); 1-minute load "
        + " -> ".join(f"{x:.1f}" for x in figures["load_before_after"]),
        "| parts | channels | bucket MB | buckets | GB/s | vs memcpy | publish s | pull s | wake s | total s "
        "| channel max/mean | max-mean (buckets) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in figures["rows"]:
        lines.append(
            f"| {2 if r['sharded'] else 1} | {r['channels']} | {r['bucket_mb']:g} | {r['buckets']} "
            f"| {r['gbps']:.2f} | {r['ratio']:.0%} | {r['publish_s']:.3f} | {r['pull_s']:.3f} "
            f"| {r['wake_s']:.3f} | {r['total_s']:.3f} "
            f"| {r['channel_max_over_mean']:.3f} | {r['channel_excess_buckets']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--quick", action="store_true", help="128 MB, buckets 4 and 32 MB, 2 repeats")
    parser.add_argument("--state-mb", type=float, default=512, help="size of the state dict")
    parser.add_argument("--repeats", type=int, default=5, help="timed publications per setting")
    parser.add_argument("--pullers", type=int, default=2, help="puller actors (rollout workers)")
    args = parser.parse_args(argv)
    if args.quick:
        figures = measure(128, (1, 2, 4), (4, 32), 2, args.pullers, ((2, 16),))
    else:
        figures = measure(args.state_mb, repeats=args.repeats, pullers=args.pullers)
    print(table(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
