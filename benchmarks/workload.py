"""The data-plane benchmark workload: what is moved, how it is timed, and how results are summarised.

Shared by our store's runner (``benchmarks/dataplane.py``) and the peer runners in ``benchmarks/peers/``
(TransferQueue, plain Ray), so every system moves the same bytes under the same rules. It knows nothing
about any store, Ray or torch: it needs only numpy (the TransferQueue peer imports it from a separate
venv), and it never serialises anything itself.

Samples
    ``prompt_ids`` int64[256], ``response_ids`` int64[512], ``behavior_logprobs`` float32[512] and
    ``reward`` float32 (one scalar per sample, so the column has shape ``(n,)``): 8196 payload bytes per
    sample, 1024 samples (~8.4 MB) per run. Values are random with a fixed seed.

Scenarios (``SCENARIOS``)
    fixed   All fields fixed-length. One consumer.
    ragged  ``response_ids`` and ``behavior_logprobs`` are lists of per-row arrays whose lengths follow a
            long-tailed (lognormal, median ~96) distribution clipped to [16, 512]; ``prompt_ids`` stays
            fixed. Four consumers with distinct consumer/task names, each of which reads *every* row
            (fan-out, as rollout -> reward, reference, critic and trainer all read the same samples).

Protocol (per repeat; the producer is the driver process, consumers are separate processes)
    put      The producer writes the 1024 samples in chunks of ``CHUNK`` (64) rows, one call per chunk,
             each call returning once the chunk is stored and visible to consumers. No consumer runs.
             put time = wall time from the start of the first put to the return of the last.
    get      After every sample is put, the consumers read in micro-batches of ``MICRO_BATCH`` (64)
             rows until each has read all 1024. get time = wall time from the earliest consumer's first
             read request to the latest consumer's last batch in hand (consumers run concurrently).
    latency  put -> visible. Consumers are already waiting for a batch of 64 (blocked or polling)
             when the producer starts putting a 64-row chunk; latency is the time from the start of
             that put until a consumer holds the chunk's data. ``LATENCY_CHUNKS`` (64) chunks are put
             ``LATENCY_GAP_S`` apart so every consumer is waiting again before the next one; with
             several consumers, each consumer's latency is one sample. Producer and consumers stamp
             ``time.perf_counter()``, which on Linux is CLOCK_MONOTONIC and thus one clock for every
             process on the host.

Correctness
    Consumers hand back ``checksum()`` of everything they read; runners compare it with the
    checksum of what was put, so a system cannot look fast by dropping or mangling rows.

Definitions of the figures are in ``summarize()``.
"""

from __future__ import annotations

import statistics
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

FIELDS: tuple[str, ...] = ("prompt_ids", "response_ids", "behavior_logprobs", "reward")
RAGGED_FIELDS: tuple[str, ...] = ("response_ids", "behavior_logprobs")

N_SAMPLES = 1024
PROMPT_LEN = 256
RESPONSE_LEN = 512
CHUNK = 64
MICRO_BATCH = 64
LATENCY_CHUNKS = 64
# Long enough on a loaded 2-core host for every consumer to have taken the previous chunk and be
# waiting again (TransferQueue's ragged fan-out has a p99 near 75 ms there; 30-50 ms let chunks queue up
# behind each other); runners check this held (``latency_violations``) rather than trusting it.
LATENCY_GAP_S = 0.1

MIN_RAGGED_LEN = 16
VOCAB = 50_000

SCENARIOS: dict[str, dict[str, Any]] = {
    "fixed": {"ragged": False, "consumers": 1},
    "ragged": {"ragged": True, "consumers": 4},
}

Samples = dict[str, Any]  # field -> np.ndarray, or list[np.ndarray] for ragged fields


def make_samples(
    n: int = N_SAMPLES,
    prompt_len: int = PROMPT_LEN,
    response_len: int = RESPONSE_LEN,
    ragged: bool = False,
    seed: int = 0,
) -> Samples:
    """Deterministic samples for the workload.

    With ``ragged=True`` the response fields are lists of per-row arrays; their lengths are lognormal
    with median ~``response_len / 5.3`` (96 for 512) and sigma 0.8, rounded and clipped to
    ``[16, response_len]``, which gives the long tail of real RL responses (most short, a few at the cap).
    """
    rng = np.random.default_rng(seed)
    prompt_ids = rng.integers(0, VOCAB, size=(n, prompt_len), dtype=np.int64)
    reward = rng.standard_normal(n).astype(np.float32)
    if not ragged:
        response_ids = rng.integers(0, VOCAB, size=(n, response_len), dtype=np.int64)
        logprobs = -rng.exponential(1.0, size=(n, response_len)).astype(np.float32)
        return {
            "prompt_ids": prompt_ids,
            "response_ids": response_ids,
            "behavior_logprobs": logprobs,
            "reward": reward,
        }
    lengths = ragged_lengths(n, response_len, rng)
    return {
        "prompt_ids": prompt_ids,
        "response_ids": [rng.integers(0, VOCAB, size=int(k), dtype=np.int64) for k in lengths],
        "behavior_logprobs": [-rng.exponential(1.0, size=int(k)).astype(np.float32) for k in lengths],
        "reward": reward,
    }


def ragged_lengths(n: int, response_len: int, rng: np.random.Generator) -> np.ndarray:
    """Long-tailed response lengths in ``[MIN_RAGGED_LEN, response_len]`` (see ``make_samples``)."""
    median = response_len * 96 / 512
    raw = rng.lognormal(mean=np.log(median), sigma=0.8, size=n)
    return np.clip(np.rint(raw), MIN_RAGGED_LEN, response_len).astype(np.int64)


def num_rows(batch: Mapping[str, Any]) -> int:
    return len(batch[FIELDS[0]])


def sample_bytes(samples: Mapping[str, Any]) -> int:
    """Payload bytes: the sum of the arrays' ``nbytes`` (no framing, no lengths, no metadata)."""
    total = 0
    for value in samples.values():
        if isinstance(value, np.ndarray):
            total += value.nbytes
        else:
            total += sum(np.asarray(row).nbytes for row in value)
    return total


def slice_rows(samples: Mapping[str, Any], start: int, stop: int) -> Samples:
    """Rows ``[start, stop)`` of every field; numpy fields are views, ragged fields new lists."""
    return {name: value[start:stop] for name, value in samples.items()}


def iter_chunks(samples: Mapping[str, Any], size: int = CHUNK) -> Iterator[Samples]:
    n = num_rows(samples)
    for start in range(0, n, size):
        yield slice_rows(samples, start, min(start + size, n))


def latency_chunks(
    samples: Mapping[str, Any], count: int = LATENCY_CHUNKS, size: int = CHUNK
) -> list[Samples]:
    """``count`` chunks for the latency phase, cycling over ``samples`` (new puts of known rows)."""
    base = list(iter_chunks(samples, size))
    return [base[i % len(base)] for i in range(count)]


def checksum(batch: Mapping[str, Any]) -> tuple[int, int]:
    """``(rows, sum of per-row crc32)`` over the bytes of ``FIELDS`` in order.

    Order-independent (systems may hand rows back in any order, and consumers sum per batch), and it
    covers dtype-width bytes exactly, so a lost, duplicated, truncated or converted row changes it.
    Accepts numpy arrays (2-D, or 1-D for the scalar column) or lists of per-row arrays.
    """
    n = num_rows(batch)
    total = 0
    for i in range(n):
        crc = 0
        for name in FIELDS:
            crc = zlib.crc32(np.ascontiguousarray(batch[name][i]), crc)
        total += crc
    return n, total


def add_checksums(parts: Sequence[tuple[int, int]]) -> tuple[int, int]:
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def summarize(
    put_times: Sequence[float],
    get_times: Sequence[float],
    latencies: Sequence[float],
    n: int,
    nbytes: int,
) -> dict[str, float]:
    """Figures for one system and scenario.

    Args:
        put_times: put wall time of each repeat, seconds.
        get_times: get wall time of each repeat, seconds.
        latencies: every put -> visible latency, seconds, pooled over repeats (and consumers).
        n: samples per repeat (1024); in ``ragged`` it is *not* multiplied by the number of consumers.
        nbytes: payload bytes of those samples (``sample_bytes``).

    Returns:
        put_samples_per_s: ``n / median(put_times)``.
        get_samples_per_s: ``n / median(get_times)``. With 4 consumers this is samples made available
            to all of them per second; rows delivered per second is 4x this.
        put_mb_per_s, get_mb_per_s: ``nbytes / median(time) / 1e6`` (MB = 10^6 bytes).
        latency_p50_ms, latency_p99_ms: percentiles of the pooled latencies (linear interpolation).
    """
    put_s = statistics.median(put_times)
    get_s = statistics.median(get_times)
    lat_ms = np.asarray(latencies, dtype=np.float64) * 1e3
    return {
        "put_samples_per_s": n / put_s,
        "get_samples_per_s": n / get_s,
        "put_mb_per_s": nbytes / put_s / 1e6,
        "get_mb_per_s": nbytes / get_s / 1e6,
        "latency_p50_ms": float(np.percentile(lat_ms, 50)),
        "latency_p99_ms": float(np.percentile(lat_ms, 99)),
    }


def latency_violations(
    put_starts: Sequence[float], held_at: Sequence[Sequence[float]], waiting_since: float
) -> int:
    """Chunks whose latency was not measured against an already-waiting consumer.

    ``put_starts[i]`` is when the producer began putting chunk i; ``held_at[c][i]`` is when consumer c
    held it; ``waiting_since`` is when the last consumer started waiting. Chunk i counts as a violation
    if some consumer was not yet waiting (i == 0) or still busy with chunk i-1 when its put began.
    """
    bad = 0
    for i, t0 in enumerate(put_starts):
        previous_done = waiting_since if i == 0 else max(h[i - 1] for h in held_at)
        if previous_done > t0:
            bad += 1
    return bad
