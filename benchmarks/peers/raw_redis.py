"""Raw redis-py peer for the data-plane benchmark: the ceiling of a Redis-backed store.

What a user who rolls their own would write: the producer XADDs one entry per sample (the
sample's fields as raw numpy bytes in one msgpack list), a chunk per pipeline; each
consumer XREADs from its own cursor (BLOCK, COUNT 64), so every consumer reads every
sample (the `ragged` fan-out), and rebuilds arrays with `np.frombuffer`. No leases, no
acks, no readiness per field, no capacity, no retention: only the bytes moving through
Redis, which is what our Redis backend is measured against. It runs the workload of
`benchmarks/workload.py` and knows nothing about our store.

    .venv/bin/python benchmarks/peers/raw_redis.py --scenario all --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import ray
import redis.asyncio as aioredis

try:
    from benchmarks import workload as wl
except ImportError:  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import workload as wl

URL = "redis://127.0.0.1:6379/0"
DTYPES = {
    "prompt_ids": np.int64,
    "response_ids": np.int64,
    "behavior_logprobs": np.float32,
    "reward": np.float32,
}


def encode_chunk(chunk: dict[str, Any]) -> list[bytes]:
    n = wl.num_rows(chunk)
    return [
        msgpack.packb([memoryview(np.ascontiguousarray(chunk[f][i])) for f in wl.FIELDS]) for i in range(n)
    ]


def decode_batch(entries: list, ragged: bool) -> dict[str, Any]:
    rows = [msgpack.unpackb(fields[b"d"]) for _, fields in entries]
    out: dict[str, Any] = {}
    for j, f in enumerate(wl.FIELDS):
        cells = [np.frombuffer(r[j], DTYPES[f]) for r in rows]
        if f == "reward":
            out[f] = np.concatenate(cells)
        elif ragged and f in wl.RAGGED_FIELDS:
            out[f] = cells
        else:
            out[f] = np.stack(cells)
    return out


async def put(r: Any, key: str, chunk: dict[str, Any]) -> None:
    async with r.pipeline(transaction=False) as pipe:
        for blob in encode_chunk(chunk):
            pipe.xadd(key, {"d": blob})
        await pipe.execute()


@ray.remote(num_cpus=0)
class Consumer:
    """Reads every sample of a stream key from its own cursor, MICRO_BATCH at a time."""

    def __init__(self, url: str, ragged: bool):
        self._r = aioredis.from_url(url)
        self._ragged = ragged

    async def _batches(self, key: str, count: int) -> list[tuple[float, dict]]:
        cursor, out, entries = "0-0", [], []
        while len(out) < count:
            reply = await self._r.xread({key: cursor}, count=wl.MICRO_BATCH - len(entries), block=60_000)
            for _, got in reply:
                entries += got
            cursor = entries[-1][0] if entries else cursor
            if len(entries) == wl.MICRO_BATCH:
                out.append((time.perf_counter(), decode_batch(entries, self._ragged)))
                entries = []
        return out

    async def read(self, key: str, rows: int):
        start = time.perf_counter()
        got = await self._batches(key, rows // wl.MICRO_BATCH)
        return start, got[-1][0], wl.add_checksums([wl.checksum(b) for _, b in got])

    async def wait_chunks(self, key: str, count: int):
        since = time.perf_counter()
        got = await self._batches(key, count)
        return since, [t for t, _ in got], wl.add_checksums([wl.checksum(b) for _, b in got])


async def _repeat(r: Any, consumers: list, samples: dict, lat_chunks: list) -> tuple:
    n = wl.num_rows(samples)
    key = f"bench-raw:{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    for chunk in wl.iter_chunks(samples):
        await put(r, key, chunk)
    put_s = time.perf_counter() - start
    results = await asyncio.gather(*(c.read.remote(key, n) for c in consumers))
    get_s = max(x[1] for x in results) - min(x[0] for x in results)
    for *_, got in results:
        if got != wl.checksum(samples):
            raise RuntimeError(f"raw_redis: get checksum mismatch {got}")
    await r.delete(key)

    key = f"bench-raw:{uuid.uuid4().hex[:8]}"
    pending = [c.wait_chunks.remote(key, len(lat_chunks)) for c in consumers]
    await asyncio.sleep(0.5)
    put_starts, next_at = [], time.perf_counter()
    for chunk in lat_chunks:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        put_starts.append(time.perf_counter())
        await put(r, key, chunk)
        next_at = put_starts[-1] + wl.LATENCY_GAP_S
    results = await asyncio.gather(*pending)
    if any(got != wl.add_checksums([wl.checksum(c) for c in lat_chunks]) for *_, got in results):
        raise RuntimeError("raw_redis: latency checksum mismatch")
    held = [x[1] for x in results]
    violations = wl.latency_violations(put_starts, held, max(x[0] for x in results))
    await r.delete(key)
    return put_s, get_s, [h[i] - t0 for h in held for i, t0 in enumerate(put_starts)], violations


async def _run(scenario: str, repeats: int, url: str) -> dict[str, float]:
    spec = wl.SCENARIOS[scenario]
    samples = wl.make_samples(ragged=spec["ragged"])
    lat_chunks = wl.latency_chunks(samples)
    consumers = [Consumer.remote(url, spec["ragged"]) for _ in range(spec["consumers"])]
    r = aioredis.from_url(url)
    try:
        warm = f"bench-raw:{uuid.uuid4().hex[:8]}"
        await put(r, warm, wl.slice_rows(samples, 0, wl.CHUNK))
        await asyncio.gather(*(c.read.remote(warm, wl.CHUNK) for c in consumers))
        await r.delete(warm)
        puts, gets, lats = [], [], []
        for rep in range(repeats):
            put_s, get_s, lat, violations = await _repeat(r, consumers, samples, lat_chunks)
            puts.append(put_s)
            gets.append(get_s)
            lats.extend(lat)
            if violations:
                print(
                    f"raw_redis[{scenario}] repeat {rep}: {violations} latency chunks overlapped",
                    file=sys.stderr,
                )
        return wl.summarize(puts, gets, lats, wl.num_rows(samples), wl.sample_bytes(samples))
    finally:
        await r.aclose()
        for c in consumers:
            ray.kill(c)


def run(scenario: str, repeats: int = 3, url: str = URL) -> dict[str, float]:
    """One scenario, `repeats` times, inside an initialised Ray; `workload.summarize()` figures."""
    return asyncio.run(_run(scenario, repeats, url))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=[*wl.SCENARIOS, "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--url", default=URL)
    args = parser.parse_args(argv)
    names = list(wl.SCENARIOS) if args.scenario == "all" else [args.scenario]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = {name: run(name, args.repeats, args.url) for name in names}
    finally:
        ray.shutdown()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
