"""Reward isolation: what running the reward function in reward processes costs, against a thread.

The reward stage of the tiny example (examples/sort.yaml: `asyncflow.tasks.sorting:reward`, a
string comparison) scored through RewardWorker as a run scores it: a batch of `--batch` samples
at a time, every call of the batch in flight together. The function itself takes microseconds,
so the figures are the isolation's own overhead per sample: a thread pool hop (thread) against a
msgpack round trip over a socket pair to a reward process (process, 1..N processes). Also timed:
starting the processes (each loads the function), and replacing one killed past its deadline.

    .venv/bin/python benchmarks/reward_isolation.py [--samples 4096] [--batch 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asyncflow.tasks.sorting import SortDigits, reward  # noqa: E402
from workers.reward import RewardWorker  # noqa: E402
from workers.reward_pool import RewardProcesses  # noqa: E402

SPEC = "asyncflow.tasks.sorting:reward"


def samples(count: int) -> list[tuple[str, str, str]]:
    """(prompt, response, answer) of the example: half the responses correct."""
    task, rng = SortDigits(min_digits=5, max_digits=5), random.Random(0)
    out = []
    for i in range(count):
        ex = task.example(i)
        response = ex.answer if i % 2 else "".join(rng.sample(ex.answer, len(ex.answer)))
        out.append((str(ex.prompt), response, ex.answer))
    return out


async def score_all(worker: RewardWorker, rows: list, batch: int) -> tuple[float, float]:
    """(µs per sample over all rows, median ms per batch), batches scored as RewardWorker.process does."""
    times = []
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        t = time.perf_counter()
        scored = await asyncio.gather(*(worker._score(*row) for row in rows[i : i + batch]))
        times.append(time.perf_counter() - t)
        assert all(error == "" for _, error, _ in scored)
    return 1e6 * (time.perf_counter() - start) / len(rows), 1000 * statistics.median(times)


async def measure(rows: list, batch: int, processes: list[int]) -> list[dict]:
    out = []
    worker = RewardWorker(reward, None, None, timeout_s=10, failure_reward=0.0, batch_rows=batch)
    await score_all(worker, rows[:batch], batch)  # warm
    us, ms = await score_all(worker, rows, batch)
    worker.close()
    out.append({"isolation": "thread", "processes": 0, "us_per_sample": us, "ms_per_batch": ms})
    for n in processes:
        pool = RewardProcesses(SPEC, processes=n, memory_limit_mb=1024)
        worker = RewardWorker(pool, None, None, timeout_s=10, failure_reward=0.0, batch_rows=batch)
        t = time.perf_counter()
        await worker.start()
        start_s = time.perf_counter() - t
        await score_all(worker, rows[:batch], batch)
        us, ms = await score_all(worker, rows, batch)
        replace_s = await killed_and_replaced(pool)
        worker.close()
        out.append({"isolation": "process", "processes": n, "us_per_sample": us, "ms_per_batch": ms,
                    "start_s": start_s, "replace_s": replace_s})  # fmt: skip
    return out


async def killed_and_replaced(pool: RewardProcesses) -> float:
    """Seconds from a call's deadline (its process killed) until every process answers again."""
    try:
        await pool.call(["p" * 10_000_000, "r", "a"], "", 1e-6)  # a deadline no call can meet
    except TimeoutError:
        pass
    t = time.perf_counter()
    await asyncio.gather(*(pool.call(["p", "r", "a"], "", 60.0) for _ in range(pool.size)))
    while pool._tasks:  # the replacement has loaded
        await asyncio.sleep(0.001)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=4096, help="samples scored per configuration")
    parser.add_argument("--batch", type=int, default=64, help="samples per batch (reward.batch_rows)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4], help="reward.processes tried")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    args = parser.parse_args()
    figures = asyncio.run(measure(samples(args.samples), args.batch, args.processes))
    print(
        f"{'isolation':<10}{'processes':>10}{'µs/sample':>11}{'ms/batch':>10}{'start s':>9}{'replace s':>11}"
    )
    for f in figures:
        extra = f"{f['start_s']:>9.2f}{f['replace_s']:>11.2f}" if "start_s" in f else f"{'':>9}{'':>11}"
        print(
            f"{f['isolation']:<10}{f['processes']:>10}{f['us_per_sample']:>11.1f}{f['ms_per_batch']:>10.2f}{extra}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"batch": args.batch, "samples": args.samples, "runs": figures},
                                              indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
