"""Reward isolation: what running the reward function in reward processes costs, against a thread.

The reward stage of the tiny example (examples/sort.yaml: `asyncflow.tasks.sorting:reward`, a
string comparison) scored through RewardWorker as a run scores it: a batch of `--batch` samples
at a time: in threads every call of the batch in flight together, in processes one message per
process carrying its share of the batch and one reply per call. The function itself takes
microseconds, so the figures are the isolation's own overhead per sample: a thread pool hop
(thread) against its share of a msgpack round trip over a socket pair to a reward process
(process, 1..N processes). Also timed:
starting the processes (each loads the function), and replacing one killed past its deadline.

With `--e2e STEPS` it also trains the example for STEPS steps with each isolation, in turns
(`--repeats` of each), and reports the run's samples/s, the trainer's wait for data and the
reward workers' busy time per sample and idle fraction.

    .venv/bin/python benchmarks/reward_isolation.py [--samples 4096] [--e2e 100] [--json out.json]
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
        outcomes = await worker._calls([(list(row), "") for row in rows[i : i + batch]])
        times.append(time.perf_counter() - t)
        assert all(error == "" for _, error in outcomes)
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


def e2e(steps: int, repeats: int) -> list[dict]:
    """The example trained with each isolation in turn; what its last metrics line says."""
    import tempfile

    import ray

    from asyncflow import load_config, train
    from asyncflow.rundir import RunDir

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    example = Path(__file__).resolve().parents[1] / "examples" / "sort.yaml"
    out = []
    for repeat in range(repeats):
        for isolation in ("thread", "process"):
            overrides = [f"trainer.steps={steps}", "task.eval_prompts=0", "trainer.checkpoint_every=0",
                         f"reward.isolation={isolation}", f"output_dir={tempfile.mkdtemp()}",
                         f"dataplane.name=bench-reward-{isolation}-{repeat}"]  # fmt: skip
            summary = train(load_config(example, overrides), display=False)
            metrics = RunDir(summary["run_dir"]).metrics()
            reward = metrics[-1]["workers"]["reward"]
            out.append({"isolation": isolation, "repeat": repeat, "samples_per_s": summary["samples_per_s"],
                        "trainer_wait_s": sum(m["wait_s"] for m in metrics),
                        "reward_us_per_sample": 1e6 * reward["busy_s"] / reward["samples"],
                        "reward_idle_frac": reward["idle_frac"]})  # fmt: skip
    ray.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=4096, help="samples scored per configuration")
    parser.add_argument("--batch", type=int, default=64, help="samples per batch (reward.batch_rows)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4], help="reward.processes tried")
    parser.add_argument("--e2e", type=int, default=0, metavar="STEPS", help="also train the example (0: no)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each isolation with --e2e")
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
    runs = e2e(args.e2e, args.repeats) if args.e2e else []
    if runs:
        print(
            f"\n{'isolation':<10}{'samples/s':>10}{'trainer wait s':>15}{'reward µs/sample':>17}"
            f"{'reward idle':>12}"
        )
    for r in runs:
        print(f"{r['isolation']:<10}{r['samples_per_s']:>10.0f}{r['trainer_wait_s']:>15.2f}"
              f"{r['reward_us_per_sample']:>17.0f}{r['reward_idle_frac']:>12.0%}")  # fmt: skip
    if args.json:
        figures_all = {"batch": args.batch, "samples": args.samples, "calls": figures, "e2e_steps": args.e2e,
                       "e2e": runs}  # fmt: skip
        Path(args.json).write_text(json.dumps(figures_all, indent=2) + "\n")


if __name__ == "__main__":
    main()
