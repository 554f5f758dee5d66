"""TransferQueue 0.1.11 peer for the data-plane benchmark.

Runs the workload of ``benchmarks/workload.py`` (read that for the protocol and the figures) against
TransferQueue (PyPI ``transferqueue``, the data module of the AsyncFlow paper), used the way its README
says: ``tq.init(conf)`` in the driver starts the controller and two ``SimpleStorageUnit``s; the producer
puts ``TensorDict``s with ``client.put(data=..., partition_id=...)``; each consumer is a Ray actor that
attaches with ``tq.init()`` and reads with ``client.get_meta(..., mode="fetch", task_name=...)`` +
``client.get_data(meta)``. Variable-length fields travel as jagged nested tensors, TQ's own format for
them. It knows nothing about our store or the plain-Ray peer.

It runs in its own venv (TransferQueue brings its own dependencies) and starts its own Ray; set the venv
up with ``benchmarks/peers/setup_transferqueue.sh``, then::

    .bench/tq-venv/bin/python benchmarks/peers/transferqueue_peer.py --scenario all --repeats 3

stdout carries one JSON object ``{scenario: workload.summarize(...)}``; logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# An inherited RAY_ADDRESS (Ray exports it to children of a driver) would attach this process to the
# caller's cluster, whose workers run the other venv's Python and cannot import TransferQueue.
os.environ.pop("RAY_ADDRESS", None)

import psutil  # noqa: E402  (TransferQueue dependency)

# TQ clamps its torch thread count to the physical cores and logs a warning on every put/get when its
# default (8) is above that; read at import time, so it must be set before transfer_queue is imported.
os.environ.setdefault("TQ_NUM_THREADS", str(psutil.cpu_count(logical=False) or 1))

import ray  # noqa: E402
import torch  # noqa: E402
import transfer_queue as tq  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from transfer_queue.controller import TransferQueueController  # noqa: E402
from transfer_queue.storage.simple_storage import SimpleStorageUnit  # noqa: E402

try:
    from benchmarks import workload as wl
except ImportError:  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import workload as wl

FIELDS = list(wl.FIELDS)
NUM_STORAGE_UNITS = 2
POLL_SLEEP_S = 0.001  # client-side sleep between empty polls (polling_mode returns empty metadata)

TQ_CONF = {
    # Readiness is polled: in blocking mode the controller sleeps 5 s between checks of an unmet
    # get_meta (TQ_CONTROLLER_GET_METADATA_CHECK_INTERVAL) and gives up after 1 s, useless for latency.
    "controller": {"polling_mode": True},
    "backend": {
        "storage_backend": "SimpleStorage",
        "SimpleStorage": {"num_data_storage_units": NUM_STORAGE_UNITS},
    },
}


def _fit_on_small_ray() -> None:
    """Lower the logical CPU reservation of TQ's actors so they schedule on a 2-CPU Ray.

    The controller and each SimpleStorageUnit are declared ``@ray.remote(num_cpus=1)``: three CPUs, so
    ``tq.init`` hangs forever under ``ray.init(num_cpus=2)``. We keep ``num_cpus=2`` (the machine's real
    cores, as the other systems get) and change only the reservation, 0.5 each: ``ActorClass.options()``
    starts from ``_default_options``, which is where the decorator's ``num_cpus`` lives in Ray 2.60.
    Consumers reserve 0, as they do in the other peers. Nothing about how the actors run changes.
    """
    for actor_class in (TransferQueueController, SimpleStorageUnit):
        actor_class._default_options["num_cpus"] = 0.5


def _to_tensordict(chunk: dict[str, Any]) -> TensorDict:
    """A workload chunk as TQ's input: dense tensors, or jagged nested tensors for ragged fields."""
    fields = {}
    for name, value in chunk.items():
        if isinstance(value, list):
            fields[name] = torch.nested.as_nested_tensor(
                [torch.from_numpy(r) for r in value], layout=torch.jagged
            )
        else:
            fields[name] = torch.from_numpy(value)
    return TensorDict(fields, batch_size=[wl.num_rows(chunk)])


def _to_numpy(td: TensorDict) -> dict[str, Any]:
    # get_data packs every multi-element field, equal lengths or not, as a jagged nested tensor (one
    # row per sample), so unbind rows rather than assume the put layout comes back.
    out = {}
    for name in FIELDS:
        value = td[name]
        out[name] = [r.numpy() for r in value.unbind()] if value.is_nested else value.numpy()
    return out


@ray.remote(num_cpus=0)
class Consumer:
    """One consumer task: attaches to the running TransferQueue and reads batches of ``MICRO_BATCH``."""

    def __init__(self, task_name: str) -> None:
        tq.init()  # a controller exists, so this only builds a client connected to it
        self._client = tq.get_client()
        self._task = task_name

    def _next(self, partition_id: str) -> TensorDict:
        while True:
            meta = self._client.get_meta(
                data_fields=FIELDS,
                batch_size=wl.MICRO_BATCH,
                partition_id=partition_id,
                mode="fetch",
                task_name=self._task,
            )
            if meta.size:
                return self._client.get_data(meta)
            time.sleep(POLL_SLEEP_S)

    def read(self, partition_id: str, rows: int) -> tuple[float, float, tuple[int, int]]:
        """Read ``rows`` rows; returns (first request, last batch held, checksum)."""
        batches = []
        got = 0
        start = time.perf_counter()
        while got < rows:
            batch = self._next(partition_id)
            batches.append(batch)
            got += batch.batch_size[0]
        end = time.perf_counter()
        # Checksummed after the clock stops: verifying is the benchmark's cost, not the system's.
        return start, end, wl.add_checksums([wl.checksum(_to_numpy(b)) for b in batches])

    def wait_chunks(self, partition_id: str, count: int) -> tuple[float, list[float], tuple[int, int]]:
        """Poll for ``count`` batches; returns (waiting since, held-at per batch, checksum)."""
        batches, held = [], []
        waiting_since = time.perf_counter()
        for _ in range(count):
            batches.append(self._next(partition_id))
            held.append(time.perf_counter())
        return waiting_since, held, wl.add_checksums([wl.checksum(_to_numpy(b)) for b in batches])


def _repeat(
    client: Any, consumers: list[Any], tag: str, chunks: list[TensorDict], lat_chunks: list[TensorDict]
):
    n = sum(td.batch_size[0] for td in chunks)

    pid = f"{tag}-get"
    start = time.perf_counter()
    for td in chunks:
        client.put(data=td, partition_id=pid)
    put_s = time.perf_counter() - start

    results = ray.get([c.read.remote(pid, n) for c in consumers])
    get_s = max(r[1] for r in results) - min(r[0] for r in results)
    client.clear_partition(pid)

    pid = f"{tag}-lat"
    pending = [c.wait_chunks.remote(pid, len(lat_chunks)) for c in consumers]
    time.sleep(0.5)  # let every consumer start polling; checked below via waiting_since
    put_starts = []
    next_at = time.perf_counter()
    for td in lat_chunks:
        time.sleep(max(0.0, next_at - time.perf_counter()))
        put_starts.append(time.perf_counter())
        client.put(data=td, partition_id=pid)
        next_at = put_starts[-1] + wl.LATENCY_GAP_S
    lat_results = ray.get(pending)
    client.clear_partition(pid)
    held = [r[1] for r in lat_results]
    violations = wl.latency_violations(put_starts, held, max(r[0] for r in lat_results))
    latencies = [h[i] - t0 for h in held for i, t0 in enumerate(put_starts)]
    return put_s, get_s, [r[2] for r in results], latencies, [r[2] for r in lat_results], violations


def run(scenario: str, repeats: int = 3) -> dict[str, float]:
    """Run one scenario ``repeats`` times on the running TransferQueue; returns ``workload.summarize()``."""
    spec = wl.SCENARIOS[scenario]
    client = tq.get_client()
    samples = wl.make_samples(ragged=spec["ragged"])
    lat_samples = wl.latency_chunks(samples)
    expected = wl.checksum(samples)
    expected_lat = wl.add_checksums([wl.checksum(c) for c in lat_samples])
    # Built before any clock starts: TensorDicts are TQ's input format, as numpy dicts are the others'.
    chunks = [_to_tensordict(c) for c in wl.iter_chunks(samples)]
    lat_chunks = [_to_tensordict(c) for c in lat_samples]
    # TQ tracks consumption per task name, so four task names each read every row: the fan-out is native.
    consumers = [Consumer.remote(f"{scenario}-consumer{i}") for i in range(spec["consumers"])]
    try:
        # Untimed warm-up: starts the consumers' workers and opens their sockets.
        client.put(data=chunks[0], partition_id=f"{scenario}-warmup")
        ray.get([c.read.remote(f"{scenario}-warmup", wl.CHUNK) for c in consumers])
        client.clear_partition(f"{scenario}-warmup")

        put_times, get_times, latencies = [], [], []
        for rep in range(repeats):
            put_s, get_s, got, lat, got_lat, violations = _repeat(
                client, consumers, f"{scenario}-r{rep}", chunks, lat_chunks
            )
            if any(g != expected for g in got) or any(g != expected_lat for g in got_lat):
                raise RuntimeError(f"transferqueue[{scenario}]: checksum mismatch: {got} {got_lat}")
            put_times.append(put_s)
            get_times.append(get_s)
            latencies.extend(lat)
            if violations:
                print(
                    f"transferqueue[{scenario}] repeat {rep}: {violations} latency chunks were put before "
                    "every consumer was waiting; raise LATENCY_GAP_S",
                    file=sys.stderr,
                )
        return wl.summarize(put_times, get_times, latencies, wl.num_rows(samples), wl.sample_bytes(samples))
    finally:
        for actor in consumers:
            ray.kill(actor)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=[*wl.SCENARIOS, "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    names = list(wl.SCENARIOS) if args.scenario == "all" else [args.scenario]

    out = {}
    # stdout is for the JSON result only; anything TQ or Ray prints goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            _fit_on_small_ray()
            tq.init(TQ_CONF)
            try:
                for name in names:
                    start = time.perf_counter()
                    out[name] = run(name, args.repeats)
                    print(f"transferqueue[{name}]: {time.perf_counter() - start:.1f}s", file=sys.stderr)
            finally:
                tq.close()
        finally:
            ray.shutdown()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
