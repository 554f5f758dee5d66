"""Data-plane benchmark: our store (memory and Redis backends) beside TransferQueue 0.1.11, a
plain-Ray queue and raw redis-py, same run.

The workload and its timing rules live in `benchmarks/workload.py` (1024 samples of
prompt_ids int64[256], response_ids int64[512], behavior_logprobs float32[512], reward
float32, put in chunks of 64 and read in micro-batches of 64; a ragged scenario with
long-tailed responses and 4 consumers). Consumers run in their own Ray actors; the producer
is this process. Every system's reads are checksummed against what was put. Our consumers
read with `StoreClient.stream(prefetch=N)`, N batches asked for ahead; the peers read one
batch at a time, so the prefetch 1 rows compare like with like.

    .venv/bin/python benchmarks/dataplane.py                  # all systems, all scenarios
    .venv/bin/python benchmarks/dataplane.py --json out.json --repeats 5 --prefetch 1,4
    .venv/bin/python benchmarks/dataplane.py --systems redis,raw-redis --redis-url redis://127.0.0.1:6379/0
    bash benchmarks/peers/setup_transferqueue.sh              # once, for the TransferQueue column

TransferQueue runs in its own venv (`.bench/tq-venv`) as a subprocess with its own Ray.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asyncflow.config import DataPlaneConfig  # noqa: E402
from benchmarks import workload as wl  # noqa: E402
from benchmarks.peers import raw_redis, ray_queue  # noqa: E402
from dataplane import StoreClient, start_store  # noqa: E402

TQ_PYTHON = ROOT / ".bench" / "tq-venv" / "bin" / "python"


def schema(ragged: bool) -> dict[str, str]:
    response = "*" if ragged else str(wl.RESPONSE_LEN)
    return {
        "prompt_ids": f"int64[{wl.PROMPT_LEN}]",
        "response_ids": f"int64[{response}]",
        "behavior_logprobs": f"float32[{response}]",
        "reward": "float32",
    }


@ray.remote(num_cpus=0)
class Consumer:
    """One consumer instance in its own process, reading with the async client's stream()."""

    def __init__(self, address: str, name: str, prefetch: int):
        self._address, self._name, self._prefetch = address, name, prefetch
        self._client: StoreClient | None = None

    async def connect(self) -> None:
        self._client = await StoreClient.connect(self._address)

    async def _batches(self, partition: str, count: int):
        """`count` batches of MICRO_BATCH rows, acked as the next is requested; (held-at, data) each."""
        stream = self._client.stream(
            partition, wl.FIELDS, wl.MICRO_BATCH, self._name, timeout_s=60, prefetch=self._prefetch
        )
        out = []
        async for batch in stream:
            out.append((time.perf_counter(), batch.data))
            if len(out) == count:
                break
        await stream.aclose()  # hands back the batch it had fetched ahead
        await self._client.ack(batch)  # the last one: no later request carried its ack
        return out

    async def read(self, partition: str, rows: int):
        start = time.perf_counter()
        got = await self._batches(partition, rows // wl.MICRO_BATCH)
        return start, got[-1][0], wl.add_checksums([wl.checksum(b) for _, b in got])

    async def wait_chunks(self, partition: str, count: int):
        waiting_since = time.perf_counter()
        got = await self._batches(partition, count)
        return waiting_since, [t for t, _ in got], wl.add_checksums([wl.checksum(b) for _, b in got])


async def run_store_repeat(client: StoreClient, consumers, names, samples, lat_chunks, ragged: bool):
    n = wl.num_rows(samples)
    part = f"bench-{uuid.uuid4().hex[:8]}"
    await client.create_partition(part, schema(ragged), capacity=4 * n, consumers=names)
    start = time.perf_counter()
    for chunk in wl.iter_chunks(samples):
        await client.put(part, chunk)
    put_s = time.perf_counter() - start

    results = await asyncio.gather(*(c.read.remote(part, n) for c in consumers))
    get_s = max(r[1] for r in results) - min(r[0] for r in results)
    expected = wl.checksum(samples)
    for *_, got in results:
        if got != expected:
            raise RuntimeError(f"store: get checksum mismatch {got} != {expected}")
    await client.drop_partition(part)

    part = f"bench-{uuid.uuid4().hex[:8]}"
    await client.create_partition(part, schema(ragged), capacity=4 * n, consumers=names)
    pending = [c.wait_chunks.remote(part, len(lat_chunks)) for c in consumers]
    await asyncio.sleep(0.5)  # every consumer is now blocked in its first get
    put_starts, next_at = [], time.perf_counter()
    for chunk in lat_chunks:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        put_starts.append(time.perf_counter())
        await client.put(part, chunk)
        next_at = put_starts[-1] + wl.LATENCY_GAP_S
    results = await asyncio.gather(*pending)
    expected = wl.add_checksums([wl.checksum(c) for c in lat_chunks])
    for *_, got in results:
        if got != expected:
            raise RuntimeError(f"store: latency checksum mismatch {got} != {expected}")
    held = [r[1] for r in results]
    violations = wl.latency_violations(put_starts, held, max(r[0] for r in results))
    await client.drop_partition(part)
    return put_s, get_s, [h[i] - t0 for h in held for i, t0 in enumerate(put_starts)], violations


async def run_store(address: str, scenario: str, repeats: int, prefetch: int) -> dict[str, float]:
    spec = wl.SCENARIOS[scenario]
    samples = wl.make_samples(ragged=spec["ragged"])
    lat_chunks = wl.latency_chunks(samples)
    names = [f"{scenario}-consumer{i}" for i in range(spec["consumers"])]
    consumers = [Consumer.remote(address, name, prefetch) for name in names]
    await asyncio.gather(*(c.connect.remote() for c in consumers))
    client = await StoreClient.connect(address)
    try:
        # Untimed warm-up: workers started, connections open, every code path touched once.
        warm = f"warm-{uuid.uuid4().hex[:8]}"
        await client.create_partition(warm, schema(spec["ragged"]), consumers=names)
        await client.put(warm, wl.slice_rows(samples, 0, wl.CHUNK))
        await asyncio.gather(*(c.read.remote(warm, wl.CHUNK) for c in consumers))
        await client.drop_partition(warm)
        puts, gets, lats = [], [], []
        for rep in range(repeats):
            put_s, get_s, lat, violations = await run_store_repeat(
                client, consumers, names, samples, lat_chunks, spec["ragged"]
            )
            puts.append(put_s)
            gets.append(get_s)
            lats.extend(lat)
            if violations:
                print(
                    f"store[{scenario}] repeat {rep}: {violations} latency chunks overlapped", file=sys.stderr
                )
        return wl.summarize(puts, gets, lats, wl.num_rows(samples), wl.sample_bytes(samples))
    finally:
        await client.close()
        for c in consumers:
            ray.kill(c)


def run_transferqueue(scenarios: list[str], repeats: int) -> dict[str, Any]:
    if not TQ_PYTHON.exists():
        print(
            "TransferQueue venv missing: run `bash benchmarks/peers/setup_transferqueue.sh`", file=sys.stderr
        )
        return {}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out: dict[str, Any] = {}
    for scenario in scenarios:
        proc = subprocess.run(
            [str(TQ_PYTHON), str(ROOT / "benchmarks/peers/transferqueue_peer.py"), "--scenario", scenario,
             "--repeats", str(repeats)],
            capture_output=True, text=True, env=env, check=True,
        )  # fmt: skip
        out.update(json.loads(proc.stdout))
    return out


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    cols = ["put_samples_per_s", "get_samples_per_s", "put_mb_per_s", "get_mb_per_s", "latency_p50_ms",
            "latency_p99_ms"]  # fmt: skip
    lines = ["| scenario | system | put samples/s | get samples/s | put MB/s | get MB/s | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for scenario in wl.SCENARIOS:
        for system, per in results.items():
            if scenario in per:
                r = per[scenario]
                cells = [f"{r[c]:,.0f}" if "samples" in c else f"{r[c]:.1f}" for c in cols]
                lines.append(f"| {scenario} | {system} | " + " | ".join(cells) + " |")
        raw = results.get("raw-redis", {}).get(scenario)
        for system, per in results.items():
            store = per.get(scenario)
            if system.startswith("asyncflow-redis") and store and raw:
                put_x = store["put_samples_per_s"] / raw["put_samples_per_s"]
                get_x = store["get_samples_per_s"] / raw["get_samples_per_s"]
                lines.append(f"| {scenario} | {system} / raw-redis | {put_x:.2f}x | {get_x:.2f}x | | | | |")
        tq = results.get("transferqueue", {}).get(scenario)
        for system, per in results.items():
            store = per.get(scenario)
            if not (system.startswith("asyncflow") and store and tq):
                continue
            put_x = store["put_samples_per_s"] / tq["put_samples_per_s"]
            get_x = store["get_samples_per_s"] / tq["get_samples_per_s"]
            lines.append(
                f"| {scenario} | {system} / TransferQueue | {put_x:.1f}x | {get_x:.1f}x | | | "
                f"{tq['latency_p50_ms'] / store['latency_p50_ms']:.1f}x lower | "
                f"{tq['latency_p99_ms'] / store['latency_p99_ms']:.1f}x lower |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=[*wl.SCENARIOS, "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--systems", default="asyncflow,redis,raw-redis,ray_queue,transferqueue")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="server for redis, raw-redis")
    parser.add_argument(
        "--prefetch", default="1,4", help="stream() read-ahead depths to run our store with (comma-separated)"
    )
    parser.add_argument("--units", type=int, default=2, help="storage units of our store (default 2)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    scenarios = list(wl.SCENARIOS) if args.scenario == "all" else [args.scenario]
    systems = args.systems.split(",")
    results: dict[str, dict[str, dict[str, float]]] = {}

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        if "asyncflow" in systems:
            store = start_store(DataPlaneConfig(name="bench", num_storage_units=args.units))
            for depth in map(int, args.prefetch.split(",")):
                results[f"asyncflow (prefetch {depth})"] = {
                    s: asyncio.run(run_store(store.address, s, args.repeats, depth)) for s in scenarios
                }
            store.shutdown()
        if "redis" in systems:
            config = DataPlaneConfig(
                backend="redis", name=f"bench-{uuid.uuid4().hex[:6]}", redis={"url": args.redis_url}
            )
            store = start_store(config)
            for depth in map(int, args.prefetch.split(",")):
                results[f"asyncflow-redis (prefetch {depth})"] = {
                    s: asyncio.run(run_store(store.address, s, args.repeats, depth)) for s in scenarios
                }
        if "raw-redis" in systems:
            results["raw-redis"] = {s: raw_redis.run(s, args.repeats, args.redis_url) for s in scenarios}
        if "ray_queue" in systems:
            results["ray_queue"] = {s: ray_queue.run(s, args.repeats) for s in scenarios}
    finally:
        ray.shutdown()
    if "transferqueue" in systems:
        results["transferqueue"] = run_transferqueue(scenarios, args.repeats)

    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"repeats": args.repeats, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
