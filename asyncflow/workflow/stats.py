"""What the run's workers and its store report, gathered once a step for the metrics line and the
live view: per role idle fraction, busy seconds, samples and the role's own counters; the rows
each consumer has ready; the store's rows, leases and bytes."""

from __future__ import annotations

import asyncio
from typing import Any


async def worker_stats(pipe: Any) -> dict:
    """Per role: idle fraction, busy seconds, samples (and for rollout: mid-call weight loads,
    engine tokens/s, weight-sync time, engines replaced; for reward: failed calls); the rows each
    consumer has ready; the store's rows, leased rows and bytes. `pipe`: the run's Pipeline."""
    from workers.samples import PARTITION

    roles = {"rollout": pipe.rollouts, "reward": pipe.rewards, "reference": pipe.references}
    out: dict[str, Any] = {}
    engines: list[dict] = []  # the rollout workers' stats: their engines' totals
    for role, actors in roles.items():
        probes = (asyncio.wait_for(a.stats.remote(), pipe.config.watchdog.probe_timeout_s) for a in actors)
        replies = await asyncio.gather(*probes, return_exceptions=True)  # a stuck actor: left out
        stats = [s for s in replies if isinstance(s, dict) and s]
        if not stats:
            continue
        engines += stats if role == "rollout" else []
        busy, idle = sum(s["busy_s"] for s in stats), sum(s["idle_s"] for s in stats)
        out[role] = {
            "workers": len(actors),
            "idle_frac": idle / max(busy + idle, 1e-9),
            "busy_s": busy,
            "idle_s": idle,
            "samples": sum(s["samples"] for s in stats),
        }
        if role == "rollout":  # versions loaded while a call was generating (partial rollout)
            out[role]["mid_call_syncs"] = sum(s.get("mid_call_syncs", 0) for s in stats)
            out[role]["rejected_versions"] = sum(s.get("rejected_versions", 0) for s in stats)
            out[role]["replaced"] = pipe.health.replaced  # engines that stopped answering
        if role == "reward":  # calls that raised, hung or returned no finite number
            for key in ("failures", "timeouts", "restarts"):  # restarts: reward processes replaced
                out[role][key] = sum(s.get(key, 0) for s in stats)
    every = await pipe.client.store_stats()
    store = every["partitions"].get(PARTITION, {})
    consumers = store.get("consumers", {})
    out["queues"] = {name: c["ready"] for name, c in consumers.items()}
    if engines:
        out["rollout"].update(engine_stats(engines))
    out["store"] = {  # field data of the memory units, or the Redis server's used memory
        "rows": store.get("rows", 0),
        "leased_rows": sum(c["leased"] for c in consumers.values()),
        "bytes": sum(u.get("bytes", u.get("used_memory", 0)) for u in every.get("units", [])),
    }
    return out


def engine_stats(stats: list[dict]) -> dict:
    """Rollout's engines together: tokens generated, tokens per busy second, % of optimal (mean and
    worst engine), weight loads and the seconds they took."""
    tokens, busy = sum(s.get("tokens", 0) for s in stats), sum(s["busy_s"] for s in stats)
    # NanoFlow's "% of optimal" per engine: its tokens per busy second over its machine's bound
    # (measured matmul FLOP/s / 2·parameters; services.serving.optimal); engines without a bound left out.
    pct = [
        100 * s.get("tokens", 0) / s["busy_s"] / s["optimal_tokens_per_s"]
        for s in stats
        if s.get("optimal_tokens_per_s", 0) > 0 and s["busy_s"] > 0
    ]
    return {
        "engine_optimal_pct": sum(pct) / len(pct) if pct else 0.0,
        "engine_optimal_pct_min": min(pct, default=0.0),
        "tokens": tokens,
        "engine_tokens_per_s": tokens / busy if busy > 0 else 0.0,
        "weight_syncs": sum(s.get("weight_syncs", 0) for s in stats),
        "weight_sync_s": sum(s.get("sync_s", 0.0) for s in stats),
    }
