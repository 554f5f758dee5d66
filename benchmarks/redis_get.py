"""Where a Redis-backed get spends its time: the data-plane workload read in this process.

The data-plane benchmark (`benchmarks/dataplane.py`) runs consumers in Ray actors beside the
peers, which is the fair comparison but too noisy to tell a 10 % change in the get path. This
script puts the workload of `benchmarks/workload.py` with the Redis backend and reads it back
in this one process, each consumer after the other, so that a change to the scripts or the
client can be compared round by round. Per scenario it prints the get phase's median wall time,
this process's CPU time in it, and what Redis spent per script call and per command inside the
scripts (`INFO commandstats` around the get phase; it counts the calls of every client, so run
it on an otherwise idle server).

    .venv/bin/python benchmarks/redis_get.py                       # fixed and ragged, prefetch 1
    .venv/bin/python benchmarks/redis_get.py --prefetch 4 --repeats 20 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import workload as wl  # noqa: E402
from benchmarks.dataplane import schema  # noqa: E402
from dataplane import StoreClient  # noqa: E402

WARMUP = 3  # repeats not counted: scripts loaded, connections open, allocator warm


async def read_all(client: StoreClient, partition: str, consumer: str, prefetch: int) -> int:
    stream = client.stream(partition, wl.FIELDS, wl.MICRO_BATCH, consumer, timeout_s=60, prefetch=prefetch)
    got = 0
    async for batch in stream:
        got += len(batch.rows)
        if got == wl.N_SAMPLES:
            break
    await stream.aclose()
    await client.ack(batch)
    return got


def commandstats(r: redis.Redis) -> dict[str, tuple[int, int]]:
    return {k.removeprefix("cmdstat_"): (v["calls"], v["usec"]) for k, v in r.info("commandstats").items()}


async def run(url: str, scenario: str, repeats: int, prefetch: int) -> dict[str, Any]:
    spec = wl.SCENARIOS[scenario]
    samples = wl.make_samples(ragged=spec["ragged"])
    consumers = [f"c{i}" for i in range(spec["consumers"])]
    r = redis.Redis.from_url(url)
    client = await StoreClient.connect(url)
    walls, cpus, server = [], [], {}
    try:
        for rep in range(WARMUP + repeats):
            part = f"probe-{uuid.uuid4().hex[:8]}"
            await client.create_partition(
                part, schema(spec["ragged"]), capacity=4 * wl.N_SAMPLES, consumers=consumers
            )
            for chunk in wl.iter_chunks(samples):
                await client.put(part, chunk)
            before = commandstats(r)
            wall, cpu = time.perf_counter(), time.process_time()
            for name in consumers:
                if await read_all(client, part, name, prefetch) != wl.N_SAMPLES:
                    raise RuntimeError(f"{name} did not read every row of {part}")
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            after = commandstats(r)
            await client.drop_partition(part)
            if rep < WARMUP:
                continue
            walls.append(wall)
            cpus.append(cpu)
            for cmd, (calls, usec) in after.items():
                c0, u0 = before.get(cmd, (0, 0))
                total = server.setdefault(cmd, [0, 0])
                total[0] += calls - c0
                total[1] += usec - u0
    finally:
        await client.close()
        r.close()
    server.pop("info", None)  # this script's own
    reads = wl.N_SAMPLES * len(consumers)
    wall = statistics.median(walls)
    return {
        "consumers": len(consumers),
        "prefetch": prefetch,
        "get_ms": 1000 * wall,
        "row_reads_per_s": reads / wall,
        "client_cpu_ms": 1000 * statistics.median(cpus),
        "redis_ms": {cmd: usec / 1000 / repeats for cmd, (_, usec) in server.items()},
        "redis_us_per_call": {cmd: usec / max(calls, 1) for cmd, (calls, usec) in server.items()},
        "calls": {cmd: calls / repeats for cmd, (calls, _) in server.items()},
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| scenario | consumers | get phase ms | row reads/s | client CPU ms | script µs/call | script ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for scenario, x in results.items():
        lines.append(
            f"| {scenario} | {x['consumers']} | {x['get_ms']:.1f} | {x['row_reads_per_s']:,.0f} | "
            f"{x['client_cpu_ms']:.1f} | {x['redis_us_per_call'].get('evalsha', 0):.0f} | "
            f"{x['redis_ms'].get('evalsha', 0):.2f} |"
        )
    for scenario, x in results.items():
        lines += [
            "",
            f"{scenario}: Redis time per get phase, by command (script calls include the commands they run)",
        ]
        for cmd, ms in sorted(x["redis_ms"].items(), key=lambda kv: -kv[1])[:10]:
            calls, us = x["calls"][cmd], x["redis_us_per_call"][cmd]
            lines.append(f"  {cmd:18s} {ms:7.2f} ms  {calls:7.0f} calls  {us:6.1f} µs/call")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--scenarios", default="fixed,ragged", help="comma-separated: fixed, ragged")
    ap.add_argument("--repeats", type=int, default=10, help="counted repeats per scenario (after 3 warm-up)")
    ap.add_argument("--prefetch", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    for s in scenarios:
        if s not in wl.SCENARIOS:
            ap.error(f"unknown scenario {s!r}: expected one of {', '.join(wl.SCENARIOS)}")
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: expected at least 1")
    results = {s: asyncio.run(run(args.redis_url, s, args.repeats, args.prefetch)) for s in scenarios}
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"repeats": args.repeats, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
