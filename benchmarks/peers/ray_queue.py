"""Plain-Ray peer for the data-plane benchmark: ``ray.put`` chunks behind a queue actor.

The baseline any Ray user could write in an afternoon: the producer ``ray.put``s each chunk and pushes
its ObjectRef to an async queue actor; consumers pull refs from the actor and ``ray.get`` them. The
actor keeps an append-only log of refs and one cursor per consumer name, so several consumers can each
read every chunk (the ``ragged`` scenario's fan-out). It runs the workload of ``benchmarks/workload.py``
(read that for the protocol and the figures) and knows nothing about our store or TransferQueue.

Run it inside an already-initialised Ray (``run()``), or standalone::

    .venv/bin/python benchmarks/peers/ray_queue.py --scenario all --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import ray

try:
    from benchmarks import workload as wl
except ImportError:  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import workload as wl


# num_cpus=0 for both actors: they only wait on I/O, and a logical reservation would make them
# unschedulable next to the caller's own actors on a 2-CPU Ray.
@ray.remote(num_cpus=0)
class QueueActor:
    """Broadcast queue of ObjectRefs: each consumer name reads every pushed chunk once, in order."""

    def __init__(self) -> None:
        self._log: list[ray.ObjectRef] = []
        self._cursor: dict[str, int] = {}
        self._changed = asyncio.Event()

    async def push(self, refs: list[ray.ObjectRef]) -> None:
        # Refs arrive wrapped in a list: a bare ObjectRef argument would be resolved to its value.
        self._log.extend(refs)
        # Wake every waiter, then arm a fresh event for the next push.
        self._changed.set()
        self._changed = asyncio.Event()

    async def pull(self, consumer: str) -> list[ray.ObjectRef]:
        position = self._cursor.get(consumer, 0)
        while position >= len(self._log):
            await self._changed.wait()
        self._cursor[consumer] = position + 1
        return [self._log[position]]

    async def reset(self) -> None:
        # Dropping the refs lets Ray free the chunks once consumers drop theirs too.
        self._log.clear()
        self._cursor.clear()


@ray.remote(num_cpus=0)
class Consumer:
    """Reads chunks for one consumer name, timing with the host-wide monotonic clock."""

    def __init__(self, queue: Any, name: str) -> None:
        self._queue = queue
        self._name = name

    def _next(self) -> dict[str, Any]:
        # Blocked wait: the pull only returns once a chunk is there. ray.get maps it from the object
        # store without a copy, which is how a Ray user would hold it.
        (ref,) = ray.get(self._queue.pull.remote(self._name))
        return ray.get(ref)

    def read(self, rows: int) -> tuple[float, float, tuple[int, int]]:
        """Read ``rows`` rows; returns (first request, last batch held, checksum)."""
        batches = []
        got = 0
        start = time.perf_counter()
        while got < rows:
            batch = self._next()
            batches.append(batch)
            got += wl.num_rows(batch)
        end = time.perf_counter()
        # Checksummed after the clock stops: verifying is the benchmark's cost, not the system's.
        return start, end, wl.add_checksums([wl.checksum(b) for b in batches])

    def wait_chunks(self, count: int) -> tuple[float, list[float], tuple[int, int]]:
        """Wait for ``count`` chunks; returns (waiting since, held-at per chunk, checksum)."""
        batches, held = [], []
        waiting_since = time.perf_counter()
        for _ in range(count):
            batches.append(self._next())
            held.append(time.perf_counter())
        return waiting_since, held, wl.add_checksums([wl.checksum(b) for b in batches])


def _put(queue: Any, chunk: dict[str, Any]) -> None:
    """One put: returns once the chunk is in the object store and visible to consumers."""
    ref = ray.put(chunk)
    ray.get(queue.push.remote([ref]))


def _repeat(queue: Any, consumers: list[Any], samples: dict[str, Any], lat_chunks: list[dict[str, Any]]):
    n = wl.num_rows(samples)
    chunks = list(wl.iter_chunks(samples))
    expected = wl.checksum(samples)

    ray.get(queue.reset.remote())
    start = time.perf_counter()
    for chunk in chunks:
        _put(queue, chunk)
    put_s = time.perf_counter() - start

    results = ray.get([c.read.remote(n) for c in consumers])
    get_s = max(r[1] for r in results) - min(r[0] for r in results)
    for _, _, got in results:
        if got != expected:
            raise RuntimeError(f"ray_queue: get checksum mismatch: {got} != {expected}")

    ray.get(queue.reset.remote())
    pending = [c.wait_chunks.remote(len(lat_chunks)) for c in consumers]
    time.sleep(0.5)  # let every consumer block in its first pull; checked below via waiting_since
    put_starts = []
    next_at = time.perf_counter()
    for chunk in lat_chunks:
        time.sleep(max(0.0, next_at - time.perf_counter()))
        put_starts.append(time.perf_counter())
        _put(queue, chunk)
        next_at = put_starts[-1] + wl.LATENCY_GAP_S
    results = ray.get(pending)
    expected_lat = wl.add_checksums([wl.checksum(c) for c in lat_chunks])
    for _, _, got in results:
        if got != expected_lat:
            raise RuntimeError(f"ray_queue: latency checksum mismatch: {got} != {expected_lat}")
    held = [r[1] for r in results]
    violations = wl.latency_violations(put_starts, held, max(r[0] for r in results))
    latencies = [h[i] - t0 for h in held for i, t0 in enumerate(put_starts)]
    ray.get(queue.reset.remote())
    return put_s, get_s, latencies, violations


def run(scenario: str, repeats: int = 3) -> dict[str, float]:
    """Run one scenario ``repeats`` times; returns ``workload.summarize()`` (medians over repeats)."""
    spec = wl.SCENARIOS[scenario]
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    samples = wl.make_samples(ragged=spec["ragged"])
    lat_chunks = wl.latency_chunks(samples)
    queue = QueueActor.remote()
    consumers = [Consumer.remote(queue, f"{scenario}-consumer{i}") for i in range(spec["consumers"])]
    try:
        # Untimed warm-up: starts the actors' workers and touches every code path once.
        warm = wl.slice_rows(samples, 0, wl.CHUNK)
        _put(queue, warm)
        ray.get([c.read.remote(wl.CHUNK) for c in consumers])

        put_times, get_times, latencies = [], [], []
        for rep in range(repeats):
            put_s, get_s, lat, violations = _repeat(queue, consumers, samples, lat_chunks)
            put_times.append(put_s)
            get_times.append(get_s)
            latencies.extend(lat)
            if violations:
                print(
                    f"ray_queue[{scenario}] repeat {rep}: {violations} latency chunks were put before "
                    "every consumer was waiting; raise LATENCY_GAP_S",
                    file=sys.stderr,
                )
        return wl.summarize(put_times, get_times, latencies, wl.num_rows(samples), wl.sample_bytes(samples))
    finally:
        for actor in [*consumers, queue]:
            ray.kill(actor)
        if started_ray:
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=[*wl.SCENARIOS, "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    names = list(wl.SCENARIOS) if args.scenario == "all" else [args.scenario]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = {}
        for name in names:
            start = time.perf_counter()
            out[name] = run(name, args.repeats)
            print(f"ray_queue[{name}]: {time.perf_counter() - start:.1f}s", file=sys.stderr)
    finally:
        ray.shutdown()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
